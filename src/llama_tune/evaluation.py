"""`llama-tune evaluate`: score the base model, a trained adapter or model, or both side by side.

The target is a recipe (scores the base model) or a run folder (scores its trained adapter or
model, and with `base=True` the base model too, on the same examples, with the paired
difference). Results go to `<run folder>/evaluation/<split>/`: results.json, one predictions file
per system, and report.md / report.html with plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import config, data, models, report, schema, scoring
from llama_tune.adversarial import paired_drops
from llama_tune.distillation import loading
from llama_tune.errors import UserError
from llama_tune.jsonfiles import read_json, write_json
from llama_tune.run_folder import (
    BEST,
    RECIPE_COPY,
    RESULTS,
    STUDENT_INIT,
    evaluation_folder,
    weights_folder,
)
from llama_tune.runtime import library_versions, process_state, resolve_precision


class EvaluationError(UserError):
    """An evaluation target that cannot be scored (no adapter in the run folder, ...)."""


@dataclass
class Target:
    """What to score: the recipe, where results go, and the trained weights if there are any."""

    recipe: schema.Recipe
    run_dir: Path
    weights_dir: Path | None
    """A LoRA adapter folder or a full model folder; None scores the base model alone."""


def resolve_target(target: str | Path, overrides: list[str]) -> Target:
    """A run folder (its recipe.yaml and trained weights) or a recipe file (the base model).

    `evaluation.adapter` picks the run's final weights or the best ones kept during training.
    """
    path = Path(target)
    if path.is_dir():
        recipe = config.load_run(path, overrides)
        final = weights_folder(path, full_fine_tuning=recipe.adapter is None)
        weights_dir = path / BEST if recipe.evaluation.adapter == "best" else final
        marker = "config.json" if recipe.adapter is None else "adapter_config.json"
        if not (weights_dir / marker).is_file():
            if weights_dir.is_dir() and any(weights_dir.iterdir()):
                raise EvaluationError(f"{weights_dir / marker} is missing")
            raise EvaluationError(
                f"{path} has no trained weights in {weights_dir.name}/ yet; finish training first"
            )
        # Damaged files named here, before evaluate, chat, export or push reads them.
        models.check_weights(weights_dir)
        return Target(recipe, path, weights_dir)
    recipe = config.load(path, overrides)
    run_dir = config.run_dir(recipe, path)
    if (run_dir / RECIPE_COPY).is_file():
        # Its base model's results would replace the run's own evaluation of the split.
        raise EvaluationError(
            f"output.dir {run_dir} holds a run of this recipe: evaluate the run folder "
            f"(`llama-tune evaluate {run_dir} --base` scores the base model beside it), or give "
            "the recipe another output.dir"
        )
    return Target(recipe, run_dir, None)


@dataclass
class System:
    """One model to score, under the name the results use (tuned, base)."""

    name: str
    model: PreTrainedModel | PeftModel
    adapter_off: bool = False
    """Score a peft model with its adapter disabled: the base model, without a second copy."""

    def scoring(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()


def _trained_model(resolved: Target, precision: str) -> PreTrainedModel | PeftModel:
    """The run's trained model: a full model folder, or an adapter on the base it trained on."""
    recipe, weights_dir = resolved.recipe, resolved.weights_dir
    assert weights_dir is not None
    if recipe.adapter is None:
        full = recipe.model.model_copy(update={"name": str(weights_dir)})
        return models.load_base_model(full, precision)
    base = models.load_base_model(adapter_base(resolved), precision)
    return models.load_adapter(base, weights_dir, "model.name")


def adapter_base(resolved: Target) -> schema.ModelConfig:
    """The model a run's adapter was trained on: the recipe's, or for a distillation student
    cut from its teacher, the run's student-init/ folder."""
    recipe = resolved.recipe
    if recipe.distill is not None and recipe.distill.student.from_teacher is not None:
        return recipe.model.model_copy(update={"name": str(resolved.run_dir / STUDENT_INIT)})
    return recipe.model


