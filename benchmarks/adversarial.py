"""Adversarial training: the step time of each method against plain LoRA, in one invocation.

Every configuration trains the same LoRA (r=8, all linear layers) on the built-in
SmolLM2-135M-Instruct with the same SST-2 prompts, batch size, precision and steps; only the
`adversarial` section differs. The peer is TRL's SFTTrainer, plain and with its NEFTune noise,
on the same data. A ratio is seconds per optimizer step (after warm-up steps that are not
counted) divided by plain LoRA's, in the same trainer.

Run: python benchmarks/adversarial.py   (--steps, --batch-size, --only NAME ...)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

import train_throughput
from llama_tune import config, schema

REPO = Path(__file__).resolve().parent.parent

CONFIGURATIONS: dict[str, dict] = {
    "plain LoRA": {},
    "NEFTune (alpha 5)": {"train": {"method": None, "neftune_alpha": 5.0}},
    "FGM": {"train": {"method": "fgm"}},
    "PGD, 2 steps": {"train": {"method": "pgd", "steps": 2}},
    "FreeLB, 2 steps": {"train": {"method": "freelb", "steps": 2}},
    "SMART, 1 step": {"train": {"method": "smart", "steps": 1}},
    "char noise, p 0.5": {"augment": {"methods": ["char"], "probability": 0.5}},
    "HotFlip, p 0.5": {"augment": {"methods": ["gradient"], "probability": 0.5}},
    "char + HotFlip p 0.5, PGD 2 steps": {
        "augment": {"methods": ["char", "gradient"], "probability": 0.5},
        "train": {"method": "pgd", "epsilon": 0.02, "steps": 2},
    },
    "recipes/sst2_adversarial.yaml": {
        "augment": {"methods": ["gradient"], "probability": 0.5, "mode": "add"},
        "train": {"method": None, "neftune_alpha": 5.0},
    },
    "the recipe + consistency 3.0": {
        "augment": {"methods": ["gradient"], "probability": 0.5, "mode": "add", "consistency": 3},
        "train": {"method": None, "neftune_alpha": 5.0},
    },
}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    parser.add_argument("--steps", type=int, default=12, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not counted")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--only", nargs="*", help="configurations to run (plain LoRA always runs)")
    parser.add_argument("--skip-trl", action="store_true", help="leave out the TRL peer runs")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    arguments = parser.parse_args()
    # The throughput benchmark's recipe: its LoRA, data and loop settings.
    arguments.rows, arguments.dropout, arguments.dtype = 2000, 0.0, "auto"
    arguments.model, arguments.task, arguments.packing = "smollm2-135m-instruct", "sst2", "auto"
    arguments.max_length = train_throughput.DEFAULT_MAX_LENGTH["sst2"]
    return arguments


def _recipe(args: argparse.Namespace, run_dir: Path, adversarial: dict) -> schema.Recipe:
    raw = train_throughput._recipe(args, run_dir).model_dump(mode="json")
    raw["adversarial"] = adversarial or None
    return config.parse(raw, "benchmark")


def _per_step(measured: dict[str, float], steps: int) -> float:
    return measured["seconds"] / steps


def main() -> None:
    args = _arguments()
    chosen = [
        name
        for name in CONFIGURATIONS
        if not args.only or name in args.only or not CONFIGURATIONS[name]
    ]
    ours: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, name in enumerate(chosen):
            recipe = _recipe(args, Path(scratch) / f"run-{index}", CONFIGURATIONS[name])
            ours[name] = train_throughput.measure_llama_tune(recipe, args.warmup)
            print(f"{name}: {_per_step(ours[name], args.steps):.2f} s/step")
        peers = {}
        if not args.skip_trl:
            plain = _recipe(args, Path(scratch) / "trl", {})
            peers["TRL SFTTrainer"] = train_throughput.measure_trl(plain, args.warmup)
            peers["TRL SFTTrainer + NEFTune (alpha 5)"] = train_throughput.measure_trl(
                plain, args.warmup, neftune_alpha=5.0
            )
    baseline = _per_step(ours["plain LoRA"], args.steps)
    rows = {
        name: {
            **measured,
            "seconds_per_step": _per_step(measured, args.steps),
            "step_time_vs_plain": _per_step(measured, args.steps) / baseline,
        }
        for name, measured in ours.items()
    }
    report = {
        "benchmark": "adversarial",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "measured_steps": args.steps,
        "threads": torch.get_num_threads(),
        "llama_tune": rows,
        "trl": peers,
    }
    if peers:
        trl_plain = peers["TRL SFTTrainer"]["seconds"] / args.steps
        trl_neftune = peers["TRL SFTTrainer + NEFTune (alpha 5)"]["seconds"] / args.steps
        report["trl_neftune_vs_plain"] = trl_neftune / trl_plain
        report["plain_llama_tune_vs_trl_tokens_per_s"] = (
            ours["plain LoRA"]["tokens_per_s"] / peers["TRL SFTTrainer"]["tokens_per_s"]
        )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "adversarial.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'configuration':<32} s/step  vs plain")
    for name, row in rows.items():
        print(f"{name:<32} {row['seconds_per_step']:6.2f}  {row['step_time_vs_plain']:.2f}x")
    if peers:
        print(
            f"TRL: NEFTune step time {report['trl_neftune_vs_plain']:.2f}x its plain; plain "
            f"llama-tune {report['plain_llama_tune_vs_trl_tokens_per_s']:.2f}x TRL's tokens/s"
        )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
