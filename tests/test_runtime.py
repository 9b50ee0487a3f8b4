"""Where models are created, and what a run records of its device."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llama_tune import models, runtime, schema


@pytest.mark.parametrize(
    ("launcher_flag", "expected"),
    [(None, "cuda:1"), ("ACCELERATE_USE_FSDP", "cpu"), ("ACCELERATE_USE_DEEPSPEED", "cpu")],
)
def test_models_are_created_on_the_process_accelerator_unless_sharded(
    monkeypatch: pytest.MonkeyPatch, launcher_flag: str | None, expected: str
) -> None:
    # A process of a launched run on its GPU; FSDP and DeepSpeed shard from the CPU instead.
    monkeypatch.setattr(
        runtime, "process_state", lambda: SimpleNamespace(device=torch.device("cuda:1"))
    )
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    if launcher_flag is not None:
        monkeypatch.setenv(launcher_flag, "true")
    assert runtime.model_device() == torch.device(expected)


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
