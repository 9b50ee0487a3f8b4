"""Classification scoring speed: label likelihood against free generation, in one invocation.

Both score the same SST-2 validation prompts (the quickstart recipe's template) with the same
model (the built-in one, or a run folder's adapter with --run): label likelihood scores every
label as a continuation of the prompt; free generation decodes greedily until the end of the
line or the token budget and reads the answer's first word as the label, case-blind (text that
names no label counts as wrong). Generation runs twice: with the tightest budget (longest label
+ 1 token, its best case) and with 16 tokens (a usual budget for an open answer). Reports
examples/s and accuracy.

Run: python benchmarks/scoring_speed.py [--run runs/quickstart] [--rows 872]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from peft import PeftModel

from llama_tune import config, inference, models, scoring
from llama_tune.runtime import resolve_precision

REPO = Path(__file__).resolve().parent.parent


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    parser.add_argument("--run", help="a run folder whose adapter to score (default: base model)")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--rows", type=int, default=872)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args()


def _as_label(text: str, labels: list[str]) -> str:
    """Lenient reading of a generated answer: the label its first word names, case-blind."""
    words = text.lower().replace(".", " ").replace(",", " ").split()
    first = words[0] if words else ""
    return next((label for label in labels if label.lower() == first), text)


def _accuracy(eval_set: scoring.EvalSet) -> float:
    examples = eval_set.examples
    return sum(e.prediction == e.references[0] for e in examples) / len(examples)


def main() -> None:
    args = _arguments()
    os.environ["LLAMA_TUNE_DATA"] = str(Path(args.data).resolve())
    recipe = config.load(
        args.recipe,
        [f"train.precision={args.precision}", f"evaluation.batch_size={args.batch_size}"],
    )
    precision = resolve_precision(args.precision)
    tokenizer = models.load_tokenizer(recipe.model.name)
    model = models.load_base_model(recipe.model, precision)
    if args.run:
        model = PeftModel.from_pretrained(model, Path(args.run) / "adapter")
    eval_set = scoring.load_eval_set(recipe, tokenizer, "validation", args.rows)

    likelihood_seconds = scoring.predict(model, tokenizer, recipe, eval_set, precision)
    likelihood_accuracy = _accuracy(eval_set)

    labels = eval_set.labels or []
    longest = max(len(ids) for ids in inference.label_token_ids(tokenizer, labels, False))
    generation = {}
    for budget in (longest + 1, 16):
        settings = recipe.evaluation.model_copy(update={"max_new_tokens": budget})
        started = time.perf_counter()
        with inference.autocast_for(model, precision):
            for batch in scoring.length_sorted_batches(eval_set.examples, args.batch_size):
                texts = inference.generate(
                    model, tokenizer, [e.prompt_ids for e in batch], settings, stop_at_newline=True
                )
                for example, text in zip(batch, texts, strict=True):
                    example.prediction = _as_label(text, labels)
        seconds = time.perf_counter() - started
        generation[budget] = {
            "max_new_tokens": budget,
            "examples_per_s": len(eval_set.examples) / seconds,
            "accuracy": _accuracy(eval_set),
            "ratio": seconds / likelihood_seconds,
        }

    count = len(eval_set.examples)
    report = {
        "benchmark": "scoring_speed",
        "model": recipe.model.name,
        "adapter": args.run,
        "examples": count,
        "precision": precision,
        "label_likelihood": {
            "examples_per_s": count / likelihood_seconds,
            "accuracy": likelihood_accuracy,
        },
        "free_generation": list(generation.values()),
    }
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    name = "scoring_speed_tuned.json" if args.run else "scoring_speed_base.json"
    (output / name).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{count} SST-2 examples: label likelihood {count / likelihood_seconds:.1f} examples/s "
        f"(accuracy {likelihood_accuracy:.3f})"
    )
    for result in generation.values():
        print(
            f"free generation, {result['max_new_tokens']} new tokens: "
            f"{result['examples_per_s']:.1f} examples/s (accuracy {result['accuracy']:.3f}); "
            f"label likelihood is {result['ratio']:.2f}x faster"
        )


if __name__ == "__main__":
    main()
