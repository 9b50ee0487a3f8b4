"""Row formats of instruction and chat data, and turning a row into a conversation.

Formats: `messages` (OpenAI / TRL: role and content), `sharegpt` (`conversations` with from
human / gpt / system and value), `alpaca` (instruction, optional input, output), `prompt_completion`
(a prompt and its answer, the instruction task's fields) and `text` (plain text: loss on every
token). A file's format is read from its first usable row unless the recipe names one; a row
that does not fit raises ValueError with the bad-row reason (`missing_field:messages`,
`unknown_role:bot`, ...), which the data pipeline counts or reports with the file and row.
"""

from __future__ import annotations

from typing import Any

from llama_tune.chat_templates import Message, last_answer

CONVERSATIONAL = ("messages", "sharegpt", "alpaca")
"""Formats that are conversations, rendered through a chat template."""
FORMATS = (*CONVERSATIONAL, "prompt_completion", "text")

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
"""ShareGPT speaker names as written by the common exports, and the role each one is."""


def detect(values: dict[str, Any]) -> str:
    """The format one row is written in; ValueError when it fits none."""
    if "messages" in values:
        return "messages"
    if "conversations" in values:
        return "sharegpt"
    if "instruction" in values and "output" in values:
        return "alpaca"
    if "prompt" in values and "completion" in values:
        return "prompt_completion"
    if "text" in values:
        return "text"
    raise ValueError("unknown_format")


def expected(row_format: str) -> str:
    """What a row of `row_format` must hold, for error messages."""
    return {
        "messages": "a 'messages' list of {role, content} turns, content a string or a list of "
        "text parts",
        "sharegpt": "a 'conversations' list of {from, value} turns",
        "alpaca": "'instruction' and 'output' texts (and optionally 'input')",
        "prompt_completion": "'prompt' and 'completion' texts",
        "text": "a 'text' string",
    }[row_format]


def _text(values: dict[str, Any], column: str, required: bool = True) -> str:
    value = values.get(column)
    if value is None:
        if required:
            raise ValueError(f"missing_field:{column}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"wrong_type:{column}")
    if required and not value.strip():
        raise ValueError(f"empty_field:{column}")
    return value


def _turns(values: dict[str, Any], column: str, role_key: str, text_key: str) -> list[Message]:
    """The turns of a `messages` or ShareGPT row with their roles as written."""
    turns = values.get(column)
    if turns is None:
        raise ValueError(f"missing_field:{column}")
    if not isinstance(turns, list):
        raise ValueError(f"wrong_type:{column}")
    if not turns:
        raise ValueError(f"empty_field:{column}")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f"wrong_type:{column}")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise ValueError(f"missing_field:{column}.{role_key}")
        messages.append({"role": role, "content": _turn_text(turn.get(text_key), column, text_key)})
    return messages


def _turn_text(content: Any, column: str, text_key: str) -> str:
    """A turn's text: a string, or a list of typed parts as multimodal chat data writes it
    ([{"type": "text", "text": ...}]), whose text parts are joined as Hugging Face's chat
    templates join them; a part that is not text (an image) makes the row unusable here."""
    if content is None:
        raise ValueError(f"missing_field:{column}.{text_key}")
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise ValueError(f"wrong_type:{column}.{text_key}")
    for part in content:
        if part.get("type") != "text":
            raise ValueError(f"not_text:{column}.{text_key}.{part.get('type')}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"wrong_type:{column}.{text_key}.text")
    return "".join(part["text"] for part in content)


def _checked(messages: list[Message], column: str) -> list[Message]:
    """The turns when they make a conversation to learn from: an optional system turn first,
    then user and assistant turns alternating from a user turn, at least one answer, and
    no empty answer."""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for index, message in enumerate(body):
        if message["role"] == "system":
            raise ValueError(f"system_turn_not_first:{column}")
        if message["role"] not in ("user", "assistant"):
            raise ValueError(f"unknown_role:{message['role']}")
        if message["role"] != ("user" if index % 2 == 0 else "assistant"):
            raise ValueError(f"turns_out_of_order:{column}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError(f"empty_field:{column}.assistant")
    if not any(message["role"] == "assistant" for message in body):
        raise ValueError("no_assistant_turn")
    return messages


def to_messages(
    values: dict[str, Any], row_format: str, system_prompt: str | None
) -> list[Message]:
    """The row as a conversation of role / content turns, the system prompt first unless the row
    has its own; ValueError with the bad-row reason when the row does not fit `row_format`."""
    if row_format == "messages":
        messages = _turns(values, "messages", "role", "content")
        column = "messages"
    elif row_format == "sharegpt":
        messages = _turns(values, "conversations", "from", "value")
        for message in messages:
            if message["role"] not in SHAREGPT_ROLES:
                raise ValueError(f"unknown_role:{message['role']}")
            message["role"] = SHAREGPT_ROLES[message["role"]]
        column = "conversations"
    elif row_format == "alpaca":
        instruction = _text(values, "instruction")
        extra = _text(values, "input", required=False).strip()
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(values, "output")},
        ]
        column = "output"
    else:
        raise AssertionError(f"{row_format} rows are not conversations")
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return _checked(messages, column)


def last_exchange(messages: list[Message]) -> dict[str, str]:
    """The last user turn and the answer to it, as the instruction task's fields (the text
    scoring shows and compares, and perturbations start from)."""
    last = last_answer(messages)
    return {
        "prompt": messages[last - 1]["content"],
        "completion": messages[last]["content"].strip(),
    }
