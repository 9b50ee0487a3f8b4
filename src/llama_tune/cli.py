"""The `llama-tune` command: parse, validate, call one function, report.

User mistakes (a bad recipe, a missing file, a run folder in the way) print one clear message and
exit with code 2; a stop signal saves a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llama_tune import __version__, allocator, config, run_folder
from llama_tune.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    from llama_tune.train import RunResult

USAGE_ERROR = 2
VERB_MODULES = {
    "train": "llama_tune.train",
    "evaluate": "llama_tune.evaluation",
    "report": "llama_tune.report",
    "distill": "llama_tune.distillation.loading",
    "augment": "llama_tune.adversarial.augment",
    "chat": "llama_tune.chat",
    "export": "llama_tune.export",
    "push": "llama_tune.publish",
    "lm-eval": "llama_tune.harness",
}
"""The module each verb's handler imports, which loads torch and transformers (lazily: `validate`
and `--help` stay fast)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-tune", description="Recipe-driven fine-tuning of Llama models."
    )
    parser.add_argument("--version", action="version", version=f"llama-tune {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train the adapter (or model) a recipe describes")
    train.add_argument(
        "recipe", help="a recipe YAML file; with --resume, a run folder (its saved recipe)"
    )
    train.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4"
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest intact checkpoint"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="replace whatever the run folder holds"
    )
    train.add_argument("--data", help="data folder; sets LLAMA_TUNE_DATA for the recipe")

    evaluate = verbs.add_parser(
        "evaluate", help="score the base model, a run's adapter, or both side by side"
    )
    evaluate.add_argument("target", help="a run folder (scores its adapter) or a recipe (base)")
    evaluate.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    evaluate.add_argument("--split", help="split to score (default: evaluation.split)")
    evaluate.add_argument("--limit", type=int, help="score only the first N usable rows")
    evaluate.add_argument(
        "--base", action="store_true", help="with a run folder: score the base model too"
    )
    evaluate.add_argument("--data", help="data folder; sets LLAMA_TUNE_DATA for the recipe")

    compare = verbs.add_parser("report", help="put several evaluated runs side by side")
    compare.add_argument("runs", nargs="+", help="run folders scored with llama-tune evaluate")
    compare.add_argument("--split", help="only this split's results (default: every split)")
    compare.add_argument("--output", default="runs/comparison", help="folder for the report")

    distill = verbs.add_parser("distill", help="distillation tools")
    distill_verbs = distill.add_subparsers(dest="distill_verb", required=True)
    cache = distill_verbs.add_parser(
        "cache", help="run the teacher once over the training split and store its top-k"
    )
    cache.add_argument("recipe", help="a distillation recipe with distill.cache")
    cache.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    cache.add_argument("--data", help="data folder; sets LLAMA_TUNE_DATA for the recipe")

    augment = verbs.add_parser(
        "augment", help="show training rows next to their adversarial perturbations"
    )
    augment.add_argument("recipe", help="a recipe with adversarial.augment")
    augment.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    augment.add_argument("--show", type=int, default=10, help="how many rows to show")
    augment.add_argument("--data", help="data folder; sets LLAMA_TUNE_DATA for the recipe")

    _add_model_verbs(verbs)
    return parser


def _add_model_verbs(verbs: argparse._SubParsersAction) -> None:
    """The verbs that use a trained model: chat with it, export it; and recipe validation."""
    chat = verbs.add_parser(
        "chat", help="talk to a run's model (or a recipe's base), prompted as training prompted"
    )
    chat.add_argument("target", help="a run folder (its trained model) or a recipe (its base)")
    chat.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    chat.add_argument("--prompt", help="answer this one message and stop (default: interactive)")

    validate = verbs.add_parser("validate", help="check recipes without loading any model")
    validate.add_argument("recipes", nargs="+", help="recipe YAML files")
    validate.add_argument("--data", help="data folder; sets LLAMA_TUNE_DATA for the recipes")

    _add_publishing_verbs(verbs)


