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
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import PreTrainedModel

from llama_tune.errors import UserError, first_line
from llama_tune.jsonfiles import write_json
from llama_tune.run_folder import ADAPTER, CHECKPOINTS
from llama_tune.runtime import holds_weights
from llama_tune.schema import Recipe, resume_keys

STATE_FILE = "state.json"
FULL_WEIGHTS = "model.safetensors"
EXTRA_WEIGHTS = "extras.safetensors"
RNG_FILE = "rng.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
    """Step of the adapter in best/ (validation.best_metric)."""
    best_value: float | None = None
    """Its value of validation.best_metric."""
    loss_scale: dict[str, Any] | None = None
    """fp16's dynamic loss scale (`Layout.loss_scale`: a GradScaler's state, or DeepSpeed's
    scale and counters): resumed at its initial scale, the next steps would overflow and be
    skipped. None without one (fp32, bf16)."""
    recipe_hash: str = ""
    data_hash: str = ""
    """`data.fingerprint` of the training examples ("": a checkpoint from before it was kept):
    resuming on rows that changed would draw other steps than the run's."""
    processes: int = 0
    """Processes of the run that saved it (0: a checkpoint from before this was kept): each
    step's rows and the RNG states are dealt among them."""


def resume_values(recipe: Recipe) -> dict[str, Any]:
    """The values of the keys a checkpoint depends on (`schema.resume_keys`) in a recipe."""
    dumped = recipe.model_dump(mode="json")
    values = {}
    for key in resume_keys():
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
    return [key for key in resume_keys() if before[key] != after[key]]


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
    """This process's random number generators (Python, NumPy, torch), to save with a checkpoint.

    Only tuples, lists, numbers, strings and tensors: the weights-only loader reads them back
    without unpickling anything that could run code.
    """
    kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(numpy.int64)),
            position,
            has_gauss,
            cached_gaussian,
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This process's own GPU only: a resume may see fewer GPUs (another node, another
        # CUDA_VISIBLE_DEVICES), and each process draws on its own device alone.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(process_rng_states: list[dict[str, Any]], process_index: int) -> None:
    """Set this process's random number generators to those a checkpoint saved for it."""
    # On more processes than saved them the extra ones reuse states: only the same count of
    # processes resumes exactly (the data is sharded by it too).
    states = process_rng_states[process_index % len(process_rng_states)]
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    # Checkpoints before the weights-only format held the keys as a NumPy array.
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else numpy.asarray(keys)
    numpy.random.set_state((kind, keys.astype(numpy.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if isinstance(cuda, list | tuple):
            # Checkpoints before one GPU's state held every visible GPU's: this one's, if saved.
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _numpy_array_globals() -> list[Any]:
    """What unpickling a NumPy array needs, and nothing that can run other code: RNG states of
    checkpoints written before the weights-only format held one."""
    array = numpy.zeros(1, dtype=numpy.uint32)
    return [array.__reduce__()[0], numpy.ndarray, numpy.dtype, type(array.dtype)]


def read_rng_file(path: Path) -> list[dict[str, Any]]:
    """Every process's RNG states from a checkpoint's rng.pt, by process index."""
    with torch.serialization.safe_globals(_numpy_array_globals()):
        process_rng_states = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(process_rng_states, dict):
        # Written before checkpoints kept one state per process: the main process's.
        process_rng_states = [process_rng_states]
    return process_rng_states


@dataclass
class Trained:
    """What a checkpoint saves of the trained parameters."""

    model: PeftModel | PreTrainedModel
    weights: dict[str, torch.Tensor] | None
    """The model's trained weights gathered from a sharded model; None: the model's own."""
    extras: dict[str, torch.Tensor]
    """Trained parameters outside the model (a distillation projection, say)."""
    optimizer: dict[str, Any]
    """The optimizer's state dict, keyed by parameter index."""


def save(
    run_dir: Path,
    trained: Trained,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    keep_last: int,
    process_rng_states: list[dict[str, Any]],
) -> Path:
    """Write a checkpoint atomically and keep only the newest `keep_last`; returns its folder.

    `process_rng_states` holds `rng_states()` of every process, by process index: each draws
    its own noise (dropout, NEFTune) on its own batches.
    """
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_folder(state.step)
    staging = root / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model = trained.model
        if isinstance(model, PeftModel):
            model.save_pretrained(staging / ADAPTER, state_dict=trained.weights)
        else:
            staging.mkdir(parents=True)
            # Tied weights (embeddings and head) are stored once; loading restores the tie.
            if trained.weights is None:
                save_model(model, str(staging / FULL_WEIGHTS))
            else:
                tensors = {name: value.contiguous() for name, value in trained.weights.items()}
                save_file(tensors, staging / FULL_WEIGHTS)
        if trained.extras:
            tensors = {name: value.contiguous() for name, value in trained.extras.items()}
            save_file(tensors, staging / EXTRA_WEIGHTS)
        torch.save(trained.optimizer, staging / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), staging / SCHEDULER_FILE)
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


class CheckpointError(UserError):
    """A checkpoint file that cannot be read (truncated, missing, or not what it claims)."""


@dataclass
class SavedCheckpoint:
    """A checkpoint read from disk and checked, not yet applied to the model and optimizer."""

    folder: Path
    state: TrainState
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    process_rng_states: list[dict[str, Any]]


def _weights_files(folder: Path, full_model: bool, extras: bool) -> list[Path]:
    files = [folder / FULL_WEIGHTS] if full_model else [folder / ADAPTER / ADAPTER_WEIGHTS]
    return files + ([folder / EXTRA_WEIGHTS] if extras else [])


def read(folder: Path, full_model: bool, extras: bool) -> SavedCheckpoint:
    """Read and check every file of a checkpoint; CheckpointError names the first bad one.

    Weights are only opened here (their headers checked against their sizes); `restore` reads
    them. Nothing is unpickled beyond tensors and plain containers (`weights_only`).
    """
    path = folder / STATE_FILE
    try:
        state = TrainState(**json.loads(path.read_text()))
        for path in _weights_files(folder, full_model, extras):
            with safe_open(path, framework="pt"):
                pass
        path = folder / OPTIMIZER_FILE
        # Onto the CPU: a GPU run's tensors would otherwise all go back to the GPU that saved
        # them (every process's copy on GPU 0), or fail on a machine without one. The
        # optimizer's load_state_dict moves them to its parameters' devices.
        optimizer = torch.load(path, weights_only=True, map_location="cpu")
        path = folder / SCHEDULER_FILE
        scheduler = torch.load(path, weights_only=True, map_location="cpu")
        path = folder / RNG_FILE
        process_rng_states = read_rng_file(path)
    except Exception as error:  # json, safetensors and pickle each raise their own types
        raise CheckpointError(f"{path}: unreadable ({first_line(error)})") from None
    return SavedCheckpoint(folder, state, optimizer, scheduler, process_rng_states)


def restore_weights(
    saved: SavedCheckpoint,
    model: PeftModel | PreTrainedModel | None,
    extras: dict[str, torch.nn.Parameter] | None = None,
) -> None:
    """Put a read checkpoint's trained weights into the model (before it is prepared or
    sharded; None: the layout puts them in), and `extras`, trained parameters outside it. A
    model without weights (the meta device) is left alone: it receives them from the main
    process."""
    folder = saved.folder
    if model is not None and not holds_weights(model):
        return
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(folder / ADAPTER / ADAPTER_WEIGHTS))
    elif model is not None:
        load_model(model, str(folder / FULL_WEIGHTS))
    if extras:
        with torch.no_grad():
            for name, value in load_file(folder / EXTRA_WEIGHTS).items():
                extras[name].copy_(value)


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
