"""The merge check's floor (a skipped or mis-scaled delta fails whatever the dtype), the merged
model's own score, and a full disk."""

import errno
import json
import re
import subprocess

import pytest
import safetensors
import torch
from peft.tuners.lora import Linear as LoraLinear
from transformers import AutoModelForSequenceClassification, AutoTokenizer, modeling_utils

from lorapipe.config import UserError
from tests.test_merge_check import SENTENCES, make_trained, params, run_merge


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    return make_trained(tiny_bert, tmp_path_factory.mktemp("merge-effect"))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def trained_in(tiny_bert, tmp_path_factory):
    """tiny_bert saved in a dtype (the merge runs in the checkpoint's: fp16 matmuls run on this
    CPU in torch 2.13, no cast needed) and an adapter whose LoRA moves the largest logit by ~9 %:
    a visible effect, yet inside bf16's auto tolerance (0.1), so a no-op merge passed before."""
    cache = {}

    def build(name, b_std=0.3):
        if (name, b_std) not in cache:
            root = tmp_path_factory.mktemp(f"trained-{name}")
            base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, dtype=DTYPES[name])
            base.save_pretrained(root / "base")
            AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(root / "base")
            cache[name, b_std] = (root / "base", make_trained(root / "base", root, b_std))
        return cache[name, b_std]

    return build


def wrong_merge(monkeypatch, kind):
    """none: merged == base (B·A never added, the trained head kept); half / twice: the delta
    at (alpha/r)/2, or with the scaling applied twice (alpha/r = 2 here: 2·(alpha/r)·B·A).

    (Not PEFT's unload(): since peft 0.22 it also drops the trained head copy, another fault.)
    """
    factor = {"none": 0.0, "half": 0.5, "twice": 2.0}[kind]
    real = LoraLinear.get_delta_weight
    monkeypatch.setattr(
        LoraLinear, "get_delta_weight", lambda self, adapter: factor * real(self, adapter)
    )


def auto(base):
    return params(base, tolerance="auto", min_top1="auto")


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_correct_merge_carries_the_loras_effect_in_every_dtype(trained_in, tmp_path, dtype):
    base, root = trained_in(dtype)
    result = run_merge(auto(base), root, tmp_path)
    assert result["passed"] and result["merged"]["dtype"] == str(DTYPES[dtype])[6:]
    assert result["lora_effect_rms"] > 0.01  # the LoRA's effect is visible
    assert result["effect_share"] == pytest.approx(
        result["merge_error_rms"] / result["lora_effect_rms"]
    )
    assert result["effect_share"] <= result["max_effect_share"]
    assert result["verdict"].startswith("merged == base + adapter within")
    assert json.loads((tmp_path / "merge.json").read_text())["effect_share"] == pytest.approx(
        result["effect_share"]
    )


@pytest.mark.parametrize("kind", ["none", "half", "twice"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_no_op_or_mis_scaled_merge_fails_in_every_dtype(
    trained_in, tmp_path, monkeypatch, dtype, kind
):
    base, root = trained_in(dtype)
    wrong_merge(monkeypatch, kind)
    with pytest.raises(UserError, match="of the LoRA layers' own effect") as info:
        run_merge(auto(base), root, tmp_path)
    message = str(info.value)
    share = float(re.search(r"differ by ([0-9.e+-]+) of the LoRA", message).group(1))
    assert share >= 0.4  # |c - 1| to first order: 1, 0.5, 1
    assert "\n" not in message and message.endswith("; nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_a_no_op_bf16_merge_of_a_small_lora_is_caught_by_the_share_alone(
    trained_in, tmp_path, monkeypatch
):
    """The case the tolerance and top-1 checks miss: the base alone is within both."""
    base, root = trained_in("bf16")
    wrong_merge(monkeypatch, "none")
    with pytest.raises(UserError) as info:
        run_merge(auto(base), root, tmp_path)
    assert "merge.tolerance" not in str(info.value)  # relative difference and top-1: in bounds
    assert "differ by 1 of the LoRA layers' own effect" in str(info.value)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_adapter_with_no_effect_merges_trivially(trained_in, tmp_path, monkeypatch, dtype):
    base, root = trained_in(dtype, b_std=0.0)  # B = 0: an untrained LoRA
    wrong_merge(monkeypatch, "none")  # merging nothing is then right too
    result = run_merge(auto(base), root, tmp_path)
    assert result["passed"] and result["effect_share"] is None
    assert result["lora_effect_rms"] == 0 and result["max_abs_logit_diff"] == 0
    assert "no effect" in result["verdict"] and "merges trivially" in result["verdict"]


def test_the_report_scores_the_merged_model_on_the_eval_split(trained, tiny_bert, tmp_path):
    p = params(tiny_bert)
    merged = run_merge(p, trained, tmp_path)["merged"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        predicted = [model(**tok(s, return_tensors="pt")).logits.argmax().item() for s in SENTENCES]
    right = sum(x == y for x, y in zip(predicted, [1, 0, 0, 1] * 3, strict=True))
    assert merged["metric"] == "accuracy" and merged["examples"] == len(SENTENCES)
    assert merged["accuracy"] == right / len(SENTENCES)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f'"accuracy": {merged["accuracy"]}' in card


def fill_disk(monkeypatch, error):
    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)  # as transformers imports it


@pytest.mark.parametrize(
    "error",
    [
        safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_a_full_disk_is_one_line_with_the_space_needed(
    trained, tiny_bert, tmp_path, monkeypatch, error
):
    fill_disk(monkeypatch, error)
    with pytest.raises(UserError) as info:
        run_merge(params(tiny_bert), trained, tmp_path)
    message = str(info.value)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    need = 4 * sum(t.numel() for t in base.parameters()) / 1e6
    assert (
        "\n" not in message and f"no space left in {tmp_path} for {tmp_path / 'merged'}" in message
    )
    assert f"need about {need:,.0f} MB" in message and message.endswith("nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs (root only), unmounted after the test."""

    def mount(size):
        folder = tmp_path / "disk"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder])
        if proc.returncode != 0:
            pytest.skip("needs `mount -t tmpfs` (root)")
        mounted.append(folder)
        return folder

    mounted = []
    yield mount
    for folder in mounted:
        subprocess.run(["umount", folder], check=True)


@pytest.mark.parametrize("room", ["none", "weights only"])
def test_a_full_tmpfs_is_refused_in_one_line_and_leaves_nothing(
    trained, tiny_bert, tmp_path, small_tmpfs, room
):
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    weights = 4 * sum(t.numel() for t in base.parameters())
    # none: refused before loading; weights only: the tokenizer's ~1 MB then fails mid-save.
    disk = small_tmpfs(weights // 2 if room == "none" else weights + 256 * 1024)
    with pytest.raises(UserError) as info:
        run_merge(params(tiny_bert), trained, disk)
    message = str(info.value)
    assert "\n" not in message and f"no space left in {disk} for {disk / 'merged'}" in message
    assert f"need about {weights / 1e6:,.0f} MB" in message
    assert list(disk.iterdir()) == []  # no partial folder, no report
