"""The run folder: the name of everything a run writes, in one place.

    runs/NAME/
      recipe.yaml          the resolved recipe; resume and evaluate read it
      summary.json         status, data statistics, steps, timings, library versions
      metrics.jsonl        one line per training log and per evaluation
      adapter/ | model/    the trained weights: a LoRA adapter, or the whole model
      best/                the weights that scored best on validation.best_metric (best.json inside)
      checkpoints/step-N/  resumable state
      student-init/        a student built from the teacher, before training
      teacher-cache/       the teacher's top-k distributions (offline distillation)
      evaluation/SPLIT/    results.json, predictions, report.md and report.html
      evaluation/lm-eval/  lm-evaluation-harness results.json and report.md (its table)

Every other module takes these names from here: none is typed twice.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llama_tune.errors import UserError

RECIPE_COPY = "recipe.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
FULL_MODEL = "model"
BEST = "best"
BEST_FILE = "best.json"
CHECKPOINTS = "checkpoints"
STUDENT_INIT = "student-init"
TEACHER_CACHE = "teacher-cache"
EVALUATION = "evaluation"
RESULTS = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LM_EVAL = "lm-eval"
"""evaluation/lm-eval/: lm-evaluation-harness results of the run's model (`llama-tune lm-eval`)."""


def weights_folder(run_dir: Path, full_fine_tuning: bool) -> Path:
    """Where a run's trained weights go: adapter/ (LoRA) or model/ (full fine-tuning)."""
    return run_dir / (FULL_MODEL if full_fine_tuning else ADAPTER)


def evaluation_folder(run_dir: Path, split: str, best: bool) -> Path:
    """Where `llama-tune evaluate` writes the results of one split (of best/ with `best`)."""
    return run_dir / EVALUATION / (f"{split}-best" if best else split)


def evaluates_best(evaluation_dir: Path) -> bool:
    """Whether an evaluation folder holds the results of best/ rather than the final weights."""
    return evaluation_dir.name.endswith(f"-{BEST}")


def is_run_folder(folder: Path) -> bool:
    """Whether a folder was written by llama-tune: a run's recipe copy, summary or checkpoints,
    or what comes before training: a teacher cache (`llama-tune distill cache`), the base
    model's scores (`llama-tune evaluate RECIPE`)."""
    marks = (RECIPE_COPY, SUMMARY, CHECKPOINTS, TEACHER_CACHE, EVALUATION)
    return any((folder / name).exists() for name in marks)


def holds_something(folder: Path) -> bool:
    """Whether `folder` exists as a file or a non-empty folder: where new output (an export, a
    dry run's repository folder) would replace or mix with what is there."""
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def check_can_create(folder: Path, key: str) -> None:
    """Stop before any work when `folder` (named by `key`) could not be made or written: a file
    on its path, or a folder this user cannot write in."""
    existing = next(path for path in (folder, *folder.parents) if path.exists() or path == Path())
    if not existing.is_dir():
        raise UserError(f"{key} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key} {folder}: this user cannot write in {existing}")


def check_ours(run_dir: Path) -> None:
    """Refuse to train into an existing folder that holds something other than a run, or into
    one that cannot be made."""
    check_can_create(run_dir, "output.dir")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_folder(run_dir):
        raise UserError(
            f"output.dir {run_dir} is not empty and is not a llama-tune run folder (no "
            f"{RECIPE_COPY}, {SUMMARY}, {CHECKPOINTS}/, {TEACHER_CACHE}/ or {EVALUATION}/); "
            "nothing was changed. Choose another output.dir"
        )


def _aside(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.replaced")


def set_aside(run_dir: Path) -> Path | None:
    """Move the run that `--overwrite` replaces out of the way, keeping it whole until the new
    run has started (`discard`) or failed to (`put_back`). The teacher cache, expensive and
    checked against the recipe when used, moves into the new run folder."""
    if not run_dir.exists():
        return None
    aside = _aside(run_dir)
    if aside.exists():
        raise UserError(
            f"{aside} holds the run an interrupted --overwrite of {run_dir} was replacing; "
            "move it back or delete it, then try again"
        )
    os.replace(run_dir, aside)
    run_dir.mkdir()
    if (aside / TEACHER_CACHE).is_dir():
        os.replace(aside / TEACHER_CACHE, run_dir / TEACHER_CACHE)
    return aside


def put_back(run_dir: Path, aside: Path) -> None:
    """Undo `set_aside` after a failed start: the replaced run is back as it was."""
    if (run_dir / TEACHER_CACHE).is_dir():
        os.replace(run_dir / TEACHER_CACHE, aside / TEACHER_CACHE)
    shutil.rmtree(run_dir)
    os.replace(aside, run_dir)


def discard(aside: Path) -> None:
    """Delete the replaced run once the new one has written its first files."""
    shutil.rmtree(aside)


def remove_failed_start(run_dir: Path) -> None:
    """After a start that failed, remove what it wrote into a folder it created, so no empty
    run folder is left; a teacher cache it built is kept (it costs a teacher pass)."""
    shutil.rmtree(run_dir / STUDENT_INIT, ignore_errors=True)
    if run_dir.is_dir() and not (run_dir / TEACHER_CACHE).exists():
        shutil.rmtree(run_dir)
