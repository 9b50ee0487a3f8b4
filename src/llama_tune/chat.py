"""`llama-tune chat`: talk to a run's model, or a recipe's base model, to see what it says.

Messages are prompted as training rendered its rows. Conversations (messages, ShareGPT, alpaca
rows) are rendered with the recipe's chat template (the tokenizer's own when the recipe names
none) and its system prompt, the turns so far included. A run trained on one prompt per row
(task rows, prompt/completion, plain text) never saw a conversation: each message is filled
into the task template as the row's input, the way evaluation prompts the run, on its own (a
user turn of the chat template after the system prompt where the recipe names one). Answers
are greedy up to `evaluation.max_new_tokens` and stop where training's targets ended (the
template's end of turn; a plain template's line end where answers are one line).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from llama_tune import chat_templates, data, evaluation, models, run_folder
from llama_tune.inference import autocast_for, generate
from llama_tune.jsonfiles import read_json
from llama_tune.runtime import resolve_precision

RESET = "/reset"
"""Typed alone in an interactive session, starts the conversation afresh."""

SINGLE_PROMPTS = (
    "this recipe trains on one prompt per row, not conversations: each message is filled into "
    "its task template, without history"
)
"""Said once at the start of a session whose run (or recipe) trains on single prompts."""


class Conversation:
    """A model, its tokenizer, the way its training rows were prompted, and the turns so far."""

    def __init__(self, target: str | Path, overrides: list[str]) -> None:
        resolved = evaluation.resolve_target(target, overrides)
        recipe = resolved.recipe
        self.precision = resolve_precision(recipe.train.precision)
        self.settings = recipe.evaluation
        self.tokenizer = models.load_tokenizer(recipe.model.name, recipe.model.revision)
        self.formatter = _training_formatter(resolved)
        self.template = self.formatter.chat_template(self.tokenizer)
        self.stop_strings = self.formatter.stop_strings(self.tokenizer)
        if self.single_prompts:
            self.formatter.text_fields("")  # a template it cannot fill stops before the model loads
        self.system_prompt = recipe.data.chat.system_prompt
        self.model = evaluation.main_system(resolved, self.precision).model
        self.model.eval()
        self.turns: list[chat_templates.Message] = []
        self.reset()

    @property
    def single_prompts(self) -> bool:
        """Whether training saw one prompt per row, not conversations: each message then fills
        the task template on its own, since the model never saw a conversation."""
        return not self.formatter.conversational

    def reset(self) -> None:
        self.turns = []
        if self.system_prompt is not None:
            self.turns.append({"role": "system", "content": self.system_prompt})

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt that asks `question` as training prompted its rows: the task template
        filled with it, or the conversation so far with it as the next user turn."""
        if self.single_prompts:
            return self.formatter.prompt_ids(self.formatter.text_fields(question), self.tokenizer)
        assert self.template is not None
        turns = [*self.turns, {"role": "user", "content": question}]
        text = self.template.render(turns, self.tokenizer, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, question: str) -> str:
        """The model's answer to `question`; in a conversation both join the turns."""
        prompt = self.prompt_ids(question)
        with autocast_for(self.model, self.precision):
            reply = generate(
                self.model, self.tokenizer, [prompt], self.settings, self.stop_strings
            )[0]
        if not self.single_prompts:
            self.turns.append({"role": "user", "content": question})
            self.turns.append({"role": "assistant", "content": reply})
        return reply


def _training_formatter(resolved: evaluation.Target) -> data.TaskFormatter:
    """The formatter evaluation scores the run with: its label set, its rows' format. A run
    folder's summary recorded both, so chat needs no data where the run was copied to; a
    recipe's base model reads them from the training rows."""
    recorded = None
    summary = resolved.run_dir / run_folder.SUMMARY
    if resolved.weights_dir is not None and summary.is_file():
        recorded = read_json(summary).get("data")
    if not isinstance(recorded, dict) or "labels" not in recorded:
        labels = data.label_set(resolved.recipe.data)
    else:
        labels = recorded["labels"]
    formatter = data.TaskFormatter(resolved.recipe.data, labels, strict_labels=False)
    if formatter.row_format is None and isinstance(recorded, dict):
        # Summaries written before the row format was recorded have none: read the rows then.
        formatter.row_format = recorded.get("splits", {}).get("train", {}).get("format")
    data.adopt_training_format(formatter)
    return formatter


def interactive(conversation: Conversation, lines: Iterable[str], out: TextIO) -> None:
    """Answer each line read until the input ends; `/reset` starts afresh."""
    print(f"chatting ({RESET} starts afresh; end the input to stop)", file=out)
    if conversation.single_prompts:
        print(f"({SINGLE_PROMPTS})", file=out)
    for line in lines:
        question = line.strip()
        if not question:
            continue
        if question == RESET:
            conversation.reset()
            print("(conversation reset)", file=out)
            continue
        print(f"assistant: {conversation.answer(question)}", file=out, flush=True)
