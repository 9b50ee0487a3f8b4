"""Task definitions: templates are checked against what each task can fill."""

from __future__ import annotations

from llama_tune.tasks import TASKS, language_name, template_placeholders, template_problems


def test_every_default_template_fits_its_task() -> None:
    for task in TASKS.values():
        assert template_problems(task.template, task) == [], task.name
        assert set(task.input_fields) <= template_placeholders(task.template), task.name


def test_template_problems_name_the_placeholder_or_the_syntax() -> None:
    classification = TASKS["classification"]
    assert template_placeholders("Review: {text}\nLabels: {labels}") == {"text", "labels"}
    (unknown,) = template_problems("Review: {txt}", classification)
    assert unknown.startswith("unknown placeholder(s) ['txt'] for task classification")
    (malformed,) = template_problems("Review: {text", classification)
    assert malformed.startswith("malformed template:")
    (blind,) = template_problems("Sentiment ({labels}):", classification)
    assert blind == "the template never shows the row's input: add {text}"
    (blind,) = template_problems("Translate to {target_lang}:", TASKS["translation"])
    assert blind.endswith("add {source}")


def test_language_codes_become_names() -> None:
    assert language_name("de") == "German"
    assert language_name("DE") == "German"
    assert language_name("Klingon") == "Klingon"
