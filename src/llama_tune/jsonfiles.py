"""Reading and writing the JSON files of a run (summaries, metrics, results, manifests), and
writing any of its text files whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llama_tune.errors import UserError


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics, predictions), blank lines skipped; a damaged
    line is a UserError naming the file and the line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: line {number} unreadable ({error})") from None
    return records


def write_text(path: Path, text: str) -> None:
    """Write text through a temporary file and a rename, so readers never see half a file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.write_text(text)
    os.replace(staging, path)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON whole (`write_text`), indented for people reading run folders."""
    write_text(path, json.dumps(payload, indent=2) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file written by llama-tune; a damaged one is a UserError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable ({error})") from None
