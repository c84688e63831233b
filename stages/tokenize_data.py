"""tokenize: raw rows (data.train / data.eval) → data/tokenized (Arrow, unpadded).

Named tokenize_data.py: a script called tokenize.py would shadow the standard library module.
"""

from pathlib import Path

from lorapipe import stage


def main(p):
    from lorapipe.sources import check_data

    check_data(p)  # the data files and their columns, before torch takes seconds to load
    from lorapipe.data import tokenize

    meta = tokenize(p, Path("data/tokenized"))
    print(f"tokenized {meta['rows']} rows, {meta['tokens']} tokens")


if __name__ == "__main__":
    stage.run(main)
