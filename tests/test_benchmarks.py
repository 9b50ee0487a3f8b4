"""The benchmark scripts run end to end on the tiny model and write well-formed results (the
figures themselves are measured with `make bench`, never asserted)."""

from __future__ import annotations

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


# Two rounds once, to check the per-round ratios; one for the packed task (each round starts
# both systems anew, some 15 s on two cores).
@pytest.mark.parametrize(("task", "rounds"), [("sst2", 2), ("alpaca", 1)])
def test_train_throughput_writes_side_by_side_results(
    task: str, rounds: int, tiny_model_dir: Path, data_root: Path, tmp_path: Path
) -> None:
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
