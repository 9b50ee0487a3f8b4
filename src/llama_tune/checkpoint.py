"""Atomic checkpoints, exact resume, and stopping cleanly on SIGTERM or Ctrl-C.

A checkpoint is written into a temporary folder and renamed into place, and `state.json` is its
last file, so a crash mid-save never leaves a folder that `latest()` would pick up. It holds the
adapter (or, in full fine-tuning, every weight), optimizer, scheduler, every process's RNG
states and the data position: resuming from it continues the run as if it had never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import PreTrainedModel

from llama_tune.config import Recipe

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
ADAPTER_FOLDER = "adapter"
FULL_WEIGHTS = "model.safetensors"
EXTRA_WEIGHTS = "extras.safetensors"
RNG_FILE = "rng.pt"

# Changing any of these between a run and its resume would make the saved state mean something
# else (another model or adapter shape, another data order or other perturbed copies of it);
# other keys (lr, max_steps, logging) may change.
RESUME_KEYS = (
    "model.name",
    "model.revision",
    "model.dtype",
    "model.quantization",
    "adapter.r",
    "adapter.alpha",
    "adapter.target_modules",
    "adapter.use_dora",
    "adapter.use_rslora",
    "data.source",
    "data.task",
    "data.splits",
    "data.fields",
    "data.template",
    "data.chat_template",
    "data.labels",
    "data.source_lang",
    "data.target_lang",
    "data.max_length",
    "data.truncation",
    "data.bad_rows",
    "data.max_train_rows",
    "train.batch_size",
    "train.grad_accumulation",
    "train.seed",
    "distill.teacher",
    "distill.student",
    "adversarial.augment",
)


@dataclass
class TrainState:
    """Where the loop is: enough, with the RNG states, to continue exactly."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    step_in_epoch: int = 0
    """Steps of the current epoch's plan already done."""
    nonfinite_steps: int = 0
    """Steps skipped because the loss was NaN or inf."""
    tokens: int = 0
    """Target tokens trained on so far."""
    best_step: int | None = None
    """Step of the adapter in best/ (train.best_metric)."""
    best_value: float | None = None
    """Its value of train.best_metric."""
    recipe_hash: str = ""


def resume_values(recipe: Recipe) -> dict[str, Any]:
    """The values of RESUME_KEYS in a recipe."""
    dumped = recipe.model_dump(mode="json")
    values = {}
    for key in RESUME_KEYS:
        node: Any = dumped
        for part in key.split("."):
            # A section set to null (adapter: null) has no keys below it.
            node = node.get(part) if isinstance(node, dict) else None
        values[key] = node
    return values


def recipe_hash(recipe: Recipe) -> str:
    """A hash of the resume-relevant part of a recipe."""
    text = json.dumps(resume_values(recipe), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_resume_keys(saved: Recipe, current: Recipe) -> list[str]:
    """Resume-relevant keys whose value differs between two recipes."""
    before, after = resume_values(saved), resume_values(current)
    return [key for key in RESUME_KEYS if before[key] != after[key]]


def _step_folder(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first; temporary and half-written folders are ignored."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if path.name.startswith("step-") and (path / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda path: path.name)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, if any."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def rng_states() -> dict[str, Any]:
    """This process's random number generators (Python, NumPy, torch), to save with a checkpoint."""
    states = {
        "python": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(folder: Path, process_index: int) -> None:
    """Set this process's random number generators to those a checkpoint saved for it."""
    # RNG states hold numpy and Python tuples, which the weights-only loader refuses.
    process_rng_states = torch.load(folder / RNG_FILE, weights_only=False)
    if isinstance(process_rng_states, dict):
        # Written before checkpoints kept one state per process: the main process's.
        process_rng_states = [process_rng_states]
    # On more processes than saved them the extra ones reuse states: only the same count of
    # processes resumes exactly (the data is sharded by it too).
    states = process_rng_states[process_index % len(process_rng_states)]
    random.setstate(states["python"])
    numpy.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(
    run_dir: Path,
    model: PeftModel | PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    keep_last: int,
    process_rng_states: list[dict[str, Any]],
    extras: dict[str, torch.nn.Parameter] | None = None,
) -> Path:
    """Write a checkpoint atomically and keep only the newest `keep_last`; returns its folder.

    `process_rng_states` holds `rng_states()` of every process, by process index: each draws
    its own noise (dropout, NEFTune) on its own batches. `extras` are trained parameters
    outside the model (a distillation projection, say).
    """
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_folder(state.step)
    staging = root / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if isinstance(model, PeftModel):
            model.save_pretrained(staging / ADAPTER_FOLDER)
        else:
            staging.mkdir(parents=True)
            # save_model stores tied weights (embeddings and head) once and restores the tie.
            save_model(model, str(staging / FULL_WEIGHTS))
        if extras:
            tensors = {name: value.detach().contiguous() for name, value in extras.items()}
            save_file(tensors, staging / EXTRA_WEIGHTS)
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(process_rng_states, staging / RNG_FILE)
        # state.json goes last: its presence marks the checkpoint complete.
        write_json(staging / STATE_FILE, asdict(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(
    folder: Path,
    model: PeftModel | PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    process_index: int,
    extras: dict[str, torch.nn.Parameter] | None = None,
) -> TrainState:
    """Restore trained weights, optimizer, scheduler and this process's RNG states."""
    if isinstance(model, PeftModel):
        adapter = load_file(folder / ADAPTER_FOLDER / "adapter_model.safetensors")
        set_peft_model_state_dict(model, adapter)
    else:
        load_model(model, str(folder / FULL_WEIGHTS))
    if extras:
        with torch.no_grad():
            for name, value in load_file(folder / EXTRA_WEIGHTS).items():
                extras[name].copy_(value)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    restore_rng(folder, process_index)
    return TrainState(**json.loads((folder / STATE_FILE).read_text()))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics, predictions), blank lines skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(staging, path)


class StopSignals:
    """Turns the first SIGTERM or SIGINT into a request to checkpoint and stop.

    The loop polls `requested` between steps; a second signal falls back to the default
    behaviour, so a stuck run can still be killed.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def exit_code(self) -> int:
        """128 + signal number: 143 for SIGTERM, 130 for SIGINT.

        A process stopping because another one got the signal reports SIGTERM.
        """
        return 128 + (self.requested or signal.SIGTERM)