def main_system(resolved: Target, precision: str) -> System:
    """The model the results are about, alone: a recipe's base model, a run's trained model
    (a distillation run's student, without the teacher that `load_systems` adds: chat and
    lm-eval need only this one, and a teacher is often larger than all the rest)."""
    if resolved.weights_dir is None:
        return System("base", models.load_base_model(resolved.recipe.model, precision))
    name = "student" if resolved.recipe.distill is not None else "tuned"
    return System(name, _trained_model(resolved, precision))


def load_systems(resolved: Target, precision: str, base: bool) -> list[System]:
    """The models to score, first the one the results are about.

    A recipe scores its base model. A run folder scores its trained model ("tuned"), and with
    `base` the base model too. A distillation run scores the student, the teacher, and with
    `base` the teacher's base model (when the teacher wears an adapter).
    """
    recipe = resolved.recipe
    first = main_system(resolved, precision)
    if resolved.weights_dir is None:
        return [first]
    trained = first.model
    if recipe.distill is not None:
        systems = [first]
        teacher = loading.load_teacher(recipe.distill, precision)
        systems.append(System("teacher", teacher))
        if base and recipe.distill.teacher.adapter is not None:
            base_model = models.load_base_model(loading.teacher_spec(recipe.distill), precision)
            systems.append(System("base", base_model))
        return systems
    systems = [first]
    if base and isinstance(trained, PeftModel):
        systems.append(System("base", trained, adapter_off=True))
    elif base:
        systems.append(System("base", models.load_base_model(recipe.model, precision)))
    return systems


# Paired differences reported when both systems were scored: (system, against).
COMPARISONS = (("tuned", "base"), ("student", "teacher"), ("student", "base"))


def _versions() -> dict[str, str]:
    import evaluate
    import sacrebleu

    return {
        **library_versions(),
        "evaluate": evaluate.__version__,
        "sacrebleu": sacrebleu.__version__,
    }


def _system_result(
    eval_set: scoring.EvalSet, scores: scoring.Scores, seconds: float
) -> dict[str, Any]:
    count = len(eval_set.examples)
    return {
        "metrics": {name: interval.as_dict() for name, interval in scores.intervals.items()},
        "details": scores.details,
        "empty_predictions": sum(not example.prediction for example in eval_set.examples),
        "seconds": seconds,
        "examples_per_s": count / seconds if seconds > 0 else None,
    }


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_predictions(path: Path, eval_set: scoring.EvalSet) -> None:
    records = []
    for example in eval_set.examples:
        record = {
            "row": example.row,
            "input": example.input,
            "reference": example.references[0],
            "references": example.references,
            "prediction": example.prediction,
            "score": example.score,
        }
        if example.label_logprobs is not None:
            record["label_logprobs"] = example.label_logprobs
        records.append(record)
    _write_lines(path, records)


@dataclass
class Scoring:
    """What every system of one evaluation is scored with, and where its files go."""

    recipe: schema.Recipe
    tokenizer: PreTrainedTokenizerBase
    eval_set: scoring.EvalSet
    precision: str
    out_dir: Path
    main: bool
    """This process writes the files (the only one, or the main one under a launcher)."""

    def score(self, system: System, first: bool) -> tuple[scoring.Scores, dict[str, Any]]:
        """One system's scores and result; its predictions are written beside results.json.

        Under a launcher every process predicts its share of the rows (`shared`)."""
        recipe, settings, eval_set = self.recipe, self.recipe.evaluation, self.eval_set
        examples = [dataclasses.replace(example) for example in eval_set.examples]
        system_set = dataclasses.replace(eval_set, examples=examples)
        with system.scoring():
            seconds = scoring.predict(
                system.model,
                self.tokenizer,
                recipe,
                system_set,
                self.precision,
                f"score {system.name}",
                shared=True,
            )
        scores = scoring.score(system_set, recipe.data.task, settings)
        result = _system_result(system_set, scores, seconds)
        result["parameters"] = sum(parameter.numel() for parameter in system.model.parameters())
        if self.main:
            name = paired_drops.predictions_file(system.name, first)
            _write_predictions(self.out_dir / name, system_set)
        if settings.robustness is not None:
            # Imported here: most evaluations score clean inputs only.
            from llama_tune.adversarial import robustness

            with system.scoring():
                records, perturbed = robustness.measure(
                    system.model,
                    self.tokenizer,
                    recipe,
                    eval_set,
                    scores,
                    self.precision,
                    shared=True,
                )
            result["robustness"] = records
            if self.main:
                _write_lines(self.out_dir / paired_drops.robustness_file(system.name), perturbed)
        return scores, result


