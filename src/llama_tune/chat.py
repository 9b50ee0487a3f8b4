"""`llama-tune chat`: talk to a run's model, or a recipe's base model, to see what it says.

The conversation is rendered with the recipe's chat template (the tokenizer's own when the
recipe names none) and its system prompt, exactly as training rendered its rows, and answered
greedily up to `evaluation.max_new_tokens`, stopping at the template's end of turn.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from llama_tune import chat_templates, evaluation, models
from llama_tune.inference import autocast_for, generate
from llama_tune.runtime import resolve_precision

RESET = "/reset"
"""Typed alone in an interactive session, starts the conversation afresh."""


class Conversation:
    """A model, its tokenizer and template, and the turns so far."""

    def __init__(self, target: str | Path, overrides: list[str]) -> None:
        resolved = evaluation.resolve_target(target, overrides)
        recipe = resolved.recipe
        self.precision = resolve_precision(recipe.train.precision)
        self.settings = recipe.evaluation
        self.tokenizer = models.load_tokenizer(recipe.model.name, recipe.model.revision)
        choice = recipe.data.chat.template or chat_templates.TOKENIZER
        self.template = chat_templates.resolve(choice, self.tokenizer)
        self.system_prompt = recipe.data.chat.system_prompt
        self.model = evaluation.main_system(resolved, self.precision).model
        self.model.eval()
        self.turns: list[chat_templates.Message] = []
        self.reset()

    def reset(self) -> None:
        self.turns = []
        if self.system_prompt is not None:
            self.turns.append({"role": "system", "content": self.system_prompt})

    def answer(self, question: str) -> str:
        """The model's answer to `question` after the turns so far; both join the turns."""
        self.turns.append({"role": "user", "content": question})
        text = self.template.render(self.turns, self.tokenizer, add_generation_prompt=True)
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        stops = self.template.stop_strings(self.tokenizer)
        with autocast_for(self.model, self.precision):
            reply = generate(self.model, self.tokenizer, [prompt], self.settings, stops)[0]
        self.turns.append({"role": "assistant", "content": reply})
        return reply


def interactive(conversation: Conversation, lines: Iterable[str], out: TextIO) -> None:
    """Answer each line read until the input ends; `/reset` starts afresh."""
    print(f"chatting ({RESET} starts afresh; end the input to stop)", file=out)
    for line in lines:
        question = line.strip()
        if not question:
            continue
        if question == RESET:
            conversation.reset()
            print("(conversation reset)", file=out)
            continue
        print(f"assistant: {conversation.answer(question)}", file=out, flush=True)