def _add_publishing_verbs(verbs: argparse._SubParsersAction) -> None:
    """The verbs that take a finished run elsewhere: export it, push it to the Hub, score it
    with lm-evaluation-harness."""
    export = verbs.add_parser(
        "export", help="merge a run's adapter into its base and write a standalone model folder"
    )
    export.add_argument("run", help="a finished run folder")
    export.add_argument("output", help="the new folder to write (must not exist or be empty)")
    export.add_argument("overrides", nargs="*", help="e.g. evaluation.adapter=best")
    export.add_argument(
        "--dtype", help="bfloat16, float16 or float32 (default: the base model's own dtype)"
    )
    export.add_argument(
        "--gguf",
        metavar="TYPE",
        help="also write a GGUF file: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0",
    )

    push = verbs.add_parser("push", help="publish a run to the Hugging Face Hub with a model card")
    push.add_argument("run", help="a finished run folder (evaluate it first for a results card)")
    push.add_argument("--repo-id", required=True, help="OWNER/NAME of the Hub repository")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="push to this branch (created if missing)")
    push.add_argument(
        "--merged", action="store_true", help="push the merged standalone model, not the adapter"
    )
    push.add_argument("--commit-message", help="the commit's message")
    push.add_argument(
        "--dry-run", action="store_true", help="write the folder and list it; upload nothing"
    )
    push.add_argument("--output", help="with --dry-run: the folder to write (default RUN-hub)")

    harness = verbs.add_parser(
        "lm-eval", help="run lm-evaluation-harness tasks on a run's model (optional extra)"
    )
    harness.add_argument("run", help="a finished run folder")
    harness.add_argument("--tasks", required=True, help="harness task names, comma-separated")
    harness.add_argument("--include-path", help="a folder of your own task YAML files")
    harness.add_argument("--limit", type=int, help="score only the first N documents per task")


def _train(args: argparse.Namespace) -> int:
    # Imported here so `validate` and `--help` stay fast: torch and transformers load slowly.
    from llama_tune import train
    from llama_tune.runtime import end_processes, process_state

    recipe_path = Path(args.recipe)
    if args.resume and recipe_path.is_dir():
        # The run's own resolved recipe: no override of the original command can be forgotten.
        recipe = config.load_run(recipe_path, args.overrides)
    else:
        recipe = config.load(recipe_path, args.overrides)
    try:
        result = train.run(recipe, recipe_path, resume=args.resume, overwrite=args.overwrite)
    except train.Interrupted as stop:
        print(f"\nstopped: checkpoint saved to {stop.checkpoint_dir}", file=sys.stderr)
        print(f"continue with: llama-tune train {stop.run_dir} --resume", file=sys.stderr)
        return stop.exit_code
    main = process_state().is_main_process
    if main:
        _print_summary(result)
    if recipe.evaluation.after_training:
        from llama_tune import evaluation

        # Every process scores its share of the rows; the main one writes and prints.
        results = evaluation.run(result.run_dir, base=True)
        if main:
            _print_results(results)
    end_processes()
    return 0


def _print_summary(result: RunResult) -> None:
    summary = result.summary
    print(f"\nrun folder:  {result.run_dir}")
    print(f"{result.weights_dir.name + ':':<13}{result.weights_dir}")
    print(f"summary:     {result.run_dir / run_folder.SUMMARY}")
    print(f"metrics:     {result.run_dir / run_folder.METRICS}")
    if "train_loss_first" in summary:
        print(
            f"train loss:  {summary['train_loss_first']:.4f} (first log) -> "
            f"{summary['train_loss_last']:.4f} (last log)"
        )
    if "eval_loss_after" in summary:
        print(
            f"eval loss:   {summary['eval_loss_before']:.4f} (before) -> "
            f"{summary['eval_loss_after']:.4f} (after)"
        )
    print(
        f"time:        {summary['train_seconds']:.0f} s for {summary['steps']} steps, "
        f"{summary['tokens_per_s']:.0f} tokens/s"
    )