def _results_header(
    resolved: Target, eval_set: scoring.EvalSet, split: str, precision: str
) -> dict[str, Any]:
    recipe = resolved.recipe
    return {
        "task": recipe.data.task,
        "model": recipe.model.name,
        "weights": str(resolved.weights_dir) if resolved.weights_dir else None,
        "data": {
            "source": str(recipe.data.source),
            "split": split,
            "origin": eval_set.origin,
            "rows_read": eval_set.rows_read,
            "skipped": dict(sorted(eval_set.skipped.items())),
            "unknown_reference_labels": dict(eval_set.unknown_reference_labels),
            "labels": eval_set.labels,
        },
        "n": len(eval_set.examples),
        "precision": precision,
        "settings": recipe.evaluation.model_dump(mode="json"),
        "systems": {},
        "versions": _versions(),
    }


def _scored_the_base(results: Path) -> bool:
    """Whether earlier results in this place hold the base model's scores."""
    try:
        return "base" in read_json(results)["systems"]
    except (UserError, KeyError, TypeError):  # absent or damaged: nothing there to keep
        return False


def run(
    target: str | Path,
    overrides: list[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    base: bool = False,
) -> dict[str, Any]:
    """Score the target on one split and write results.json and predictions; returns results.

    Under a launcher (torchrun, `accelerate launch`) every process must call it: each scores
    its share of the rows, every row once, and the main process writes the files.
    """
    resolved = resolve_target(target, overrides or [])
    recipe, settings = resolved.recipe, resolved.recipe.evaluation
    split = split or settings.split
    precision = resolve_precision(recipe.train.precision)
    tokenizer = models.load_tokenizer(recipe.model.name, recipe.model.revision)
    eval_set = scoring.load_eval_set(recipe, tokenizer, split, limit or settings.max_rows)
    problem = scoring.unscorable(eval_set)
    if problem is not None:
        # Before earlier results are replaced by none.
        raise EvaluationError(problem)
    if settings.robustness is not None:
        data.refuse_perturbing(eval_set.row_format, eval_set.origin, "evaluation.robustness")

    best = resolved.weights_dir is not None and resolved.weights_dir.name == BEST
    out_dir = evaluation_folder(resolved.run_dir, split, best)
    main = process_state().is_main_process
    # The main process's results decide for every process: machines with copies of the run
    # folder of their own could disagree, and a process scoring fewer systems would leave the
    # others waiting in their collectives.
    if not base and broadcast_object_list([main and _scored_the_base(out_dir / RESULTS)])[0]:
        # The results replace these whole: without the base again, its scores would be lost.
        base = True
        if main:
            print(f"note: scoring the base model too, as {out_dir / RESULTS} did", file=sys.stderr)
    systems = load_systems(resolved, precision, base)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        used = f"{len(eval_set.examples)} to score"
        print(data.describe_rows(split, eval_set.origin, used, eval_set.skipped, out_dir / RESULTS))
    results = _results_header(resolved, eval_set, split, precision)
    scoring_run = Scoring(recipe, tokenizer, eval_set, precision, out_dir, main)
    scored: dict[str, scoring.Scores] = {}
    for system in systems:
        scored[system.name], results["systems"][system.name] = scoring_run.score(
            system, first=system is systems[0]
        )
    results["differences"] = {
        f"{system} - {against}": scoring.compare(
            scored[system], scored[against], len(eval_set.examples), settings
        )
        for system, against in COMPARISONS
        if {system, against} <= scored.keys()
    }
    if main:
        write_json(out_dir / RESULTS, results)
        report.write_run_report(out_dir, results, resolved.run_dir)
    results["output_dir"] = str(out_dir)
    return results
