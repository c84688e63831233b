"""Build the shipped chat set from Python's Language Reference (run once; the output is committed).

python data/make_chat.py data/raw/pyref-chat/train.jsonl

One multi-turn conversation per reference topic (pydoc_data.topics, PSF licence): the user asks
about the topic, then asks for more; the assistant answers with the topic's own paragraphs.
Every third conversation opens with a system turn. OpenAI-style `messages` JSONL.
"""

import json
import sys
from pathlib import Path
from pydoc_data.topics import topics

SYSTEM = "You answer questions about Python using the Python Language Reference."
FOLLOW_UPS = ("Tell me more.", "Anything else worth knowing?")
MAX_ANSWER = 500  # characters, cut at a sentence end: short turns keep the test set small


def answer(paragraph: str) -> str:
    text = " ".join(paragraph.split())  # the reference wraps its lines at 70 columns
    if len(text) <= MAX_ANSWER:
        return text
    cut = text.rfind(". ", 0, MAX_ANSWER)
    return text[: cut + 1] if cut > 0 else text[:MAX_ANSWER]


def conversation(number: int, title: str, paragraphs: list[str]) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": SYSTEM}] if number % 3 == 0 else []
    questions = [f"What does the Python Language Reference say about {title}?", *FOLLOW_UPS]
    for question, paragraph in zip(questions, paragraphs, strict=False):
        turns += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer(paragraph)},
        ]
    return turns


def main(out: Path) -> None:
    rows = []
    for key in sorted(topics):
        parts = [p.strip() for p in topics[key].split("\n\n") if p.strip()]
        long = [p for p in parts[1:] if len(p) > 80]  # parts[0] is the title; skip code lines
        if len(long) >= 2:
            title = parts[0].splitlines()[0]
            rows.append({"messages": conversation(len(rows), title, long)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"wrote {len(rows)} conversations to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
