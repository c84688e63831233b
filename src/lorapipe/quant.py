"""bitsandbytes quantization from params (the dtypes come from the runtime)."""

from __future__ import annotations

import logging

import torch
from transformers import BitsAndBytesConfig

from lorapipe.config import UserError
from lorapipe.sections_model import QuantParams


class FirstOnly(logging.Filter):
    """Passes the first record of each message, drops its repeats."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, set[str]()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefix):
            return True
        first = message not in self.seen
        self.seen.add(message)
        return first


# bitsandbytes warns on every 8-bit matmul's forward whose input is not fp16 ("inputs will be
# cast from torch.bfloat16 to float16"): 224 lines per forward on Llama-3.1-8B. Said once here.
BNB_CAST_LOGGER = "bitsandbytes.autograd._functions"
BNB_CAST_WARNING = "MatMul8bitLt: inputs will be cast"


def say_8bit_cast_once() -> None:
    logger = logging.getLogger(BNB_CAST_LOGGER)
    if not any(isinstance(f, FirstOnly) for f in logger.filters):
        logger.addFilter(FirstOnly(BNB_CAST_WARNING))


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
        say_8bit_cast_once()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=skip_modules,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
