"""Chat templates: choosing one, and rendering a conversation with its assistant tokens located.

A template is the tokenizer's own, a named one written here, a Jinja file or an inline Jinja
string. The loss mask is read from the rendered conversation itself: the conversation up to an
assistant turn, rendered with the generation prompt, must be the start of the conversation
rendered through that turn; the characters between the two are that turn's answer. The tokens
of the whole rendering that start inside an answer carry the loss. This holds for any template
that renders a conversation's start the same way whatever follows (every template here does);
one that does not is refused with an error rather than masked wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from llama_tune.errors import UserError

Message = dict[str, str]

# Each named template renders system, user and assistant turns the way its model family was
# trained; families without a system role fold the system text into the first user turn.
_FOLD_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
)
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    ),
    "llama-3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{{- message['content'] | trim -}}{{ '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{%- endif -%}"
    ),
    "mistral": (
        _FOLD_SYSTEM + "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set content = system + '\n\n' + message['content'] if loop.first and system "
        "else message['content'] -%}"
        "{{ '[INST] ' + content | trim + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + message['content'] | trim + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "gemma": (
        _FOLD_SYSTEM + "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{%- set content = system + '\n\n' + message['content'] if loop.first and system "
        "else message['content'] -%}"
        "{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
    ),
    "zephyr": (
        "{%- for message in messages -%}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
    ),
}
TOKENIZER = "tokenizer"
"""The recipe value that picks the tokenizer's own template."""
_ANSWER = "\u2063answer\u2063"
"""A stand-in answer (invisible separators around a word) for finding the template's turn end."""


class TemplateError(UserError):
    """A chat template that is missing, unreadable or cannot locate the assistant's turns."""


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: its Jinja text, what the recipe called it, and what it puts after
    an answer."""

    name: str
    source: str
    turn_end: str = ""
    """The text after an assistant's answer ('<|im_end|>' in chatml), found once when the
    template is resolved: it ends a generated answer and follows a single-turn target."""

    def render(
        self,
        messages: list[Message],
        tokenizer: PreTrainedTokenizerBase,
        add_generation_prompt: bool = False,
    ) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages,
                chat_template=self.source,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as error:  # jinja2 raises template, undefined and runtime errors
            raise TemplateError(f"chat template {self.name}: {error}") from None

    def _rendered_turn_end(self, tokenizer: PreTrainedTokenizerBase) -> str:
        conversation = [{"role": "user", "content": "question"}]
        conversation.append({"role": "assistant", "content": _ANSWER})
        rendered = self.render(conversation, tokenizer)
        if _ANSWER not in rendered:
            raise TemplateError(f"chat template {self.name} does not render the assistant turn")
        return rendered.split(_ANSWER, 1)[1].rstrip()

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Where a generated answer ends besides the end-of-sequence token: the end of turn,
        unless it is that token."""
        return [] if self.turn_end in ("", tokenizer.eos_token) else [self.turn_end]


def last_answer(messages: list[Message]) -> int:
    """The index of a conversation's last assistant turn."""
    return max(index for index, message in enumerate(messages) if message["role"] == "assistant")


def resolve(choice: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """The template `data.chat.template` names: the tokenizer's own, a named one, a Jinja file
    (a path ending in .jinja or .j2), or an inline Jinja string; a template that cannot render
    an answer stops here, before any row."""
    template = ChatTemplate(*_named_source(choice, tokenizer))
    return replace(template, turn_end=template._rendered_turn_end(tokenizer))


def _named_source(choice: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(name, Jinja text) of the template `choice` names."""
    if choice == TOKENIZER:
        if not tokenizer.chat_template:
            named = ", ".join(NAMED_TEMPLATES)
            raise TemplateError(
                "the tokenizer has no chat template of its own; set data.chat.template to a "
                f"named template ({named}), a .jinja file or an inline Jinja string"
            )
        return TOKENIZER, tokenizer.chat_template
    if choice in NAMED_TEMPLATES:
        return choice, NAMED_TEMPLATES[choice]
    if "{{" in choice or "{%" in choice:
        return "inline", choice
    path = Path(choice).expanduser()
    if path.suffix in (".jinja", ".j2"):
        try:
            return str(path), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise TemplateError(f"data.chat.template: cannot read {path}: {error}") from None
    named = ", ".join([TOKENIZER, *NAMED_TEMPLATES])
    raise TemplateError(
        f"data.chat.template: {choice!r} is not a template: use one of {named}, a .jinja file "
        "or an inline Jinja string"
    )


@dataclass
class RenderedConversation:
    """A conversation as token ids, with the token span [start, end) of each assistant turn."""

    prompt: str
    """The rendering up to the last answer: what a model answers when it is asked."""
    input_ids: list[int]
    answers: list[tuple[int, int]]


def _answer_characters(
    messages: list[Message], template: ChatTemplate, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, list[tuple[int, int]]]:
    """The rendering through the last assistant turn, and each assistant turn's character span
    in it (the answer and the template's end of turn, without the whitespace after it)."""
    last = last_answer(messages)
    text = template.render(messages[: last + 1], tokenizer)
    spans = []
    for index, message in enumerate(messages[: last + 1]):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:index], tokenizer, add_generation_prompt=True)
        through = template.render(messages[: index + 1], tokenizer).rstrip()
        if not (through.startswith(before) and text.startswith(through)):
            raise TemplateError(
                f"chat template {template.name} renders the start of a conversation differently "
                "depending on what follows, so the assistant turns cannot be located; use "
                "another data.chat.template"
            )
        spans.append((len(before), len(through)))
    return text[: spans[-1][1]], spans


def render(
    messages: list[Message], template: ChatTemplate, tokenizer: PreTrainedTokenizerBase
) -> RenderedConversation:
    """Token ids of the conversation through its last assistant turn, and the assistant turns'
    token spans: the tokens that start inside an answer's characters."""
    text, spans = _answer_characters(messages, template, tokenizer)
    if not tokenizer.is_fast:
        raise TemplateError("chat data needs a fast tokenizer (one that reports token offsets)")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoded["offset_mapping"]]
    answers = []
    for first_char, end_char in spans:
        inside = [token for token, start in enumerate(starts) if first_char <= start < end_char]
        if not inside:
            raise TemplateError(f"chat template {template.name} renders an empty assistant turn")
        answers.append((inside[0], inside[-1] + 1))
    prompt = text[: spans[-1][0]]
    return RenderedConversation(
        prompt=prompt, input_ids=list(encoded["input_ids"]), answers=answers
    )
