"""Chat templates: choosing one, and locating the assistant's tokens in a rendered conversation."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_tune import chat_templates

CONVERSATION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "William Shakespeare wrote it."},
    {"role": "user", "content": "When?\nRoughly, please."},
    {"role": "assistant", "content": "Around 1600, in London.\nIt was first printed in 1603."},
    {"role": "user", "content": "Thanks!"},
]
"""Multi-turn, with a system prompt, line breaks inside turns and a trailing question."""


def _expected_answer_tokens(template, tokenizer) -> list[bool]:
    """Per token of the rendering, whether it spells an answer or the end of turn after it, found
    by searching the rendered text for each answer (independently of the code under test)."""
    text = template.render(CONVERSATION, tokenizer)
    turn_end = template.turn_end
    spans, cursor = [], 0
    for message in CONVERSATION:
        if message["role"] == "assistant":
            start = text.index(message["content"], cursor)
            cursor = start + len(message["content"])
            assert text[cursor:].startswith(turn_end)
            cursor += len(turn_end)
            spans.append((start, cursor))
    encoded = tokenizer(text[:cursor], add_special_tokens=False, return_offsets_mapping=True)
    return [
        any(start <= first < end for start, end in spans) for first, _ in encoded["offset_mapping"]
    ]


@pytest.mark.parametrize("name", ["tokenizer", "llama-3", "chatml"])
def test_answer_tokens_are_exactly_the_assistant_turns(name: str, tokenizer) -> None:
    template = chat_templates.resolve(name, tokenizer)
    rendered = chat_templates.render(CONVERSATION, template, tokenizer)
    marked = [False] * len(rendered.input_ids)
    for start, end in rendered.answers:
        marked[start:end] = [True] * (end - start)
    assert marked == _expected_answer_tokens(template, tokenizer)
    assert len(rendered.answers) == 2
    # The rendering stops after the last answer's end of turn; the prompt is what precedes it.
    assert rendered.answers[-1][1] == len(rendered.input_ids)
    text = template.render(CONVERSATION, tokenizer)
    asked = template.render(CONVERSATION[:4], tokenizer, add_generation_prompt=True)
    assert rendered.prompt == asked
    assert text.startswith(asked)


@pytest.mark.parametrize("name", list(chat_templates.NAMED_TEMPLATES))
def test_every_named_template_renders_each_answer_and_its_end(name: str, tokenizer) -> None:
    template = chat_templates.resolve(name, tokenizer)
    rendered = chat_templates.render(CONVERSATION, template, tokenizer)
    answers = [message["content"] for message in CONVERSATION if message["role"] == "assistant"]
    turn_end = template.turn_end
    for (start, end), answer in zip(rendered.answers, answers, strict=True):
        decoded = tokenizer.decode(rendered.input_ids[start:end])
        assert decoded.strip().startswith(answer)
        # A template whose markers are not the tokenizer's special tokens may merge the end of
        # turn with the next character into one token: the end is in the span all the same.
        assert turn_end in decoded[len(answer) :]
    assert "Answer in one short sentence." in rendered.prompt


def test_the_tokenizers_own_template_matches_apply_chat_template(tokenizer) -> None:
    template = chat_templates.resolve("tokenizer", tokenizer)
    expected = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert template.render(CONVERSATION[:3], tokenizer) == expected
    assert template.turn_end == "<|im_end|>"


def test_templates_from_a_file_and_inline(tmp_path: Path, tokenizer) -> None:
    source = chat_templates.NAMED_TEMPLATES["chatml"]
    path = tmp_path / "mine.jinja"
    path.write_text(source)
    assert chat_templates.resolve(str(path), tokenizer).source == source
    assert chat_templates.resolve(source, tokenizer).name == "inline"


def test_unusable_templates_are_clear_errors(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(chat_templates.TemplateError, match=r"'alpaca' is not a template.*chatml"):
        chat_templates.resolve("alpaca", tokenizer)
    with pytest.raises(chat_templates.TemplateError, match=r"cannot read .*missing\.jinja"):
        chat_templates.resolve(str(tmp_path / "missing.jinja"), tokenizer)
    broken = "{% for m in messages %}{{ m.content }"
    with pytest.raises(chat_templates.TemplateError, match="chat template inline"):
        chat_templates.resolve(broken, tokenizer)


def test_a_template_that_renders_earlier_turns_differently_is_refused(tokenizer) -> None:
    # Marks the last turn, so the start of a conversation depends on what follows it.
    source = "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %}!{% endif %}\n"
    template = chat_templates.resolve(source + "{% endfor %}", tokenizer)
    with pytest.raises(chat_templates.TemplateError, match="cannot be located"):
        chat_templates.render(CONVERSATION, template, tokenizer)


def test_a_tokenizer_without_a_template_needs_one_named(tokenizer) -> None:
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(chat_templates.TemplateError, match="no chat template of its own"):
        chat_templates.resolve("tokenizer", bare)
