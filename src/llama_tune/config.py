"""Reading a recipe: YAML, `${VAR}` expansion, dotted overrides, every problem named at once.

Overrides are applied to the YAML before validation, so they are checked exactly like the file
itself; each problem is reported under its dotted key, before any model or dataset is loaded.
The schema the recipe is validated against is `schema.Recipe`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llama_tune.builtin_models import BUILTIN_MODELS
from llama_tune.errors import UserError
from llama_tune.run_folder import RECIPE_COPY
from llama_tune.schema import MOVED_KEYS, Recipe


class RecipeError(UserError):
    """A recipe (or its overrides) is invalid; `problems` holds one line per broken key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listing = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{listing}")


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path: str, problems: list[str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string, recording unset variables."""
    if isinstance(value, dict):
        return {
            key: _expand_env(item, f"{path}.{key}" if path else str(key), problems)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_expand_env(item, f"{path}.{index}", problems) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set")
        return match.group(0)

    return _ENV_REFERENCE.sub(substitute, value)


def _override_value(text: str) -> Any:
    """`1e-4` -> 1e-4, `[q_proj]` -> list, `null` or empty -> None, anything else -> the text."""
    if not text:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Set dotted `key=value` pairs in the raw recipe; values parse as YAML scalars or lists."""
    problems = []
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {override!r}: expected dotted.key=value")
            continue
        *parents, leaf = key.split(".")
        node = raw
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                # A key below an absent or null section turns the section on.
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                problems.append(
                    f"override {key}: {'.'.join(parents[: depth + 1])} is not a section"
                )
                break
            node = child
        else:
            node[leaf] = _override_value(text)
    return problems


def _take_moved_keys(raw: dict[str, Any]) -> list[str]:
    """Remove keys that moved to another section, each named with its new home, so the rest
    of the recipe is still checked."""
    problems = []
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            del raw[section][key]
            problems.append(f"{old}: moved to {new}")
    return problems


def _describe(error: dict[str, Any]) -> list[str]:
    """Turn one pydantic error into lines of `dotted.key: message`."""
    strings = {"str", "constrained-str"}
    if strings & set(error["loc"]) and isinstance(error.get("input"), dict):
        # A mapping where a string or a section fits (data.source): the section's errors say
        # what is wrong with it, "not a string" does not.
        return []
    location = ".".join(str(part) for part in error["loc"])
    # Unions report each branch as an extra location part; keep the key readable.
    location = re.sub(
        r"\.(literal\[.*?\]|list\[str\]|(?:constrained-)?str|HubSource)(?=\.|$)", "", location
    )
    if error["type"] == "extra_forbidden":
        return [f"{location}: unknown key"]
    if error.get("input") == "":
        # Only the string's own error: a union's other branches (a section) add nothing.
        if error["type"] != "string_too_short":
            return []
        return [f"{location}: empty; give a value"]
    message = error["msg"].removeprefix("Value error, ")
    lines = []
    for line in message.split("\n"):
        # Section validators prefix each line with the key inside the section.
        key, sep, rest = line.partition(": ")
        # A key may hold a list index (mix.0.split).
        parts = key.split(".")
        if sep and all(part.isidentifier() or part.isdigit() for part in parts):
            lines.append(f"{location}.{key}: {rest}" if location else line)
        else:
            lines.append(f"{location}: {line}" if location else line)
    return lines


def parse(raw: Any, source: str, overrides: list[str] | None = None) -> Recipe:
    """Override and validate a loaded recipe mapping; raise RecipeError listing every problem."""
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a mapping of sections (model, data, ...)"])
    problems = apply_overrides(raw, overrides or [])
    expanded = _expand_env(raw, "", problems)
    problems += _take_moved_keys(expanded)
    try:
        recipe = Recipe.model_validate(expanded)
    except ValidationError as error:
        problems += [line for item in error.errors() for line in _describe(item)]
    if problems:
        raise RecipeError(source, list(dict.fromkeys(problems)))
    _anchor_paths(recipe)
    return name_student_after_teacher(recipe)


def name_student_after_teacher(recipe: Recipe) -> Recipe:
    """A student built from the teacher (distill.student.from_teacher) is the teacher's
    architecture and tokenizer, so `model` names the teacher's weights: the recipe as resolved."""
    if recipe.distill is None or recipe.distill.student.from_teacher is None:
        return recipe
    teacher = recipe.distill.teacher
    model = recipe.model.model_copy(update={"name": teacher.name, "revision": teacher.revision})
    return recipe.model_copy(update={"model": model})


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except FileNotFoundError:
        raise RecipeError(str(path), ["file not found"]) from None
    except IsADirectoryError:
        raise RecipeError(
            str(path), ["a folder, not a recipe file (to continue a run: train FOLDER --resume)"]
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RecipeError(str(path), [f"not valid YAML: {error}".replace("\n", " ")]) from None
    return parse(raw, str(path), overrides)


def load_run(folder: Path, overrides: list[str] | None = None) -> Recipe:
    """The resolved recipe a run folder saved (with overrides), its output.dir the folder
    itself: wherever the folder now is, that is where the run lives."""
    saved = folder / RECIPE_COPY
    if not saved.is_file():
        raise UserError(f"{folder} is not a run folder: it has no {RECIPE_COPY}")
    for override in overrides or []:
        if override.partition("=")[0].strip() == "output.dir":
            raise UserError(
                f"{override}: the run lives in its folder {folder}; to work on it elsewhere, "
                "copy the folder there and name the copy"
            )
    recipe = load(saved, overrides)
    recipe.output.dir = str(folder)
    return recipe


def run_dir(recipe: Recipe, recipe_path: str | Path) -> Path:
    """The run folder named by `output.dir`, with {recipe} filled in."""
    return Path(recipe.output.dir.replace("{recipe}", Path(recipe_path).stem))


def flatten(recipe: Recipe) -> dict[str, Any]:
    """The recipe's values by dotted key (`train.lr`), sections walked down to their leaves."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", recipe.model_dump(mode="json"))
    return flat


def changed_keys(before: Recipe, after: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value differs between two recipes: (before, after)."""
    old, new = flatten(before), flatten(after)
    return {
        key: (old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    }


def anchor(value: str) -> str:
    """`value` as an absolute path where it names something on disk from here; otherwise as it
    is (a built-in model, a Hub id, a missing path the loaders will name)."""
    path = Path(value).expanduser()
    if value in BUILTIN_MODELS or path.is_absolute() or not path.exists():
        return value
    return str(path.absolute())


def _anchor_paths(recipe: Recipe) -> None:
    """Make the recipe's relative local paths (models, adapters, data, a chat template file)
    absolute, where the loaders would find them from here: a run folder's recipe copy then
    means the same from any directory."""
    recipe.model.name = anchor(recipe.model.name)
    if recipe.adapter is not None and recipe.adapter.init_from is not None:
        recipe.adapter.init_from = anchor(recipe.adapter.init_from)
    for holder in [recipe.data, *recipe.data.mix]:
        if isinstance(holder.source, str):
            holder.source = anchor(holder.source)
        else:
            holder.source.hub = anchor(holder.source.hub)
    template = recipe.data.chat.template
    if template is not None and Path(template).suffix in (".jinja", ".j2"):
        recipe.data.chat.template = anchor(template)
    if recipe.distill is not None:
        teacher = recipe.distill.teacher
        teacher.name = anchor(teacher.name)
        if teacher.adapter is not None:
            teacher.adapter = anchor(teacher.adapter)


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (environment variables expanded, defaults filled in)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
