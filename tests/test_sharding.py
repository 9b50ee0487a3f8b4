"""FSDP2 through the real launcher: two gloo CPU processes shard the tiny Llama and train as two
data-parallel (DDP) processes do, save the same weights, and resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from launched import (
    launch_environment,
    launched,
    resumes_to,
    same_optimizers,
    same_steps,
    same_tensors,
)
from llama_tune import config, run_folder, runtime, sharding
from llama_tune.layout import LayoutError

FSDP = launch_environment(REPO / "configs" / "fsdp.yaml")


def test_fsdp_trains_as_ddp_and_saves_the_same_adapters(tiny_recipe) -> None:
    settings = {"max_steps": 4, "batch_size": 4, "grad_accumulation": 2}
    sections = {"checkpoint": {"every": 2}, "validation": {"every": 1, "best_metric": "eval_loss"}}
    # 20 validation rows make 5 eval batches: one process runs an extra forward, without
    # which the other would wait for it in every eval.
    rows = "data.max_eval_rows=20"
    ddp = launched(tiny_recipe("ddp", **sections, **settings), rows)
    fsdp = launched(tiny_recipe("fsdp", **sections, **settings), rows, launch=FSDP)
    same_steps(ddp, fsdp, ("loss", "grad_norm", "eval_loss"))
    adapter = Path(run_folder.ADAPTER) / "adapter_model.safetensors"
    same_tensors(ddp / adapter, fsdp / adapter)
    # best/ holds the adapter of the lowest eval loss, gathered from every process.
    best = Path(run_folder.BEST)
    record = json.loads((fsdp / best / run_folder.BEST_FILE).read_text())
    expected = json.loads((ddp / best / run_folder.BEST_FILE).read_text())
    assert record == expected | {"value": pytest.approx(expected["value"], rel=1e-5)}
    same_tensors(ddp / best / adapter.name, fsdp / best / adapter.name)
    # The checkpoint gathered every shard: the adapter and the optimizer as DDP saved them.
    step = Path(run_folder.CHECKPOINTS) / "step-00000002"
    same_tensors(ddp / step / adapter, fsdp / step / adapter)
    same_optimizers(ddp / step, fsdp / step)
    summary = json.loads((fsdp / run_folder.SUMMARY).read_text())
    assert summary["processes"] == 2
    # Stopped after the step-2 checkpoint, each run resumes under FSDP: its own checkpoint
    # and DDP's (the same files) both end where the uninterrupted run did.
    for stopped in (fsdp, ddp):
        resumes_to(fsdp, stopped, adapter, FSDP)


def test_fsdp_fine_tunes_the_whole_model_as_ddp(tiny_recipe) -> None:
    settings = {"max_steps": 4, "batch_size": 4, "lr": 1e-3}
    full = ["adapter=null"]
    ddp = launched(tiny_recipe("ddp", checkpoint={"every": 2}, **settings), *full)
    fsdp = launched(tiny_recipe("fsdp", checkpoint={"every": 2}, **settings), *full, launch=FSDP)
    same_steps(ddp, fsdp, ("loss", "grad_norm", "eval_loss"))
    weights = Path(run_folder.FULL_MODEL) / "model.safetensors"
    same_tensors(ddp / weights, fsdp / weights)
    step = Path(run_folder.CHECKPOINTS) / "step-00000002" / "model.safetensors"
    same_tensors(ddp / step, fsdp / step)
    # The saved model loads as any Hugging Face model.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(fsdp / run_folder.FULL_MODEL).num_parameters() > 0
    resumes_to(fsdp, fsdp, weights, FSDP)


def test_the_fsdp_config_asks_for_fsdp2_with_nothing_llama_tune_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert FSDP["ACCELERATE_USE_FSDP"] == "true"
    assert FSDP["FSDP_VERSION"] == "2"
    for name, value in (FSDP | {"WORLD_SIZE": "2"}).items():
        monkeypatch.setenv(name, value)
    runtime.check_launch()


@pytest.mark.parametrize(
    ("key", "overrides"),
    [
        ("model.quantization", ["model.quantization=4bit"]),
        ("model.gradient_checkpointing", ["model.gradient_checkpointing=true"]),
        ("validation.metric_rows", ["validation.every=2", "validation.metric_rows=8"]),
        ("adversarial", ["adversarial.train.method=fgm"]),
        (
            "distill.on_policy",
            ["distill.teacher.name=smollm2-135m-instruct", "distill.on_policy={}"],
        ),
    ],
)
def test_what_fsdp_does_not_do_yet_is_refused_naming_the_key(
    tiny_recipe, key: str, overrides: list[str]
) -> None:
    with pytest.raises(LayoutError, match=key) as refused:
        sharding.check_recipe(config.load(tiny_recipe(), overrides))
    assert "configs/multi_gpu.yaml" in str(refused.value)
    sharding.check_recipe(config.load(tiny_recipe()))
