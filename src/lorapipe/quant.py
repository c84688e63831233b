"""bitsandbytes quantization from params (the dtypes come from the runtime)."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from lorapipe.config import QuantParams, UserError


def check_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an import of a native library can fail in many ways
        raise UserError(
            f"quant.bits: bitsandbytes cannot run here ({type(exc).__name__}: {exc}); "
            "set quant.bits: none"
        ) from None


def bnb_config(
    q: QuantParams, compute_dtype: torch.dtype, skip_modules: list[str] | None = None
) -> BitsAndBytesConfig | None:
    """`skip_modules`: modules left in full precision (None: transformers' default list)."""
    if q.bits == "none":
        return None
    check_bitsandbytes()
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=skip_modules,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
