"""tokenize: raw rows (data.train / data.eval) → data/tokenized (Arrow, unpadded).

Named tokenize_data.py: a script called tokenize.py would shadow the standard library module.
"""

import time
from pathlib import Path

from lorapipe import progress, stage
from lorapipe.data import tokenize


def main(p):
    start = time.perf_counter()
    meta = tokenize(p, Path("data/tokenized"))
    rows, tokens = meta["rows"], meta["tokens"]
    rate = (rows["train"] + rows["eval"]) / (time.perf_counter() - start)
    headline = (
        f"{rows['train']} train + {rows['eval']} eval rows, "
        f"{tokens['train'] + tokens['eval']} tokens, {rate:.0f} rows/s"
    )
    print(progress.summary("tokenize", ["data/tokenized"], headline))


if __name__ == "__main__":
    stage.run(main)
