"""The length-bucketing sampler on varied lengths: it must beat random order at padding."""

import random

import pytest
import torch

from lorapipe.training import LengthBucketSampler

BATCH = 16


def lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 200) for _ in range(n)]


def padded(order: list[int], rows: list[int]) -> int:
    """Token positions a batch padded to its longest row costs, summed over the epoch."""
    chunks = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    return sum(len(c) * max(rows[i] for i in c) for c in chunks)


def test_the_lengths_really_vary():
    rows = lengths(203, 0)
    assert len(set(rows)) > 80 and len(rows) == 203


@pytest.mark.parametrize("n", [203, 160, 7, 1])
def test_every_row_exactly_once_every_epoch(n):
    rows = lengths(n, n)
    sampler = LengthBucketSampler(rows, BATCH)
    assert len(sampler) == n
    torch.manual_seed(0)
    for _ in range(3):
        order = list(sampler)
        assert len(order) == n and sorted(order) == list(range(n))


@pytest.mark.parametrize("seed", range(5))
def test_sorted_batches_pad_far_less_than_random_ones(seed):
    rows = lengths(203, seed)
    torch.manual_seed(seed)
    bucketed = padded(list(LengthBucketSampler(rows, BATCH)), rows)
    ideal = padded(sorted(range(len(rows)), key=lambda i: -rows[i]), rows)
    shuffled = padded(torch.randperm(len(rows)).tolist(), rows)
    assert bucketed == ideal
    assert bucketed < 0.75 * shuffled  # random batches of these lengths pad ~40 % more


@pytest.mark.parametrize("seed", range(5))
def test_batches_are_runs_of_the_sorted_lengths_longest_first_short_last(seed):
    rows = lengths(203, 100 + seed)
    torch.manual_seed(seed)
    order = list(LengthBucketSampler(rows, BATCH))
    chunks = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    ranked = sorted(rows, reverse=True)
    cuts = [ranked[i : i + BATCH] for i in range(0, len(ranked), BATCH)]
    assert [sorted(rows[i] for i in c) for c in chunks[:1]] == [sorted(cuts[0])]
    assert sorted(sorted(rows[i] for i in c) for c in chunks) == sorted(sorted(c) for c in cuts)
    assert max(rows[i] for i in chunks[0]) == max(rows)  # out of memory shows at step 1
    assert len(chunks[-1]) == len(rows) % BATCH  # the one short batch last
    assert sorted(rows[i] for i in chunks[-1]) == sorted(cuts[-1])


def test_the_middle_batches_come_in_random_order():
    rows = lengths(203, 7)
    firsts = set()
    for seed in range(6):
        torch.manual_seed(seed)
        order = list(LengthBucketSampler(rows, BATCH))
        second = max(rows[i] for i in order[BATCH : 2 * BATCH])
        firsts.add(second)
        maxima = [max(rows[i] for i in order[j : j + BATCH]) for j in range(0, 192, BATCH)]
        assert maxima != sorted(maxima, reverse=True)  # not simply longest to shortest
    assert len(firsts) > 2


def test_equal_lengths_still_mix_at_random():
    rows = [5] * 64
    torch.manual_seed(0)
    a = list(LengthBucketSampler(rows, BATCH))
    b = list(LengthBucketSampler(rows, BATCH))
    assert a != b and a != list(range(64))


def test_an_exact_multiple_has_no_short_batch():
    rows = lengths(160, 3)
    torch.manual_seed(0)
    order = list(LengthBucketSampler(rows, BATCH))
    chunks = [order[i : i + BATCH] for i in range(0, 160, BATCH)]
    assert all(len(c) == BATCH for c in chunks)
    assert max(rows[i] for i in chunks[0]) == max(rows)
    # No short batch to hold back: the last place is as random as the others.
    lasts = set()
    for seed in range(6):
        torch.manual_seed(seed)
        lasts.add(max(rows[i] for i in list(LengthBucketSampler(rows, BATCH))[-BATCH:]))
    assert len(lasts) > 2
