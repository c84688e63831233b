"""Length-bucketed batches: each row once an epoch, neighbouring lengths together, random order."""

import random

import datasets
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
