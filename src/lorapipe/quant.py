"""Devices, dtypes and bitsandbytes quantization from params."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from lorapipe.config import Params, QuantParams, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(q: QuantParams) -> torch.dtype:
    """bf16 on a GPU that has it, else fp32: bf16 k-bit matmuls are ~20x slower on a CPU."""
    if q.compute_dtype != "auto":
        return DTYPES[q.compute_dtype]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def mixed_precision(p: Params) -> str:
    """'bf16', 'fp16' or 'no': autocast only where a GPU makes it pay."""
    if p.train.mixed_precision != "auto":
        return p.train.mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an import of a native library can fail in many ways
        raise UserError(
            f"quant.bits: bitsandbytes cannot run here ({type(exc).__name__}: {exc}); "
            "set quant.bits: none"
        ) from None


def bnb_config(q: QuantParams) -> BitsAndBytesConfig | None:
    if q.bits == "none":
        return None
    check_bitsandbytes()
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(q),
    )
