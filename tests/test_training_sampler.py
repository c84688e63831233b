"""Length-bucketed batches: each row once an epoch, neighbouring lengths together, random order.

The length-bucketing sampler on varied lengths: it must beat random order at padding.
"""

import random

import datasets
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from lorapipe.training import GuardedTrainer, LengthBucketSampler, training_args
from tests.test_reliability import small_params

_rng = random.Random(0)  # one generator: varied lengths (a new one per row gave 203 equal ones)
LENGTHS = [_rng.randint(2, 60) for _ in range(203)]  # 6 batches of 32 and one of 11


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_each_row_once_in_batches_of_neighbouring_lengths():
    torch.manual_seed(0)
    order = list(LengthBucketSampler(LENGTHS, 32))
    assert sorted(order) == list(range(len(LENGTHS)))
    got = batches(order, 32)
    # The same batches as cutting the length-sorted rows: no batch spans more lengths than that.
    expected = batches(sorted(LENGTHS, reverse=True), 32)
    assert sorted(sorted(LENGTHS[i] for i in b) for b in got) == sorted(sorted(b) for b in expected)
    assert max(LENGTHS[i] for i in got[0]) == max(LENGTHS)  # the longest batch first
    assert len(got[-1]) == len(LENGTHS) % 32  # the short batch last


def test_order_is_seeded_and_changes_every_epoch():
    torch.manual_seed(1)
    sampler = LengthBucketSampler(LENGTHS, 32)
    first, second = list(sampler), list(sampler)
    torch.manual_seed(1)
    assert list(sampler) == first
    assert second != first


def test_padding_is_that_of_sorted_rows():
    torch.manual_seed(0)
    got = batches(list(LengthBucketSampler(LENGTHS, 32)), 32)
    padded = sum(len(b) * max(LENGTHS[i] for i in b) for b in got)
    ideal = sum(len(b) * max(b) for b in batches(sorted(LENGTHS, reverse=True), 32))
    assert padded == ideal


def test_trainer_batches_come_from_the_bucket_sampler(tiny_bert, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": [[101, *([7] * (n - 2)), 102] for n in LENGTHS],
            "attention_mask": [[1] * n for n in LENGTHS],
            "labels": [i % 2 for i in range(len(LENGTHS))],
            "length": LENGTHS,
        }
    )
    p = small_params(str(tiny_bert), batch_size=32)
    trainer = GuardedTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(tiny_bert),
        args=training_args(p, tmp_path, has_eval=False),
        train_dataset=rows,
        eval_dataset=rows,
        data_collator=DataCollatorWithPadding(tok),
    )
    widths = [b["input_ids"].shape[1] for b in trainer.get_train_dataloader()]
    expected = [max(b) for b in batches(sorted(LENGTHS, reverse=True), 32)]
    assert sorted(widths) == sorted(expected)
    # Evaluation keeps the stored order (the tokenize stage sorts it by length).
    eval_order = list(trainer.get_eval_dataloader().sampler)
    assert eval_order == list(range(len(LENGTHS)))


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
