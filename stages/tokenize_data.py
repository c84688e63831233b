"""tokenize: raw rows (data.train / data.eval) → data/tokenized (Arrow, unpadded).

Named tokenize_data.py: a script called tokenize.py would shadow the standard library module.
"""

from pathlib import Path

from lorapipe import stage


def main(p):
    from lorapipe.data import tokenize  # after params are valid: torch takes seconds

    meta = tokenize(p, Path("data/tokenized"))
    print(f"tokenized {meta['rows']} rows, {meta['tokens']} tokens")


if __name__ == "__main__":
    stage.run(main)
