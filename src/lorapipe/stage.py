"""How a stage script runs: params validated first, user errors as one line, exit code 2."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from lorapipe.config import Params, UserError, load_params


def run(main: Callable[[Params], object], params_file: str = "params.yaml") -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(load_params(os.environ.get("LORAPIPE_PARAMS", params_file)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
