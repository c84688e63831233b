"""tokenize: raw rows (data.train / data.eval) → data/tokenized (Arrow, unpadded).

Named tokenize_data.py: a script called tokenize.py would shadow the standard library module.
"""

import time
from pathlib import Path

from lorapipe import progress, stage


def main(p):
    from lorapipe.data_sources import check_data

    start = time.perf_counter()
    check_data(p)  # the data files and their columns, before torch takes seconds to load
    from lorapipe.data import tokenize

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
