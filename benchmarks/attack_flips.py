"""What the HotFlip attack changes in the rows it flips, for runs scored with it.

A row is flipped when the model answers it right clean and wrong under its own gradient attack
(`robustness-tuned.jsonl` beside `predictions.jsonl` in a run's evaluation folder). For each
flipped row the words the attack changed are compared with the words of the SST-2 training
text: a typo that lands on a word seen there at least --min-count times ("fun" -> "run",
"no" -> "do") is a real word, often of another meaning, not a misspelling. Rows are counted as
"real word" when any changed word became one, else "misspelling only".

Run: python benchmarks/attack_flips.py runs/quickstart runs/sst2_adversarial [--split validation]
"""

from __future__ import annotations

import argparse
import collections
import difflib
import json
import os
from pathlib import Path


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders scored with the attack")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--strength", type=float, default=0.1)
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    parser.add_argument("--min-count", type=int, default=5)
    return parser.parse_args()


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def training_word_counts(data: Path) -> collections.Counter[str]:
    """Lower-cased whitespace words of the SST-2 training text, with how often each occurs."""
    rows = _jsonl(data / "classification" / "sst2" / "train.jsonl")
    return collections.Counter(word for row in rows for word in row["text"].lower().split())


def flipped_changes(run: Path, split: str, strength: float) -> dict[int, list[tuple[str, str]]]:
    """For each row the attack flips, the (clean word, attacked word) pairs it changed."""
    folder = run / "evaluation" / split
    clean = {row["row"]: row for row in _jsonl(folder / "predictions.jsonl")}
    attacked = {
        row["row"]: row
        for row in _jsonl(folder / "robustness-tuned.jsonl")
        if row["method"] == "gradient" and row["strength"] == strength
    }
    if not attacked:
        raise SystemExit(f"{folder}: no gradient attack at strength {strength} was scored")
    changes = {}
    for index, row in attacked.items():
        if clean[index]["score"] == 1 and row["score"] == 0:
            changes[index] = _changed_words(clean[index]["input"].split(), row["input"].split())
    return changes


def _changed_words(clean: list[str], attacked: list[str]) -> list[tuple[str, str]]:
    """(clean word, attacked word) pairs that differ; a stretch whose word count changed (a
    typo that removed a space) is one pair of joined words."""
    pairs = []
    matcher = difflib.SequenceMatcher(a=clean, b=attacked, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if i2 - i1 == j2 - j1:
            pairs += zip(clean[i1:i2], attacked[j1:j2], strict=True)
        else:
            pairs.append((" ".join(clean[i1:i2]), " ".join(attacked[j1:j2])))
    return pairs


def main() -> None:
    args = _arguments()
    counts = training_word_counts(Path(args.data))
    summary = {}
    for run in args.runs:
        changes = flipped_changes(run, args.split, args.strength)
        real_words = collections.Counter(
            f"{before} -> {after}"
            for pairs in changes.values()
            for before, after in pairs
            if counts[after.lower()] >= args.min_count
        )
        real_word_rows = sum(
            any(counts[after.lower()] >= args.min_count for _, after in pairs)
            for pairs in changes.values()
        )
        summary[str(run)] = {
            "flipped": len(changes),
            "real word": real_word_rows,
            "misspelling only": len(changes) - real_word_rows,
            "commonest real-word changes": real_words.most_common(10),
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
