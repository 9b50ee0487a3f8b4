"""Two systems measured in turn, each in a fresh process: A B A B ... for a number of rounds.

Alternating spreads any drift of the machine (other load, thermal state) over both systems, and
a fresh process per measurement gives each its own peak resident memory. A benchmark script is
both the driver and the worker: the driver runs `script ARGUMENTS --worker SYSTEM --result FILE`
and reads back the JSON the worker wrote.

llama-tune's command runs under tcmalloc where the system has it (src/llama_tune/allocator.py);
`--tcmalloc` says whose workers get it here: every system's (the default: the ratio measures
the trainers, not the allocator; TRL gains more from it, 1.6x on SST-2 against llama-tune's
1.1x), llama-tune's alone (what each tool gives out of the box), or none.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from llama_tune import allocator


def peak_resident_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def add_tcmalloc_argument(parser: argparse.ArgumentParser) -> None:
    """The `--tcmalloc` choice of the module docstring."""
    parser.add_argument(
        "--tcmalloc",
        choices=["llama-tune", "all", "none"],
        default="all",
        help="whose processes run under tcmalloc where this machine has it",
    )


def run_worker(script: Path, arguments: list[str], system: str, tcmalloc: bool) -> dict[str, Any]:
    """One measurement of `system` in its own process, under tcmalloc if asked and found."""
    preloading = None
    if tcmalloc:
        library = allocator.chosen_library(os.environ, allocator.search_folders())
        preloading = allocator.preloading_environment(os.environ, library)
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        command = [sys.executable, str(script), *arguments, "--worker", system]
        subprocess.run([*command, "--result", str(result)], check=True, env=preloading)
        return json.loads(result.read_text())


def alternate(
    script: Path, arguments: list[str], systems: list[str], rounds: int, tcmalloc: str
) -> dict[str, list[dict[str, Any]]]:
    """Every system once per round, in the same order each round; `tcmalloc` is the
    `--tcmalloc` choice."""
    runs: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    for round_number in range(rounds):
        for system in systems:
            print(f"round {round_number + 1}/{rounds}: {system}", flush=True)
            preload = tcmalloc == "all" or (tcmalloc == system.split()[0] == "llama-tune")
            runs[system].append(run_worker(script, arguments, system, preload))
    return runs


def summary(runs: dict[str, list[dict[str, Any]]], ours: str, peer: str) -> dict[str, Any]:
    """Medians of each system's figures, and the per-round ratios of ours to the peer's."""
    medians = {
        system: {
            key: statistics.median(run[key] for run in system_runs)
            for key in system_runs[0]
            if isinstance(system_runs[0][key], int | float)
        }
        for system, system_runs in runs.items()
    }
    pairs = list(zip(runs[ours], runs[peer], strict=True))
    speed = [mine["tokens_per_s"] / theirs["tokens_per_s"] for mine, theirs in pairs]
    memory = [mine["peak_rss_gib"] / theirs["peak_rss_gib"] for mine, theirs in pairs]
    return {
        "rounds": len(pairs),
        "median": medians,
        "speed_ratios": speed,
        "speed_ratio": statistics.median(speed),
        "memory_ratios": memory,
        "memory_ratio": statistics.median(memory),
    }
