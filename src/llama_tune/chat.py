"""`llama-tune chat`: talk to a run's model, or a recipe's base model, to see what it says.

Messages are prompted as training rendered its rows. Conversations, and rows rendered with a
chat template, are rendered with the recipe's chat template (the tokenizer's own for
conversations when the recipe names none) and its system prompt, the turns so far included.
A run trained on plain prompts (a task template, no chat template) never saw a conversation:
each message is filled into the task template as the row's input, the way evaluation prompts
the run, on its own. Answers are greedy up to `evaluation.max_new_tokens` and stop where
training's targets ended (the template's end of turn, or a plain template's line end).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from llama_tune import chat_templates, data, evaluation, models
from llama_tune.inference import autocast_for, generate
from llama_tune.runtime import resolve_precision

RESET = "/reset"
"""Typed alone in an interactive session, starts the conversation afresh."""

PLAIN_PROMPTS = (
    "this recipe trains on plain prompts, no chat template: each message is filled into its "
    "task template, without history"
)
"""Said once at the start of a session whose run (or recipe) has no chat template."""


class Conversation:
    """A model, its tokenizer, the way its training rows were prompted, and the turns so far."""

    def __init__(self, target: str | Path, overrides: list[str]) -> None:
        resolved = evaluation.resolve_target(target, overrides)
        recipe = resolved.recipe
        self.precision = resolve_precision(recipe.train.precision)
        self.settings = recipe.evaluation
        self.tokenizer = models.load_tokenizer(recipe.model.name, recipe.model.revision)
        # The formatter evaluation scores the run with: its label set, its rows' format.
        labels = data.label_set(recipe.data)
        self.formatter = data.TaskFormatter(recipe.data, labels, strict_labels=False)
        data.adopt_training_format(self.formatter)
        self.template = self.formatter.chat_template(self.tokenizer)
        self.stop_strings = self.formatter.stop_strings(self.tokenizer)
        if self.plain:
            self.formatter.text_fields("")  # a template it cannot fill stops before the model loads
        self.system_prompt = recipe.data.chat.system_prompt
        self.model = evaluation.main_system(resolved, self.precision).model
        self.model.eval()
        self.turns: list[chat_templates.Message] = []
        self.reset()

    @property
    def plain(self) -> bool:
        """Whether training saw plain prompts (no chat template): each message then fills the
        task template on its own, since the model never saw a conversation."""
        return self.template is None

    def reset(self) -> None:
        self.turns = []
        if self.system_prompt is not None:
            self.turns.append({"role": "system", "content": self.system_prompt})

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt that asks `question` as training prompted its rows: the task template
        filled with it, or the conversation so far with it as the next user turn."""
        if self.template is None:
            return self.formatter.prompt_ids(self.formatter.text_fields(question), self.tokenizer)
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
        if not self.plain:
            self.turns.append({"role": "user", "content": question})
            self.turns.append({"role": "assistant", "content": reply})
        return reply


def interactive(conversation: Conversation, lines: Iterable[str], out: TextIO) -> None:
    """Answer each line read until the input ends; `/reset` starts afresh."""
    print(f"chatting ({RESET} starts afresh; end the input to stop)", file=out)
    if conversation.plain:
        print(f"({PLAIN_PROMPTS})", file=out)
    for line in lines:
        question = line.strip()
        if not question:
            continue
        if question == RESET:
            conversation.reset()
            print("(conversation reset)", file=out)
            continue
        print(f"assistant: {conversation.answer(question)}", file=out, flush=True)
