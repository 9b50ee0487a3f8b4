"""`llama-tune lm-eval`: standard benchmarks on a run's model with lm-evaluation-harness.

The run's trained model (its base wearing the adapter, or the fully tuned model) is handed to
the harness as it is, so the harness scores exactly what `evaluate` scores. Results go to the
run's evaluation folder (`evaluation/lm-eval/`: the harness's results.json and its table as
report.md), where `push` finds them for the model card. Each task's results join those of the
tasks scored before; a task scored again replaces its own. The harness is an optional extra:
`pip install 'llama-tune[lm-eval]'`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llama_tune import evaluation, models
from llama_tune.errors import UserError
from llama_tune.jsonfiles import read_json, write_json, write_text
from llama_tune.run_folder import EVALUATION, LM_EVAL, REPORT_MD, RESULTS
from llama_tune.runtime import model_device, resolve_precision


class HarnessError(UserError):
    """A harness run that cannot start: a bad option, the extra missing, an unknown task, no run."""


KEPT = ("results", "versions", "n-shot", "n-samples", "higher_is_better", "group_subtasks")
"""The parts of the harness's results kept in results.json: each maps a task (or group) to its
entry, so that the results of separate runs merge task by task; the table needs them all."""


def _kept(folder: Path) -> dict[str, dict[str, Any]]:
    """The harness results kept in `folder` so far (empty: none); a damaged file is a UserError
    naming it, so that no run writes over results it could not read."""
    path = folder / RESULTS
    if not path.is_file():
        return {part: {} for part in KEPT}
    kept = read_json(path)
    if not (
        isinstance(kept, dict)
        and "results" in kept
        and all(isinstance(kept.get(part, {}), dict) for part in KEPT)
    ):
        raise HarnessError(f"{path}: not results written by llama-tune lm-eval")
    return {part: kept.get(part, {}) for part in KEPT}


def _merged(kept: dict[str, dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """`kept` with the entries of this run's `results` added, each replacing its task's own."""
    return {part: {**kept[part], **(results.get(part) or {})} for part in KEPT}


def _check_options(tasks: list[str], include_path: str | None, limit: int | None) -> None:
    """Refuse options the harness would only fail on after the model loaded (no task, no
    documents) or take for something else (a missing folder reads as tasks it does not know)."""
    if not tasks:
        raise HarnessError("--tasks names no task: give harness task names, comma-separated")
    if limit is not None and limit < 1:
        raise HarnessError("--limit must be at least 1")
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"--include-path {include_path}: no such folder")


def run(
    target: str | Path,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    overrides: list[str] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score the run folder `target`'s model on the harness `tasks` (its own, or task YAMLs
    in `include_path`), the first `limit` documents of each; returns (results, folder), the
    results of every task scored in this run folder so far."""
    _check_options(tasks, include_path, limit)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        # Handed a model instance, the harness takes itself for the only process: each would
        # score every document, and the harness returns results on local rank 0 alone.
        raise HarnessError(
            f"lm-eval runs on one process, not {processes}: run `llama-tune lm-eval RUN` "
            "without torchrun or accelerate launch"
        )
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise HarnessError(
            "llama-tune lm-eval needs lm-evaluation-harness: pip install 'llama-tune[lm-eval]'"
        ) from None
    if not Path(target).is_dir():
        raise HarnessError(f"{target}: lm-eval takes a run folder (a trained run)")
    resolved = evaluation.resolve_target(target, overrides or [])
    folder = resolved.run_dir / EVALUATION / LM_EVAL
    _kept(folder)  # a damaged results file is refused here, before the model loads
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include_path})" if include_path else ""
        raise HarnessError(f"--tasks: lm-eval knows no task {', '.join(unknown)}{where}")
    recipe = resolved.recipe
    precision = resolve_precision(recipe.train.precision)
    model = evaluation.main_system(resolved, precision).model.eval()
    tokenizer = models.load_tokenizer(recipe.model.name, recipe.model.revision)
    harness_model = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=recipe.evaluation.batch_size,
        device=str(model_device()),
    )
    results = lm_eval.simple_evaluate(
        model=harness_model, tasks=tasks, task_manager=manager, limit=limit, log_samples=False
    )
    # Read again: another lm-eval of this run may have finished while this one scored.
    kept = _merged(_kept(folder), results)
    # results.json first: report.md is made from it, and the next run makes it again.
    write_json(folder / RESULTS, kept)
    write_text(folder / REPORT_MD, f"# lm-evaluation-harness\n\n{make_table(kept)}\n")
    return kept, folder


def table(folder: Path) -> str | None:
    """The harness's table of a run, as report.md holds it (None: never run)."""
    path = folder / REPORT_MD
    return path.read_text().split("\n", 2)[-1].strip() if path.is_file() else None
