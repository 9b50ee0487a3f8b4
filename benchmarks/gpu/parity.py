"""Same numbers on a GPU as on the CPU: a few fp32 LoRA steps of the quickstart on a tiny Llama.

`run` trains the quickstart recipe (SST-2) for a few fp32 steps on the tiny model through the
real CLI; `compare` reads two such runs, one made on the CPU (by prepare.sh) and one on the GPU,
and reports the largest relative difference of the logged losses, gradient norms and final
adapter weights. fp32 matrix products on the GPU do not use TF32 by default in torch, so the
runs should agree to about 1e-5; a device-placement or dtype bug shows as a difference of 1e-2
or more.

Run: python benchmarks/gpu/parity.py run MODEL RUN_DIR; python benchmarks/gpu/parity.py compare A B
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

OVERRIDES = [
    "train.precision=fp32",
    "adapter.dropout=0",
    "train.max_steps=8",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "logging.every=1",
    "validation.every=4",
    "checkpoint.every=null",
    "evaluation.after_training=false",
    "data.max_train_rows=64",
    "data.max_eval_rows=32",
]
TOLERANCE = 1e-4


def train(model: Path, run_dir: Path) -> None:
    """The quickstart's first steps on `model` into `run_dir`, through the CLI."""
    command = [sys.executable, "-m", "llama_tune", "train", "recipes/quickstart.yaml"]
    command += [f"model.name={model}", f"output.dir={run_dir}", *OVERRIDES, "--overwrite"]
    subprocess.run(command, check=True)


def _relative(first: float, second: float) -> float:
    return abs(first - second) / max(abs(first), abs(second), 1e-12)


def compare(reference: Path, other: Path) -> float:
    """The largest relative difference between the two runs' logged numbers and adapters."""
    differences: dict[str, float] = {}
    lines = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (reference, other)
    ]
    for first, second in zip(*lines, strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in first:
                name = f"{key}@{first['step']}"
                differences[name] = _relative(first[key], second[key])
    weights = [
        load_file(run / "adapter" / "adapter_model.safetensors") for run in (reference, other)
    ]
    for name, tensor in weights[0].items():
        scale = tensor.abs().max().clamp_min(1e-12)
        differences[name] = float((tensor - weights[1][name].to(tensor)).abs().max() / scale)
    worst = max(differences, key=differences.__getitem__)
    print(json.dumps({k: v for k, v in differences.items() if "@" in k}, indent=1))
    print(f"largest relative difference: {differences[worst]:.2e} ({worst}); tolerance {TOLERANCE}")
    return differences[worst]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run")
    run.add_argument("model", type=Path)
    run.add_argument("run_dir", type=Path)
    check = verbs.add_parser("compare")
    check.add_argument("reference", type=Path)
    check.add_argument("other", type=Path)
    args = parser.parse_args()
    if args.verb == "run":
        print(f"parity run on {'cuda' if torch.cuda.is_available() else 'cpu'}")
        train(args.model, args.run_dir)
    elif compare(args.reference, args.other) > TOLERANCE:
        sys.exit(1)


if __name__ == "__main__":
    main()