def _evaluate(args: argparse.Namespace) -> int:
    from llama_tune import evaluation

    if args.limit is not None and args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return USAGE_ERROR
    from llama_tune.runtime import end_processes, process_state

    results = evaluation.run(args.target, args.overrides, args.split, args.limit, args.base)
    # Under a launcher every process scored a share; the main one reports.
    if process_state().is_main_process:
        _print_results(results)
    end_processes()
    return 0


def _print_results(results: dict) -> None:
    from llama_tune.report import format_interval

    data = results["data"]
    skipped = ", ".join(f"{reason}: {count}" for reason, count in data["skipped"].items())
    print(f"\n{data['origin']}: {results['n']} examples scored (skipped: {skipped or 'none'})")
    if data["unknown_reference_labels"]:
        print(f"reference labels outside the label set: {data['unknown_reference_labels']}")
    for system, result in results["systems"].items():
        shown = ", ".join(
            f"{name} {format_interval(interval)}" for name, interval in result["metrics"].items()
        )
        print(f"{system:>7}: {shown}  ({result['examples_per_s']:.1f} examples/s)")
    for pair, difference in results.get("differences", {}).items():
        for name, interval in difference.items():
            print(f"{pair} {name}: {format_interval(interval)}")
    print(f"results:     {Path(results['output_dir']) / run_folder.RESULTS}")
    print(f"report:      {Path(results['output_dir']) / run_folder.REPORT_HTML}")


