"""FSDP2 through the real launcher: two gloo CPU processes shard the tiny Llama and train as two
data-parallel (DDP) processes do, save the same weights, and resume exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO
from launched import (
    COMPARED,
    COMPARED_METRICS,
    COMPARED_OVERRIDES,
    FULL_WEIGHTS_ATOL,
    attacks_as_ddp,
    launch_environment,
    launched,
    resumes_to,
    same_optimizers,
    same_steps,
    same_tensors,
    trains_as_one_process,
)
from llama_tune import config, run_folder, runtime, sharding, train
from llama_tune.layout import LayoutError

FSDP = launch_environment(REPO / "configs" / "fsdp.yaml")
FSDP_QLORA = launch_environment(REPO / "configs" / "fsdp_qlora.yaml")


def test_fsdp_trains_as_ddp_and_saves_the_same_adapters(
    ddp_reference, tiny_recipe, tmp_path: Path
) -> None:
    ddp = ddp_reference("lora")
    # Gradient checkpointing recomputes each sharded layer in the backward, gathering its
    # weights again; the steps stay DDP's (which runs without).
    checkpointing = "model.gradient_checkpointing=true"
    fsdp = launched(
        tiny_recipe("fsdp", **COMPARED["lora"]),
        *COMPARED_OVERRIDES["lora"],
        checkpointing,
        launch=FSDP,
    )
    keys = ("loss", "consistency_loss", "grad_norm", "eval_loss", COMPARED_METRICS["lora"])
    same_steps(ddp, fsdp, keys)
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
    # DDP's step-2 checkpoint (the same files as FSDP's, checked above), resumed under FSDP,
    # ends where the uninterrupted run did.
    resumes_to(fsdp, ddp, adapter, FSDP, tmp_path)


def test_fsdp_processes_take_their_weights_from_the_main_process(tiny_recipe) -> None:
    # Only the main process reads the model and makes the adapter; the other makes both on
    # the meta device and receives its shards: any other value would change the steps, which
    # every launched FSDP run here compares with DDP or with one process taking both
    # processes' rows (the PGD run below, whose recipe shards this way).
    recipe = config.load(tiny_recipe(), ["adversarial.train={method: pgd, steps: 2}"])
    assert sharding.FullyShardedLayout(recipe).from_main
    # Neighbour augmentation too: its substitute table comes from the main process (the DDP
    # comparison above, whose augmentation draws neighbours, runs this way).
    neighbours = ["adversarial.augment={methods: [neighbour]}"]
    assert sharding.FullyShardedLayout(config.load(tiny_recipe(), neighbours)).from_main
    # A quantised base's constants are no weights to send: every process reads it.
    quantised = config.load(tiny_recipe(), ["model.quantization=4bit"])
    assert not sharding.FullyShardedLayout(quantised).from_main


def test_fsdp_trains_qlora_as_one_process(tiny_recipe, tmp_path: Path) -> None:
    # The 4-bit weights are sharded as bytes; bitsandbytes gives the gathered ones their
    # quantisation constants back (kept whole on every process). Gradient checkpointing
    # gathers each layer again in the backward.
    quantised = ["model.quantization=4bit", "model.gradient_checkpointing=true"]
    trains_as_one_process(tiny_recipe, quantised, FSDP_QLORA, "fsdp", tmp_path)


def test_fsdp_attacks_training_examples_through_the_model_as_ddp(
    ddp_reference, tiny_recipe
) -> None:
    # Each process attacks its own rows, but every forward and backward of the sharded model
    # needs both: the one with fewer rows or rounds joins the other's calls with a filler.
    attacks_as_ddp(ddp_reference, tiny_recipe, FSDP)


@pytest.mark.parametrize("method", ["pgd", "smart"])
def test_fsdp_trains_adversarially_as_unsharded_processes(tiny_recipe, method: str) -> None:
    # The ascent takes autograd.grad inside the forward, whose backward reshards FSDP's root
    # (embeddings, norm, head) before the forward is done. PGD's first ascent step reuses the
    # clean graph, and it is deterministic: the reference is one process taking both
    # processes' rows. SMART runs the decoder and head outside the objective's forward, from
    # a random start drawn by each process: the reference is DDP.
    overrides = [f"adversarial.train={{method: {method}, steps: 2}}"]
    settings = {"max_steps": 3, "batch_size": 4}
    if method == "pgd":
        one = tiny_recipe("one", **settings | {"batch_size": 8})
        reference = train.run(config.load(one, overrides), one).run_dir
    else:
        reference = launched(tiny_recipe("ddp", **settings), *overrides)
    sharded = launched(tiny_recipe("fsdp", **settings), *overrides, launch=FSDP)
    term = "adversarial_ce_loss" if method == "pgd" else "smoothness_loss"
    same_steps(reference, sharded, ("loss", "ce_loss", term, "grad_norm", "eval_loss"))
    adapter = Path(run_folder.ADAPTER) / "adapter_model.safetensors"
    same_tensors(reference / adapter, sharded / adapter)


def test_fsdp_fine_tunes_the_whole_model_as_ddp(ddp_reference, tiny_recipe, tmp_path: Path) -> None:
    ddp = ddp_reference("full")
    fsdp = launched(
        tiny_recipe("fsdp", **COMPARED["full"]),
        *COMPARED_OVERRIDES["full"],
        "model.gradient_checkpointing=true",
        launch=FSDP,
    )
    same_steps(ddp, fsdp, ("loss", "grad_norm", "eval_loss", COMPARED_METRICS["full"]))
    weights = Path(run_folder.FULL_MODEL) / "model.safetensors"
    same_tensors(ddp / weights, fsdp / weights, FULL_WEIGHTS_ATOL)
    step = Path(run_folder.CHECKPOINTS) / "step-00000002" / "model.safetensors"
    same_tensors(ddp / step, fsdp / step, FULL_WEIGHTS_ATOL)
    # The saved model loads as any Hugging Face model.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(fsdp / run_folder.FULL_MODEL).num_parameters() > 0
    resumes_to(fsdp, fsdp, weights, FSDP, tmp_path)


def test_the_fsdp_config_asks_for_fsdp2_with_nothing_llama_tune_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert FSDP["ACCELERATE_USE_FSDP"] == "true"
    assert FSDP["FSDP_VERSION"] == "2"
    for name, value in (FSDP | {"WORLD_SIZE": "2"}).items():
        monkeypatch.setenv(name, value)
    runtime.check_launch()


def test_an_8bit_base_is_refused_under_fsdp_naming_the_key(tiny_recipe) -> None:
    # bitsandbytes gives FSDP's gathered 8-bit weights no scales back (4-bit is tested above).
    eight_bit = ["model.quantization=8bit"]
    with pytest.raises(LayoutError, match=re.escape("model.quantization (8bit)")) as refused:
        sharding.check_recipe(config.load(tiny_recipe(), eight_bit))
    assert "configs/multi_gpu.yaml" in str(refused.value)
    sharding.check_recipe(config.load(tiny_recipe()))


def test_compiled_layers_are_refused_under_fsdp_naming_the_key(tiny_recipe) -> None:
    with pytest.raises(LayoutError, match=re.escape("model.compile")) as refused:
        sharding.check_recipe(config.load(tiny_recipe(), ["model.compile=true"]))
    assert "configs/multi_gpu.yaml" in str(refused.value)
