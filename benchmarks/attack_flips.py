"""What the HotFlip attack changes in the rows it flips, for runs scored with it.

A row is flipped when the model answers it right clean and wrong under its own gradient attack
(`robustness-tuned.jsonl` beside `predictions.jsonl` in a run's evaluation folder). For each flipped
row the words the attack changed are compared with the lexicon of the SST-2 training inputs
(`text_noise.lexicon`, the one `gradient_candidates: misspellings` avoids: words seen at least
twice): a typo that makes a word of it ("fun" -> "run", "no" -> "do") makes a real word, often of
another meaning, not a misspelling. Rows are counted as "real word" when any changed word made one,
else "misspelling only".

Run: python benchmarks/attack_flips.py runs/quickstart runs/sst2_adversarial [--split validation]
"""

from __future__ import annotations

import argparse
import collections
import difflib
import json
import os
from pathlib import Path

from llama_tune import data, schema
from llama_tune.adversarial import text_noise


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders scored with the attack")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--strength", type=float, default=0.1)
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    return parser.parse_args()


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def sst2_lexicon(data_folder: Path) -> frozenset[str]:
    """The words of the SST-2 training inputs, as `gradient_candidates: misspellings` reads them."""
    source = data_folder / "classification" / "sst2"
    settings = schema.DataConfig(source=str(source), task="classification")
    return text_noise.lexicon(data.training_inputs(data.TaskFormatter(settings)))


def _makes_a_word(before: str, after: str, lexicon: frozenset[str]) -> bool:
    return bool((set(text_noise.words_of(after)) - set(text_noise.words_of(before))) & lexicon)


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
    lexicon = sst2_lexicon(Path(args.data))
    summary = {}
    for run in args.runs:
        changes = flipped_changes(run, args.split, args.strength)
        made_words = [
            [(before, after) for before, after in pairs if _makes_a_word(before, after, lexicon)]
            for pairs in changes.values()
        ]
        real_words = collections.Counter(
            f"{before} -> {after}" for pairs in made_words for before, after in pairs
        )
        real_word_rows = sum(bool(pairs) for pairs in made_words)
        summary[str(run)] = {
            "flipped": len(changes),
            "real word": real_word_rows,
            "misspelling only": len(changes) - real_word_rows,
            "commonest real-word changes": real_words.most_common(10),
        }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
