"""Writes examples/tasks/shakespeare_cloze.jsonl: a 4-way multiple-choice cloze over lines of the shipped
plays (the true last word of a verse line against three last words of other lines), for
lm-evaluation-harness through examples/tasks/shakespeare_cloze.yaml. Seeded: the same file every time.

The parents shipped here were trained on these plays, so the task measures how much of what the parent
learned a child keeps (parent against child), not generalization.

    python scripts/make_cloze_task.py
"""

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAYS = ["twelfth_night.txt", "winters_tale.txt", "coriolanus.txt"]
ITEMS = 200


def verse_lines(text: str) -> list[str]:
    """Lines of 7 to 12 words that end in a plain word (verse, not stage directions or speaker names)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if 7 <= len(words) <= 12 and re.fullmatch(r"[a-z]{3,}[,;:.!?]?", words[-1]) and not line.isupper():
            out.append(line)
    return out


def main() -> None:
    rng = random.Random(0)
    lines = [line for play in PLAYS for line in verse_lines((ROOT / "examples/data/shakespeare" / play).read_text())]
    rng.shuffle(lines)
    last = [re.sub(r"[^a-z]", "", line.split()[-1]) for line in lines]
    vocabulary = sorted(set(last))
    out = ROOT / "examples/tasks/shakespeare_cloze.jsonl"
    with out.open("w") as f:
        for line, word in list(zip(lines, last))[:ITEMS]:
            distractors = rng.sample([w for w in vocabulary if w != word], 3)
            choices = distractors + [word]
            rng.shuffle(choices)
            context = " ".join(line.split()[:-1])
            f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(word)}) + "\n")
    print(f"{ITEMS} items written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
