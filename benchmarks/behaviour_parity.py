"""Behaviour parity across a refactor: the same recipes' first steps under two versions of the code.

Runs a few shipped recipes for a handful of fp32 steps (fixed seed) through the real CLI, once with
the code of a git ref (checked out into a temporary worktree) and once with this working tree, and
compares every logged loss and every trained weight. A refactor that changes no behaviour gives
equal numbers within `--tolerance` (1e-6).

Cases: the quickstart (LoRA, the built-in model), SST-2 distillation into a half-depth student
(online teacher, full fine-tuning) and the SST-2 adversarial recipe (HotFlip copies, NEFTune)
with PGD added.

Run: python benchmarks/behaviour_parity.py --against REF   (e.g. the commit before a refactor)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from llama_tune import schema

REPO = Path(__file__).resolve().parent.parent

COMMON = ["train.precision=fp32", "evaluation.after_training=false", "data.max_eval_rows=16"]
CASES: dict[str, tuple[str, list[str]]] = {
    "quickstart": (
        "recipes/quickstart.yaml",
        ["train.max_steps=4", "train.batch_size=8", "train.warmup_steps=1"],
    ),
    "distill": (
        "recipes/sst2_distill.yaml",
        [
            "train.max_steps=3",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "distill.teacher.adapter=null",
            "validation.metric_rows=null",
            "validation.best_metric=null",
        ],
    ),
    "adversarial": (
        "recipes/sst2_adversarial.yaml",
        [
            "train.max_steps=3",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "adversarial.train.method=pgd",
            "evaluation.robustness=null",
        ],
    ),
}
# Keys that only log (every step) or would checkpoint: written in the schema of this tree.
LOGGING = ["logging.every=1", "validation.every=2", "checkpoint.every=null"]
# How a ref from before the schema split spells keys this tree moved (new key -> old key).
RENAMED_SINCE_REF = {new: old for old, new in schema.MOVED_KEYS.items()}
# Logged fields that are timings, not behaviour.
TIMINGS = {"seconds", "tokens_per_s"}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="git ref whose behaviour is the reference")
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run these cases")
    parser.add_argument("--keep", help="keep the run folders in this folder")
    return parser.parse_args()


def _spelled_for_ref(override: str, ref_tree: Path) -> str:
    """The override as the ref's schema spells it (keys moved since, under their old name)."""
    key, _, value = override.partition("=")
    if _has_moved_keys(ref_tree):
        return override
    return f"{RENAMED_SINCE_REF.get(key, key)}={value}"


def _has_moved_keys(ref_tree: Path) -> bool:
    """Whether the ref's schema already has the logging/validation/checkpoint sections."""
    package = ref_tree / "src" / "llama_tune"
    sources = [package / "schema.py", package / "config.py"]
    return any("MOVED_KEYS" in path.read_text() for path in sources if path.is_file())


def _train(source: Path, recipe: str, overrides: list[str], run_dir: Path, data: str) -> None:
    """One `llama-tune train` with the package found under `source/src`."""
    environment = {**os.environ, "PYTHONPATH": str(source / "src"), "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "llama_tune", "train", str(source / recipe)]
    command += [*overrides, f"output.dir={run_dir}", "--data", data]
    subprocess.run(command, env=environment, cwd=source, check=True, stdout=subprocess.DEVNULL)


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir / "model"
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _compare(reference: Path, current: Path, tolerance: float) -> list[str]:
    """Every difference beyond `tolerance` between two run folders, one line each."""
    problems = []
    before, after = _records(reference), _records(current)
    if len(before) != len(after):
        problems.append(f"metrics: {len(before)} records before, {len(after)} after")
    for old, new in zip(before, after, strict=False):
        for key in sorted((old.keys() | new.keys()) - TIMINGS):
            a, b = old.get(key), new.get(key)
            numbers = isinstance(a, float | int) and isinstance(b, float | int)
            if numbers and math.isclose(a, b, rel_tol=0, abs_tol=tolerance):
                continue
            if a != b:
                problems.append(f"step {old.get('step')} {key}: {a} before, {b} after")
    old_weights, new_weights = _weights(reference), _weights(current)
    if old_weights.keys() != new_weights.keys():
        problems.append("weights: different tensor names")
    for name in sorted(old_weights.keys() & new_weights.keys()):
        gap = (old_weights[name].float() - new_weights[name].float()).abs().max().item()
        if gap > tolerance:
            problems.append(f"weight {name}: differs by {gap:.2e}")
    return problems


def main() -> int:
    args = _arguments()
    data = str(Path(args.data).resolve())
    failed = 0
    with tempfile.TemporaryDirectory(prefix="parity-") as scratch:
        root = Path(args.keep or scratch)
        ref_tree = Path(scratch) / "ref"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(ref_tree), args.against],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            for name in args.only or sorted(CASES):
                recipe, overrides = CASES[name]
                overrides = [*COMMON, *overrides, *LOGGING]
                reference, current = root / f"{name}-ref", root / f"{name}-now"
                spelled = [_spelled_for_ref(override, ref_tree) for override in overrides]
                _train(ref_tree, recipe, spelled, reference, data)
                _train(REPO, recipe, overrides, current, data)
                problems = _compare(reference, current, args.tolerance)
                failed += bool(problems)
                print(f"{name}: {'equal' if not problems else 'DIFFERENT'}", flush=True)
                for problem in problems:
                    print(f"  {problem}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=REPO)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
