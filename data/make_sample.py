"""Draw the embedded SST-2 sample from the full GLUE files (run once; the output is committed).

python data/make_sample.py ../shared/data/sst2 data/raw/sst2
"""

import csv
import random
import sys
from pathlib import Path

ROWS, SEED = 5000, 1234


def read(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n").writerows(rows)


def main(src: Path, dst: Path) -> None:
    train = read(src / "train.tsv")
    header, body = train[0], train[1:]
    sample = random.Random(SEED).sample(body, ROWS)
    dst.mkdir(parents=True, exist_ok=True)
    write(dst / "train.tsv", [header, *sample])
    write(dst / "dev.tsv", read(src / "dev.tsv"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
