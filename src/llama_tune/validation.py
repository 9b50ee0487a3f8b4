"""Task metrics during training, and keeping the adapter that scored best.

Eval loss says little about what a user ships: a summariser's loss can fall while its ROUGE
stalls. So at every eval the trainer can also score a fixed validation subset with the task's own
metric (label likelihood for classification, decoding for generation tasks), and keep the adapter
that did best on a chosen metric in `<run>/best/`, with `best.json` saying which step and value.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from llama_tune import schema, scoring
from llama_tune.errors import UserError
from llama_tune.jsonfiles import read_json, write_json
from llama_tune.run_folder import BEST, BEST_FILE

EVAL_LOSS = "eval_loss"


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` beats the best so far; loss falls, every task metric rises."""
    if best is None:
        return True
    return value < best if metric == EVAL_LOSS else value > best


@dataclass
class MetricProbe:
    """The fixed validation subset that is scored with the task metric at every eval."""

    recipe: schema.Recipe
    tokenizer: PreTrainedTokenizerBase
    eval_set: scoring.EvalSet
    precision: str

    @classmethod
    def load(
        cls, recipe: schema.Recipe, tokenizer: PreTrainedTokenizerBase, precision: str
    ) -> MetricProbe:
        """Read the first `validation.metric_rows` usable rows of the validation split."""
        # Recipe validation guarantees a validation split whenever metric_rows is set.
        split, rows = recipe.data.splits.validation, recipe.validation.metric_rows
        assert split is not None
        eval_set = scoring.load_eval_set(recipe, tokenizer, split, rows)
        problem = scoring.unscorable(eval_set)
        if problem is not None:
            raise UserError(f"validation.metric_rows: {problem}")
        return cls(recipe, tokenizer, eval_set, precision)

    def score(self, model: PeftModel, synced: bool) -> dict[str, float]:
        """`eval_<metric>` point values of the model on the subset; leaves it in eval mode.

        Every process of a launched run must call it: each predicts its share of the rows and
        all get every value (`synced`: see `scoring.predict`).
        """
        examples = [dataclasses.replace(example) for example in self.eval_set.examples]
        scored = dataclasses.replace(self.eval_set, examples=examples)
        scoring.predict(
            model, self.tokenizer, self.recipe, scored, self.precision, shared=True, synced=synced
        )
        values = scoring.point_values(scoring.measure(scored, self.recipe.data.task), len(examples))
        return {f"eval_{name}": value for name, value in values.items()}


def save_best(
    run_dir: Path,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    step: int,
    metric: str,
    value: float,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Replace `<run>/best/` with the current adapter (`weights`, gathered from a sharded
    model, or the model's own); a crash never leaves half an adapter."""
    final = run_dir / BEST
    staging = run_dir / f".tmp-{BEST}"
    retired = run_dir / f".old-{BEST}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, state_dict=weights)
    tokenizer.save_pretrained(staging)
    write_json(staging / BEST_FILE, {"step": step, "metric": metric, "value": value})
    shutil.rmtree(retired, ignore_errors=True)
    if final.exists():
        os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)
    return final


def best_record(run_dir: Path) -> dict | None:
    """What `<run>/best/best.json` says (step, metric, value), if the run kept a best adapter."""
    path = run_dir / BEST / BEST_FILE
    return read_json(path) if path.is_file() else None
