"""The benchmark scripts run end to end on the tiny model and write well-formed results (the
figures themselves are measured with `make bench`, never asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, expected_malloc


def _run(script: str, *arguments: str) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / script), *arguments]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


WORKER = """
import argparse, json, os, pathlib
parser = argparse.ArgumentParser()
parser.add_argument("--speed", type=float)
parser.add_argument("--worker")
parser.add_argument("--result")
args = parser.parse_args()
log = pathlib.Path(__file__).with_name("order.log")
rounds = log.read_text().count(args.worker) if log.exists() else 0
with log.open("a") as handle:
    handle.write(args.worker + "\\n")
speed = args.speed * (2 if args.worker == "llama-tune" else 1) + rounds
preloaded = os.environ.get("LD_PRELOAD", "")
result = {"tokens_per_s": speed, "peak_rss_gib": 1.0 + rounds, "preloaded": bool(preloaded)}
pathlib.Path(args.result).write_text(json.dumps(result))
"""
"""A stand-in benchmark worker: llama-tune twice the peer's speed plus the round number; it
records the order the systems ran in and whether tcmalloc was preloaded."""


def test_side_by_side_alternates_fresh_processes_and_pairs_their_rounds(tmp_path: Path) -> None:
    # The benchmarks' module, read from its file: benchmarks/ stays off the import path (its
    # distillation.py would shadow the tests' distillation package).
    spec = importlib.util.spec_from_file_location(
        "side_by_side", REPO / "benchmarks" / "side_by_side.py"
    )
    side_by_side = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(side_by_side)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    systems = ["llama-tune", "trl"]
    runs = side_by_side.alternate(script, ["--speed", "10"], systems, 3, "llama-tune")
    assert (tmp_path / "order.log").read_text().split() == systems * 3
    assert [run["tokens_per_s"] for run in runs["llama-tune"]] == [20, 21, 22]
    assert [run["tokens_per_s"] for run in runs["trl"]] == [10, 11, 12]
    # Only llama-tune's processes get tcmalloc under `--tcmalloc llama-tune` (if found here).
    tcmalloc = expected_malloc() != "glibc"
    assert [run["preloaded"] for run in runs["llama-tune"]] == [tcmalloc] * 3
    assert not any(run["preloaded"] for run in runs["trl"])
    report = side_by_side.summary(runs, "llama-tune", "trl")
    assert report["rounds"] == 3
    assert report["speed_ratios"] == [20 / 10, 21 / 11, 22 / 12]
    assert report["speed_ratio"] == 21 / 11
    assert report["memory_ratios"] == [1.0, 1.0, 1.0]
    assert report["median"]["trl"]["tokens_per_s"] == 11


# One round each (each round starts both systems anew, some 15 s on two cores); the rounds'
# alternation and pairing are the stand-in worker's test above.
@pytest.mark.parametrize("task", ["sst2", "alpaca"])
def test_train_throughput_writes_side_by_side_results(
    task: str, tiny_model_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    rounds = 1
    _run(
        "train_throughput.py",
        *("--model", str(tiny_model_dir), "--data", str(data_root), "--task", task),
        *("--steps", "2", "--warmup", "1", "--rounds", str(rounds)),
        *("--rows", "48", "--batch-size", "4"),
        *("--max-length", "256", "--precision", "fp32", "--output", str(tmp_path)),
        *("--tcmalloc", "llama-tune"),
    )
    report = json.loads((tmp_path / f"train_throughput_{task}_fp32.json").read_text())
    # Instruction rows pack (TRL: padding-free); classification rows do not.
    assert report["packed"] is (task == "alpaca")
    assert report["matmul_gflops"] > 0
    assert report["rounds"] == rounds
    for system in ("llama-tune", "trl"):
        runs = report["runs"][system]
        assert len(runs) == rounds
        for run in runs:
            assert run["tokens"] > 0
            assert run["tokens_per_s"] > 0
            assert 0 < run["mfu"] < 1
            assert 0 < run["peak_rss_gib"] < 24
            assert len(run["losses"]) == 2
            assert run["mean_loss"] > 0
            # Only llama-tune gets tcmalloc (where there is one), as its command does.
            assert run["malloc"] == (expected_malloc() if system == "llama-tune" else "glibc")
    assert len(report["speed_ratios"]) == len(report["memory_ratios"]) == rounds
    assert report["speed_ratio"] > 0
    # TRL reads llama-tune's steps in order: the same examples, so the same tokens.
    trained = {
        system: [run["tokens"] for run in report["runs"][system]] for system in report["runs"]
    }
    assert trained["trl"] == trained["llama-tune"]
    assert report["median"]["trl"]["tokens_per_s"] > 0


def test_distillation_writes_side_by_side_results(
    tiny_model_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    _run(
        "distillation.py",
        *("--teacher", str(tiny_model_dir), "--data", str(data_root), "--only", "throughput"),
        *("--steps", "2", "--warmup", "1", "--rounds", "1", "--batch-size", "4"),
        *("--precision", "fp32", "--output", str(tmp_path)),
    )
    throughput = json.loads((tmp_path / "distillation.json").read_text())["throughput"]
    assert set(throughput["runs"]) == {"llama-tune online", "llama-tune cached", "trl gkd"}
    for runs in throughput["runs"].values():
        (run,) = runs
        assert run["tokens_per_s"] > 0
        assert 0 < run["peak_rss_gib"] < 24
        assert len(run["losses"]) == 2
        assert run["malloc"] == expected_malloc()
    # GKDTrainer reads llama-tune's steps in order: the same examples, so the same tokens.
    tokens = {run["tokens"] for (run,) in throughput["runs"].values()}
    assert len(tokens) == 1
    assert throughput["online_vs_trl"] > 0
    assert throughput["cached_vs_trl"] > 0
    assert len(throughput["cached_vs_trl_rounds"]) == 1


def test_lora_fusion_writes_paired_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    _run(
        "lora_fusion.py",
        *("--model", str(tiny_model_dir), "--rows", "2", "--length", "8"),
        *("--blocks", "2", "--steps", "1", "--precision", "fp32", "--output", str(tmp_path)),
    )
    report = json.loads((tmp_path / "lora_fusion_fp32_2x8.json").read_text())
    for system in ("peft", "fused"):
        assert len(report["seconds_a_step"][system]) == 2
        assert report["median_seconds_a_step"][system] > 0
    assert report["speedup"] > 0
    # In fp32 the fused layers compute peft's gradients, to rounding.
    assert report["largest_gradient_difference"] < 1e-4
