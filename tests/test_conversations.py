"""Row formats: detection on the shared instruction data, conversations, and bad-row reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import INSTRUCTION_FOLDERS
from llama_tune import conversations


def _first_row(folder: Path) -> dict:
    with (folder / "train.jsonl").open() as handle:
        return json.loads(handle.readline())


@pytest.mark.parametrize(("folder", "row_format"), INSTRUCTION_FOLDERS)
def test_each_shared_folder_is_detected(data_root: Path, folder: str, row_format: str) -> None:
    assert conversations.detect(_first_row(data_root / folder)) == row_format


def test_prompt_completion_and_unknown_rows() -> None:
    assert conversations.detect({"prompt": "a", "completion": "b"}) == "prompt_completion"
    with pytest.raises(ValueError, match="unknown_format"):
        conversations.detect({"question": "a", "answer": "b"})


def test_sharegpt_speakers_become_roles_and_the_system_prompt_goes_first(data_root: Path) -> None:
    row = _first_row(data_root / "instruction/sharegpt_dummy")
    messages = conversations.to_messages(row, "sharegpt", "Be kind.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be kind."
    assert messages[1]["content"] == row["conversations"][0]["value"]
    own_system = {"messages": [{"role": "system", "content": "Mine."}, *_chat("q", "a")]}
    assert conversations.to_messages(own_system, "messages", "Be kind.")[0]["content"] == "Mine."


def _chat(*texts: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(texts)]


def test_alpaca_joins_instruction_and_input_as_the_messages_copy_does(data_root: Path) -> None:
    folder = data_root / "instruction"
    alpaca = (folder / "alpaca_en_demo" / "train.jsonl").read_text().splitlines()
    chats = (folder / "alpaca_en_demo_messages" / "train.jsonl").read_text().splitlines()
    for alpaca_line, chat_line in zip(alpaca, chats, strict=True):
        expected = json.loads(chat_line)["messages"]
        assert conversations.to_messages(json.loads(alpaca_line), "alpaca", None) == expected


@pytest.mark.parametrize(
    ("row", "row_format", "reason"),
    [
        ({"conversations": []}, "messages", "missing_field:messages"),
        ({"messages": "hi"}, "messages", "wrong_type:messages"),
        ({"messages": []}, "messages", "empty_field:messages"),
        ({"messages": [{"role": "user"}]}, "messages", "missing_field:messages.content"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "unknown_role:bot"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "wrong_type:messages.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "url": "a.png"}]}]},
            "messages",
            "not_text:messages.content.image",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
            "messages",
            "wrong_type:messages.content.text",
        ),
        ({"messages": _chat("only a question")}, "messages", "no_assistant_turn"),
        ({"messages": _chat("q", "a")[::-1]}, "messages", "turns_out_of_order:messages"),
        ({"messages": _chat("q", " ")}, "messages", "empty_field:messages.assistant"),
        (
            {"messages": [*_chat("q", "a"), {"role": "system", "content": "x"}, *_chat("q", "a")]},
            "messages",
            "system_turn_not_first:messages",
        ),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "unknown_role:robot"),
        ({"instruction": "do", "input": 3, "output": "x"}, "alpaca", "wrong_type:input"),
        ({"instruction": "do", "output": ""}, "alpaca", "empty_field:output"),
    ],
)
def test_rows_that_do_not_fit_give_their_reason(row: dict, row_format: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}$"):
        conversations.to_messages(row, row_format, None)


def test_the_last_exchange_is_what_scoring_compares() -> None:
    messages = _chat("first?", "one", "second?", " two ", "unanswered?")
    assert conversations.last_exchange(messages) == {"prompt": "second?", "completion": "two"}


def test_content_given_as_text_parts_reads_as_the_same_conversation(data_root: Path) -> None:
    with (data_root / "instruction/alpaca_en_demo_messages/train.jsonl").open() as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(50), strict=False)]
    for row in rows:
        # Multimodal chat data writes each turn as a list of typed parts.
        parts = {
            "messages": [
                {"role": turn["role"], "content": [{"type": "text", "text": turn["content"][:7]}]}
                for turn in row["messages"]
            ]
        }
        for turn, original in zip(parts["messages"], row["messages"], strict=True):
            turn["content"].append({"type": "text", "text": original["content"][7:]})
        expected = conversations.to_messages(row, "messages", None)
        assert conversations.to_messages(parts, "messages", None) == expected
