"""Timing of a transformers Trainer (TRL's trainers) step by step, for the peer runs."""

from __future__ import annotations

import statistics
import time
from typing import Any

from transformers import Trainer, TrainerCallback


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step, and the input tokens of each batch the collator built."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.batch_tokens: list[int] = []

    def on_step_begin(self, *_args: object, **_kwargs: object) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, *_args: object, **_kwargs: object) -> None:
        self.step_seconds.append(time.perf_counter() - self.started)

    def measured(self, warmup: int) -> dict[str, float]:
        """Tokens and seconds of the steps after `warmup`; the dataloader may collate ahead, so
        only the batches of timed steps count."""
        tokens = sum(self.batch_tokens[warmup : len(self.step_seconds)])
        seconds = sum(self.step_seconds[warmup:])
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def measured_losses(trainer: Trainer, warmup: int) -> dict[str, Any]:
    """The logged loss of each step after `warmup` (logging every step), and their mean."""
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    losses = logged[warmup:]
    return {"losses": losses, "mean_loss": statistics.fmean(losses)}
