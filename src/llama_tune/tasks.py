"""Task definitions: which fields a row needs and how they become prompt and target text.

Pure Python (no torch), so recipes can be checked against them without loading anything.
"""

from __future__ import annotations

import string
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """How one task turns a row into a prompt and a target."""

    name: str
    input_fields: tuple[str, ...]
    """Fields read from each row and offered to the prompt template."""
    target_field: str
    """Field whose text is the target the model learns to produce."""
    truncatable_field: str
    """Field shortened when a row is too long (the long input text)."""
    template: str
    """Default prompt template; the target follows it after a space."""
    metrics: tuple[str, ...]
    """Metrics its scorer reports, higher is better (results.json, validation.best_metric)."""
    extra_placeholders: tuple[str, ...] = ()
    """Placeholders filled from the recipe or the data rather than a row field."""
    default_columns: tuple[tuple[str, str], ...] = ()
    """Task field -> column name where the usual column is named differently."""

    @property
    def placeholders(self) -> set[str]:
        return set(self.input_fields) | set(self.extra_placeholders)

    @property
    def fields(self) -> set[str]:
        """Every task field a recipe may map to a column."""
        return {*self.input_fields, self.target_field, *self.extra_placeholders} - {"labels"}


TASKS: dict[str, TaskSpec] = {
    "classification": TaskSpec(
        name="classification",
        input_fields=("text",),
        target_field="label",
        truncatable_field="text",
        template="Classify the text as one of: {labels}.\nText: {text}\nLabel:",
        metrics=("accuracy", "macro_f1"),
        extra_placeholders=("labels",),
    ),
    "summarisation": TaskSpec(
        name="summarisation",
        input_fields=("document",),
        target_field="summary",
        truncatable_field="document",
        template="Write a one-line summary of the text.\nText: {document}\nSummary:",
        metrics=("rouge1", "rouge2", "rougeL", "rougeLsum"),
    ),
    "translation": TaskSpec(
        name="translation",
        input_fields=("source",),
        target_field="target",
        truncatable_field="source",
        template="Translate from {source_lang} to {target_lang}.\n{source_lang}: {source}\n"
        "{target_lang}:",
        metrics=("bleu", "chrf"),
        extra_placeholders=("source_lang", "target_lang"),
        default_columns=(("source_lang", "src_lang"), ("target_lang", "tgt_lang")),
    ),
    "instruction": TaskSpec(
        name="instruction",
        input_fields=("prompt",),
        target_field="completion",
        truncatable_field="prompt",
        template="{prompt}",
        metrics=("rougeL", "chrf", "exact_match"),
    ),
}

LANGUAGE_NAMES = {
    "ar": "Arabic",
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "tr": "Turkish",
    "zh": "Chinese",
}


def language_name(code_or_name: str) -> str:
    """'de' -> 'German'; names and unknown codes pass through unchanged."""
    return LANGUAGE_NAMES.get(code_or_name.lower(), code_or_name)


def template_placeholders(template: str) -> set[str]:
    """The {field} names `template` uses; ValueError when it is malformed."""
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def template_problems(template: str, task: TaskSpec) -> list[str]:
    """Placeholders in `template` that the task cannot fill, or a malformed template."""
    try:
        names = template_placeholders(template)
    except ValueError as error:
        return [f"malformed template: {error}"]
    unknown = sorted(names - task.placeholders)
    if unknown:
        allowed = ", ".join(sorted(task.placeholders))
        return [f"unknown placeholder(s) {unknown} for task {task.name}; allowed: {allowed}"]
    inputs = [name for name in task.input_fields if name not in names]
    if inputs:
        # Without the row's input the model would learn the targets' frequencies, not the task.
        missing = ", ".join("{" + name + "}" for name in inputs)
        return [f"the template never shows the row's input: add {missing}"]
    return []
