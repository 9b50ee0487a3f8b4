"""The recipe schema: every key documented, none over 15 to a section, resume keys marked."""

from __future__ import annotations

import typing
from pathlib import Path

from llama_tune import schema


def _keys(section: type[schema.Section], prefix: str = "", seen: set | None = None) -> list[str]:
    """Every documented key: a section that may be null (adapter: null) or a string (a data
    source) is documented itself and key by key, the latter only where it first appears."""
    seen = set() if seen is None else seen
    keys = []
    for name, field in section.model_fields.items():
        choices = typing.get_args(field.annotation) or (field.annotation,)
        sections = [c for c in choices if isinstance(c, type) and issubclass(c, schema.Section)]
        if not sections or type(None) in choices or str in choices:
            keys.append(f"{prefix}{name}")
        for nested in sections:
            if str in choices and nested in seen:
                continue
            seen.add(nested)
            keys += _keys(nested, f"{prefix}{name}.", seen)
    return keys


def test_readme_documents_every_recipe_key() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    keys = _keys(schema.Recipe)
    assert len(keys) > 40
    missing = [key for key in keys if f"| `{key}` |" not in readme]
    assert not missing


def test_resume_keys_are_read_from_the_schema() -> None:
    keys = schema.resume_keys()
    assert keys[:2] == ["model.name", "model.revision"]
    resume_fixed = {"train.seed", "train.packing", "data.max_train_rows", "distill.teacher"}
    assert resume_fixed | {"adversarial.augment"} <= set(keys)
    assert not {
        "train.lr",
        "train.max_steps",
        "checkpoint.every",
        "model.gradient_checkpointing",
    } & set(keys)
    # A whole section is one key: nothing below it is listed again.
    assert not [key for key in keys if key.startswith(("distill.teacher.", "adversarial.augment."))]


def test_no_section_has_more_than_fifteen_keys() -> None:
    sections, seen = [schema.Recipe], set()
    while sections:
        section = sections.pop()
        seen.add(section)
        assert len(section.model_fields) <= 15, section.__name__
        for info in section.model_fields.values():
            for candidate in typing.get_args(info.annotation) or (info.annotation,):
                is_section = isinstance(candidate, type) and issubclass(candidate, schema.Section)
                if is_section and candidate not in seen:
                    sections.append(candidate)
    assert len(seen) > 15
