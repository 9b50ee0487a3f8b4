"""Where models are created, and what a run records of its device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llama_tune import models, runtime, schema


def test_models_are_created_on_the_process_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # A process of a launched run on its GPU.
    state = SimpleNamespace(device=torch.device("cuda:1"))
    monkeypatch.setattr(runtime, "process_state", lambda: state)
    assert runtime.model_device() == torch.device("cuda:1")


def test_a_deepspeed_launch_without_deepspeed_names_the_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    runtime.check_launch()
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(runtime.LaunchError, match="not installed: pip install --no-build"):
        runtime.check_launch()


@pytest.mark.parametrize(
    ("launch", "refusal"),
    [
        ({"FSDP_VERSION": "1"}, "FSDP version 1; llama-tune shards with FSDP2"),
        ({"WORLD_SIZE": "1"}, "but this run has one"),
        ({"FSDP_OFFLOAD_PARAMS": "true"}, "sets fsdp_offload_params"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "model.gradient_checkpointing"),
        ({}, None),
    ],
)
def test_an_fsdp_launch_is_checked_before_any_model_loads(
    monkeypatch: pytest.MonkeyPatch, launch: dict[str, str], refusal: str | None
) -> None:
    # What `accelerate launch --config_file configs/fsdp.yaml` sets, on 2 processes.
    environment = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}
    for name, value in (environment | launch).items():
        monkeypatch.setenv(name, value)
    assert runtime.fsdp_requested()
    if refusal is None:
        runtime.check_launch()
        return
    with pytest.raises(runtime.LaunchError, match=refusal):
        runtime.check_launch()


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    runtime.check_launch()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(runtime.LaunchError, match=r"4 processes launched .* 2 GPU"):
        runtime.check_launch()


def test_base_model_is_read_straight_onto_the_model_device(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    # The meta device stands in for a GPU: a model loaded anywhere else fails the check.
    monkeypatch.setattr(models, "model_device", lambda: torch.device("meta"))
    model = models.load_base_model(schema.ModelConfig(name=str(tiny_model_dir)))
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}


def test_the_cpu_reports_no_peak_memory() -> None:
    assert runtime.peak_memory_gib(torch.device("cpu")) is None
    assert runtime.device_name(torch.device("cpu")) == "cpu"


def test_bf16_on_a_cpu_without_native_bf16_is_named_slow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    runtime._say_bf16_is_slow.cache_clear()
    assert runtime.resolve_precision("auto") == "no"
    assert capsys.readouterr().err == ""
    assert runtime.resolve_precision("bf16") == "bf16"
    assert runtime.resolve_precision("bf16") == "bf16"
    # Said once per process, naming the key and what auto would pick.
    assert capsys.readouterr().err.count("train.precision is bf16") == 1
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.resolve_precision("auto") == "bf16"


@pytest.mark.parametrize(("major", "expected"), [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_auto_picks_fp16_on_gpus_that_only_store_bf16(
    monkeypatch: pytest.MonkeyPatch, major: int, expected: str
) -> None:
    # A V100 (7.0) or T4 (7.5) can hold bf16 tensors, so torch's default check says yes, but
    # only from Ampere (8.0) on do its tensor cores multiply them; the probe must not allocate.
    cuda = runtime.torch.cuda
    monkeypatch.setattr(runtime.torch.version, "hip", None)
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "get_device_properties", lambda *_: SimpleNamespace(major=major))
    monkeypatch.setattr(cuda, "_check_bf16_tensor_supported", lambda *_: pytest.fail("probed"))
    assert runtime.resolve_precision("auto") == expected


def test_auto_picks_bf16_where_its_products_beat_fp32s(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU may report bf16 instructions and still multiply bf16 slower than fp32 (a Xeon
    # without AMX: 168 against 316 GFLOP/s), so auto measures.
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    for seconds, fast in [((1.0, 0.5), True), ((1.0, 1.9), False), ((1.0, 0.9), False)]:
        monkeypatch.setattr(runtime, "_product_seconds", lambda seconds=seconds: seconds)
        assert runtime._bf16_beats_fp32() is fast
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(runtime, "_product_seconds", lambda: pytest.fail("measured"))
    assert runtime._bf16_beats_fp32() is False


def test_the_product_rates_are_measured() -> None:
    # Real products in both dtypes, each timed: two positive, finite durations.
    assert all(0 < seconds < float("inf") for seconds in runtime._product_seconds(rounds=2))


PROCESSES_AGREE = """
import os
import torch
from llama_tune import runtime
runtime.cpu_has_native_bf16 = lambda: True
rank = runtime.process_state().process_index
# The main process measures bf16 fast, the other slow: both take the main one's answer.
runtime._product_seconds = lambda: (1.0, 0.5) if rank == 0 else (1.0, 2.0)
# One write of the whole line: the two processes share the pipe, and print() writes the text and
# its newline apart, so that two lines could interleave.
fast = runtime.cpu_has_fast_bf16()
# The process group waits an hour for a late process (runtime.PROCESS_GROUP_TIMEOUT).
timeout = torch.distributed.group.WORLD._get_backend(torch.device("cpu")).options._timeout
os.write(1, f"rank {rank}: {fast} {timeout}\\n".encode())
"""


def test_the_processes_of_a_cpu_run_agree_on_bf16(tmp_path: Path) -> None:
    script = tmp_path / "agree.py"
    script.write_text(PROCESSES_AGREE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*command, "--nproc_per_node", "2", str(script)],
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.split("\n"))[-2:] == ["rank 0: True 1:00:00", "rank 1: True 1:00:00"]