def _report(args: argparse.Namespace) -> int:
    from llama_tune import report

    found = [path for run in args.runs for path in report.evaluation_results(Path(run), args.split)]
    output = Path(args.output)
    rows = report.compare_runs(found, output)
    for name, metrics in rows.items():
        shown = ", ".join(f"{metric} {report.format_interval(v)}" for metric, v in metrics.items())
        print(f"{name}: {shown}")
    print(f"report:      {output / run_folder.REPORT_HTML}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from llama_tune.distillation import loading
    from llama_tune.runtime import end_processes, process_state

    recipe = config.load(args.recipe, args.overrides)
    folder = loading.build_cache(recipe, args.recipe)
    if process_state().is_main_process:
        print(f"teacher cache: {folder}")
    end_processes()
    return 0


def _augment(args: argparse.Namespace) -> int:
    recipe = config.load(args.recipe, args.overrides)
    if recipe.adversarial is None or recipe.adversarial.augment is None:
        print(f"error: {args.recipe}: no adversarial.augment section", file=sys.stderr)
        return USAGE_ERROR
    if args.show < 1:
        print("error: --show must be at least 1", file=sys.stderr)
        return USAGE_ERROR
    from llama_tune.adversarial import augment
    from llama_tune.runtime import resolve_precision

    precision = resolve_precision(recipe.train.precision)
    student = None
    if augment.needs_model(recipe.adversarial.augment.methods):
        from llama_tune.distillation import loading

        student = loading.cut_student(recipe, precision)
    shown = augment.preview(recipe, args.show, precision, student)
    (field,) = augment.input_fields(recipe)
    width = max(len("perturbed"), len("clean"))
    for number, item in enumerate(shown, start=1):
        method = item.method or "unchanged (nothing to perturb)"
        print(f"[{number}] row {item.clean.row} · {method}")
        print(f"  {'clean':<{width}}  {item.clean.fields[field]!r}")
        print(f"  {'perturbed':<{width}}  {item.example.fields[field]!r}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llama_tune import chat

    conversation = chat.Conversation(args.target, args.overrides)
    if args.prompt is not None:
        if conversation.single_prompts:  # on stderr: stdout holds the answer alone
            print(f"({chat.SINGLE_PROMPTS})", file=sys.stderr)
        print(conversation.answer(args.prompt))
    else:
        chat.interactive(conversation, sys.stdin, sys.stdout)
    return 0


def _export(args: argparse.Namespace) -> int:
    from llama_tune import export

    exported = export.export(args.run, args.output, args.dtype, args.gguf, args.overrides)
    print(f"model folder: {exported.folder} ({exported.dtype})")
    if exported.gguf_path is not None:
        print(f"gguf file:    {exported.gguf_path}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from llama_tune import publish

    request = publish.PushRequest(
        run=Path(args.run),
        repo_id=args.repo_id,
        private=args.private,
        revision=args.revision,
        merged=args.merged,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
        output=Path(args.output) if args.output else None,
    )
    pushed = publish.push(request)
    if pushed.folder is not None:
        print(f"dry run: {pushed.folder} holds what would be uploaded to {args.repo_id}:")
    else:
        print(f"pushed to {args.repo_id}: {pushed.url}")
    print(publish.describe(pushed))
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    from llama_tune import harness

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    _results, folder = harness.run(args.run, tasks, args.include_path, args.limit)
    print(harness.table(folder))
    print(f"results:     {folder / run_folder.RESULTS}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    overrides = [path for path in args.recipes if "=" in path and not Path(path).exists()]
    if overrides:
        print(
            f"error: validate takes recipe files, not overrides: {' '.join(overrides)}",
            file=sys.stderr,
        )
        return USAGE_ERROR
    failed = 0
    for path in args.recipes:
        try:
            config.load(path)
        except config.RecipeError as error:
            failed += 1
            print(error, file=sys.stderr)
        else:
            print(f"ok: {path}")
    return USAGE_ERROR if failed else 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "evaluate": _evaluate,
    "report": _report,
    "distill": _distill,
    "augment": _augment,
    "chat": _chat,
    "validate": _validate,
    "export": _export,
    "push": _push,
    "lm-eval": _lm_eval,
}
"""The function each verb calls; it returns the exit code."""


def _import_uncollected(verb: str) -> None:
    """Import what `verb` needs with the cyclic garbage collector off, then freeze everything
    made so far.

    torch, transformers and peft make half a million objects that live until the exit: while
    they import, the collector walks them all eight times (1.6 s of CPU), and the interpreter's
    last collection once more (1.1 s), 2.7 s of a launched tiny run's 6.5 s a process
    (measured, 2026-12-07). Frozen objects are never walked again; what the run makes later is
    collected as usual."""
    if verb not in VERB_MODULES:
        return
    gc.disable()
    try:
        importlib.import_module(VERB_MODULES[verb])
    finally:
        gc.freeze()
        gc.enable()


def main(argv: list[str] | None = None, *, command: bool = False) -> int:
    """Entry point of the `llama-tune` console script (`command`: called by it, not in-process,
    where freezing the caller's objects would keep its garbage for good)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Overrides may follow options (`evaluate RUN --split test key=value`), which argparse
        # does not take as the trailing positionals they are.
        if not hasattr(args, "overrides") or any(
            "=" not in argument or argument.startswith("-") for argument in extra
        ):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if getattr(args, "data", None):
        if not Path(args.data).is_dir():
            print(f"error: --data {args.data}: no such folder", file=sys.stderr)
            return USAGE_ERROR
        os.environ["LLAMA_TUNE_DATA"] = str(Path(args.data).resolve())
    if command:
        _import_uncollected(args.verb)
    try:
        return HANDLERS[args.verb](args)
    except UserError as error:
        # Anything else is a bug and keeps its traceback.
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR


def console() -> int:
    """The `llama-tune` command and `python -m llama_tune`: `main` under tcmalloc where the system
    has it (allocator.py); in-process callers use `main`, which changes no allocator."""
    try:
        allocator.restart_with_allocator()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    return main(command=True)
