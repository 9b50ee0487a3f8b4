"""Where a training step's time goes: torch.profiler over a few of llama-tune's LoRA steps.

On the H200 a 1B LoRA step of 64 short rows took ~100 ms while its matrix work is a few
milliseconds (docs/BENCHMARKS.md). This profiles steps after a warm-up and prints the busiest
operators by device time and by host time, and how much of the steps' wall time the device
spent in kernels: the measurement issue 20's performance work starts from.

Run: python benchmarks/gpu/profile_steps.py --model FOLDER [--batch-size 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from llama_tune import config, train

WAIT, WARMUP = 4, 2


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=os.environ.get("LLAMA_TUNE_DATA", "../shared/datasets"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps, after warm-up")
    parser.add_argument("--precision", default="bf16")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    profiler = profile(
        activities=activities,
        schedule=schedule(wait=WAIT, warmup=WARMUP, active=args.steps, repeat=1),
    )
    step_ends: list[float] = []
    original_step = train.TrainingRun._optimizer_step

    def profiled_step(run: train.TrainingRun, step_examples: list[int]) -> None:
        original_step(run, step_examples)
        if on_gpu:
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        profiler.step()

    train.TrainingRun._optimizer_step = profiled_step  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as scratch:
        recipe = config.parse(
            {
                "model": {"name": args.model},
                "adapter": {"r": 8, "alpha": 16},
                "data": {
                    "source": str(Path(args.data) / "classification" / "sst2"),
                    "task": "classification",
                    "max_train_rows": 2000,
                    "max_length": 128,
                    "splits": {"validation": None},
                },
                "train": {
                    "max_steps": WAIT + WARMUP + args.steps + 1,
                    "batch_size": args.batch_size,
                    "precision": args.precision,
                    "scheduler": "constant",
                    "warmup_steps": 0,
                },
                "logging": {"every": 1000},
                "output": {"dir": str(Path(scratch) / "run")},
            },
            "profile",
        )
        with profiler:
            train.run(recipe, "profile.yaml")
    active = step_ends[WAIT + WARMUP - 1 : WAIT + WARMUP + args.steps]
    wall = active[-1] - active[0]
    events = profiler.key_averages()
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    steps = len(active) - 1
    print(f"{steps} profiled steps: {1000 * wall / steps:.1f} ms a step")
    if on_gpu:
        kernels = sum(event.self_device_time_total for event in events) / 1e6
        print(f"device busy in kernels: {kernels:.3f} s of {wall:.3f} s ({kernels / wall:.0%})")


if __name__ == "__main__":
    main()
