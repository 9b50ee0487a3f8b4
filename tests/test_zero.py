"""DeepSpeed ZeRO through the real launcher: two gloo CPU processes train the tiny Llama under
ZeRO-2 and ZeRO-3 as two data-parallel (DDP) processes do, save the same weights and optimizer
state, and resume from either's checkpoints; the launch's DeepSpeed JSON is checked against the
recipe before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    metrics,
    resumes_to,
    same_optimizers,
    same_steps,
    same_tensors,
    trains_as_one_process,
)
from llama_tune import config, run_folder, runtime, train, zero
from llama_tune.layout import LayoutError

ZERO2 = launch_environment(REPO / "configs" / "deepspeed_zero2.yaml")
ZERO3 = launch_environment(REPO / "configs" / "deepspeed_zero3.yaml")
ZERO3_OFFLOAD = launch_environment(REPO / "configs" / "deepspeed_zero3_offload.yaml")
STEP = Path(run_folder.CHECKPOINTS) / "step-00000002"
ADAPTER = Path(run_folder.ADAPTER) / "adapter_model.safetensors"


def test_zero2_trains_as_ddp_and_resumes_a_ddp_checkpoint(
    ddp_reference, tiny_recipe, tmp_path: Path
) -> None:
    ddp = ddp_reference("lora")
    partitioned = launched(
        tiny_recipe("zero2", **COMPARED["lora"]), *COMPARED_OVERRIDES["lora"], launch=ZERO2
    )
    # The engine's accumulation, clipping and its norm: the same steps as DDP's.
    keys = ("loss", "consistency_loss", "grad_norm", "eval_loss", "lr", COMPARED_METRICS["lora"])
    same_steps(ddp, partitioned, keys)
    adapter = Path(run_folder.ADAPTER) / "adapter_model.safetensors"
    same_tensors(ddp / adapter, partitioned / adapter)
    best = Path(run_folder.BEST) / adapter.name
    same_tensors(ddp / best, partitioned / best)
    # The partitioned optimizer state, gathered into the layout DDP saves.
    same_tensors(ddp / STEP / adapter, partitioned / STEP / adapter)
    same_optimizers(ddp / STEP, partitioned / STEP)
    summary = json.loads((partitioned / run_folder.SUMMARY).read_text())
    assert (summary["processes"], summary["layout"]) == (2, "deepspeed zero-2")
    # DDP's step-2 checkpoint, resumed under ZeRO-2, ends where the uninterrupted run did.
    resumes_to(partitioned, ddp, adapter, ZERO2, tmp_path)


def test_zero3_trains_as_ddp_with_a_consistency_term(ddp_reference, tiny_recipe) -> None:
    # The compared LoRA run adds perturbed copies with a consistency term: a process whose
    # micro-batch holds no copy calls the head all the same, as ZeRO-3 gathers it in every call
    # (a gloo abort at step 3 before).
    ddp = ddp_reference("lora")
    partitioned = launched(
        tiny_recipe("zero3", **COMPARED["lora"]), *COMPARED_OVERRIDES["lora"], launch=ZERO3
    )
    keys = ("loss", "consistency_loss", "grad_norm", "eval_loss", COMPARED_METRICS["lora"])
    same_steps(ddp, partitioned, keys)
    same_tensors(ddp / ADAPTER, partitioned / ADAPTER)


def test_zero2_with_its_optimizer_in_cpu_memory_trains_as_one_process(
    tiny_recipe, tmp_path: Path
) -> None:
    # AdamW steps on the partitions offloaded to CPU memory, and checkpoints gather and
    # restore its state as without offload (ZeRO-3's offload: the bf16 test below).
    settings = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    settings["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    path = tmp_path / "zero2_offload.json"
    path.write_text(json.dumps(settings))
    launch = ZERO2 | {zero.CONFIG_FILE: str(path)}
    layout = "deepspeed zero-2, optimizer state in cpu memory"
    trains_as_one_process(tiny_recipe, [], launch, layout, tmp_path)


def test_zero3_trains_adversarially_as_one_process(tiny_recipe) -> None:
    # PGD's ascent takes autograd.grad inside the forward: ZeRO-3's hooks gather each layer's
    # weights again for it. The reference takes both processes' rows at each step. Without a
    # validation split the first step's is the first forward (ZeRO-3 records its trace then):
    # its ascent may not run the clean graph's backward before the step's (AdversarialObjective
    # reuse_clean_graph; a size-0 weight in the final norm's backward before).
    overrides = ["adversarial.train={method: pgd, steps: 2}", "data.splits.validation=null"]
    settings = {"max_steps": 3, "batch_size": 4}
    one = tiny_recipe("one", **settings | {"batch_size": 8})
    reference = train.run(config.load(one, overrides), one).run_dir
    partitioned = launched(tiny_recipe("zero3", **settings), *overrides, launch=ZERO3)
    keys = ("loss", "ce_loss", "adversarial_ce_loss", "grad_norm")
    same_steps(reference, partitioned, keys)
    adapter = Path(run_folder.ADAPTER) / "adapter_model.safetensors"
    same_tensors(reference / adapter, partitioned / adapter)


@pytest.mark.parametrize(
    ("launch", "quantization"), [(ZERO3, "4bit"), (ZERO2, "8bit")], ids=["zero3-4bit", "zero2-8bit"]
)
def test_zero_trains_a_quantised_base_as_one_process(
    tiny_recipe, tmp_path: Path, launch: dict[str, str], quantization: str
) -> None:
    # ZeRO-3 partitions the 4-bit bytes and gathers them back into the same bitsandbytes
    # parameter, quantisation constants and all. ZeRO-2 holds the 8-bit base whole. A resume
    # reads a frozen base again from its files, as a start does: the adapter's resume under
    # each stage is the bf16 and offloaded tests'.
    stage = 3 if launch is ZERO3 else 2
    overrides = [f"model.quantization={quantization}"]
    layout = f"deepspeed zero-{stage}"
    trains_as_one_process(tiny_recipe, overrides, launch, layout, tmp_path, resumed=False)


FULL_MODEL = Path(run_folder.FULL_MODEL) / "model.safetensors"
OFFLOADED = ", optimizer state and weights in cpu memory"


@pytest.mark.parametrize(
    ("overrides", "saved", "launches"),
    [
        ([], ADAPTER, {"": ZERO3}),
        # A whole model created partitioned without offload: the fp32 test below.
        (["adapter=null"], FULL_MODEL, {OFFLOADED: ZERO3_OFFLOAD}),
    ],
    ids=["lora", "full"],
)
def test_zero3_creates_the_model_partitioned_and_trains_bf16_as_zero2(
    tiny_recipe,
    tmp_path: Path,
    overrides: list[str],
    saved: Path,
    launches: dict[str, dict[str, str]],
) -> None:
    # ZeRO-3 reads the model into each process's partitions (zero.Init), in bf16; ZeRO-2
    # reads it whole and its engine casts everything to bf16. Under ZeRO-3 the engine casts
    # nothing, so the layout casts the adapter, whose fp32 copies keep their initial values.
    # With the weights and AdamW's state offloaded to CPU memory, the same.
    settings = {"max_steps": 4, "batch_size": 4, "checkpoint": {"every": 2}, "precision": "bf16"}
    whole = launched(tiny_recipe("zero2", **settings), *overrides, launch=ZERO2)
    for offloaded, launch in launches.items():
        run = f"zero3{offloaded and '-offloaded'}"
        partitioned = launched(tiny_recipe(run, **settings), *overrides, launch=launch)
        _trains_bf16_as(whole, partitioned, "deepspeed zero-3, created partitioned" + offloaded)
        # A resume puts the checkpoint's fp32 values into the partitions and the fp32 copies.
        resumes_to(partitioned, partitioned, saved, launch, tmp_path)


def _trains_bf16_as(whole: Path, partitioned: Path, layout: str) -> None:
    summaries = [json.loads((run / run_folder.SUMMARY).read_text()) for run in (whole, partitioned)]
    assert summaries[1]["layout"] == layout
    # Counted whole, not by each process's partition.
    assert summaries[1]["parameters"] == summaries[0]["parameters"]
    # The first step is ZeRO-2's to fp32 precision (an adapter left in fp32 gives another
    # gradient norm); later ones differ at bf16's resolution, as ZeRO-3 read whole differs
    # from ZeRO-2 (the stages reduce bf16 gradients in other orders; a fully fine-tuned
    # model's fp32 copies start from its bf16 values).
    for expected, actual in zip(metrics(whole), metrics(partitioned), strict=True):
        tolerance = 1e-6 if expected["step"] <= 1 else 2e-3
        assert sorted(actual) == sorted(expected)
        for key in {"loss", "grad_norm", "eval_loss"} & set(expected):
            assert actual[key] == pytest.approx(expected[key], rel=tolerance), key


def test_zero3_attacks_training_examples_through_the_model_as_ddp(
    ddp_reference, tiny_recipe
) -> None:
    # ZeRO-3 gathers each layer (and the embeddings) in every process's call: the process
    # with fewer rows or rounds joins the other's calls with a filler.
    attacks_as_ddp(ddp_reference, tiny_recipe, ZERO3)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_zero3_trains_long_answers_as_one_process(
    tiny_recipe, data_root: Path, packing: str
) -> None:
    # Alpaca answers of up to 548 tokens: the head runs over 256 answer positions at a time,
    # so one process can have more chunks than the other in a micro-batch (packed rows: at
    # every step), and each call gathers the partitioned head: the other calls it on fillers.
    long_answers = [
        f"data.source={data_root / 'instruction' / 'alpaca_en_demo'}",
        "data.task=instruction",
        "data.max_length=1024",
        "data.max_train_rows=64",
        "data.splits.validation=null",
        f"train.packing={packing}",
    ]
    one = tiny_recipe("one", max_steps=4, batch_size=4)
    reference = train.run(config.load(one, long_answers), one).run_dir
    partitioned = launched(
        tiny_recipe("zero3", max_steps=4, batch_size=2), *long_answers, launch=ZERO3
    )
    same_steps(reference, partitioned, ("loss", "grad_norm"))
    adapter = Path(run_folder.ADAPTER) / "adapter_model.safetensors"
    # One process packs a step's rows into other rows than two do: other orders of fp32 sums,
    # which AdamW's normalised update turns into up to lr (1e-3) a step for an entry whose
    # gradient is near zero (measured: 2.1e-6 and 1.9e-5, one entry each time).
    same_tensors(reference / adapter, partitioned / adapter, 1e-6 if packing == "false" else 1e-4)


def test_zero3_fine_tunes_the_whole_model_as_ddp(ddp_reference, tiny_recipe) -> None:
    ddp = ddp_reference("full")
    # Gradient checkpointing recomputes each partitioned layer in the backward, gathering its
    # weights again; the steps stay DDP's (which runs without).
    partitioned = launched(
        tiny_recipe("zero3", **COMPARED["full"]),
        *COMPARED_OVERRIDES["full"],
        "model.gradient_checkpointing=true",
        launch=ZERO3,
    )
    same_steps(ddp, partitioned, ("loss", "grad_norm", "eval_loss", COMPARED_METRICS["full"]))
    weights = Path(run_folder.FULL_MODEL) / "model.safetensors"
    # The weights ZeRO-3 partitioned, gathered back whole.
    same_tensors(ddp / weights, partitioned / weights, FULL_WEIGHTS_ATOL)
    step_weights = STEP / "model.safetensors"
    same_tensors(ddp / step_weights, partitioned / step_weights, FULL_WEIGHTS_ATOL)
    # Its checkpoint holds DDP's optimizer state; a whole model's resume under ZeRO-3 is the
    # bf16 test's (offloaded), an adapter's the bf16 LoRA test's.
    same_optimizers(ddp / STEP, partitioned / STEP)


def test_the_deepspeed_configs_leave_the_recipe_its_keys() -> None:
    for environment, stage in ((ZERO2, 2), (ZERO3, 3), (ZERO3_OFFLOAD, 3)):
        assert environment["ACCELERATE_USE_DEEPSPEED"] == "true"
        path = REPO / environment[zero.CONFIG_FILE]
        settings = zero.read_config(path)
        assert settings["zero_optimization"]["stage"] == stage
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert settings[key] == "auto"


def _config(tmp_path: Path, **keys: object) -> Path:
    path = tmp_path / "zero.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **keys}))
    return path


def test_auto_keys_take_the_recipes_values(tiny_recipe, tmp_path: Path) -> None:
    recipe = config.load(tiny_recipe(batch_size=4, grad_accumulation=3, max_grad_norm=0.5))
    path = _config(tmp_path, train_micro_batch_size_per_gpu="auto", bf16={"enabled": "auto"})
    filled = zero.fill_config(zero.read_config(path), path, recipe, "bf16")
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 3
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"] == {"enabled": True}
    assert filled["fp16"] == {"enabled": False}
    # No clipping in the recipe: none in the engine.
    unclipped = config.load(tiny_recipe(), ["train.max_grad_norm=null"])
    assert zero.fill_config(zero.read_config(path), path, unclipped, "no")["gradient_clipping"] == 0


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps is 4, but the recipe's "),
        ({"bf16": {"enabled": True}}, "train.precision"),
        ({"optimizer": {"type": "AdamW"}}, "remove the optimizer section"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove the scheduler section"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "nvme"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "stage 3"),
        ({"zero_optimization": None}, "no zero_optimization section"),
    ],
)
def test_a_config_that_contradicts_the_recipe_is_named(
    tiny_recipe, tmp_path: Path, keys: dict, named: str
) -> None:
    recipe = config.load(tiny_recipe())
    path = _config(tmp_path, **keys)
    with pytest.raises(runtime.LaunchError, match=named) as refused:
        zero.fill_config(zero.read_config(path), path, recipe, "no")
    assert str(path) in str(refused.value)


def test_an_unreadable_config_is_named(tmp_path: Path) -> None:
    path = tmp_path / "zero.json"
    path.write_text("{ not json")
    with pytest.raises(runtime.LaunchError, match=r"zero\.json"):
        zero.read_config(path)


@pytest.mark.parametrize("launch", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_zero_skips_nonfinite_steps_as_one_process(tiny_recipe, launch: dict[str, str]) -> None:
    # At lr 1e30 the first step makes the adapter's weights about 1e30 and every later loss
    # NaN: each process's engine must skip those steps, not apply their NaN gradients.
    settings = {"max_steps": 3, "batch_size": 4, "lr": 1e30, "max_grad_norm": None}
    skipping = ["train.max_nonfinite_steps=3"]
    one = tiny_recipe("one", **settings | {"batch_size": 8})
    reference = train.run(config.load(one, skipping), one).run_dir
    partitioned = launched(tiny_recipe("zero", **settings), *skipping, launch=launch)
    summaries = [
        json.loads((run / run_folder.SUMMARY).read_text()) for run in (reference, partitioned)
    ]
    assert [summary["nonfinite_steps"] for summary in summaries] == [2, 2]
    same_tensors(reference / ADAPTER, partitioned / ADAPTER)


def test_nonfinite_skipping_is_refused_without_zero_naming_the_key(tiny_recipe) -> None:
    skipping = config.load(tiny_recipe(), ["train.max_nonfinite_steps=2"])
    with pytest.raises(LayoutError, match=r"train\.max_nonfinite_steps") as refused:
        zero.check_recipe(skipping, 0)
    assert "stage 0" in str(refused.value)
    zero.check_recipe(config.load(tiny_recipe()), 0)
    zero.check_recipe(skipping, 3)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_compiled_layers_are_refused_under_deepspeed_naming_the_key(
    tiny_recipe, stage: int
) -> None:
    compiled = config.load(tiny_recipe(), ["model.compile=true"])
    with pytest.raises(LayoutError, match=r"model\.compile") as refused:
        zero.check_recipe(compiled, stage)
    assert "configs/multi_gpu.yaml" in str(refused.value)


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm"),
        ({"bf16": {"check_grad_overflow": False}}, "check_grad_overflow"),
    ],
)
def test_nonfinite_skipping_needs_the_engines_overflow_check(
    tiny_recipe, tmp_path: Path, keys: dict, named: str
) -> None:
    recipe = config.load(tiny_recipe(), ["train.max_nonfinite_steps=2"])
    path = _config(tmp_path, **keys)
    with pytest.raises(runtime.LaunchError, match=rf"{named} is false.*max_nonfinite_steps"):
        zero.fill_config(zero.read_config(path), path, recipe, "bf16")
    filled = zero.fill_config(zero.read_config(_config(tmp_path)), path, recipe, "bf16")
    assert filled["zero_optimization"]["compute_grad_norm"] is True
    assert filled["bf16"]["check_grad_overflow"] is True


LOSS_SCALE_PROBE = """
import json

import deepspeed
import torch
from types import SimpleNamespace

from deepspeed.accelerator import get_accelerator

from llama_tune import zero

# DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels (AVX512-FP16 or AMX;
# not on an AMD EPYC, whose AVX-512 has no fp16 instructions): a check of the device, not of the
# scaler; torch computes fp16 on any CPU.
get_accelerator().is_fp16_supported = lambda: True

def engine():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
              "fp16": {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 2}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, SimpleNamespace(optimizer=optimizer)  # as Accelerate wraps it

def steps(engine, count):
    for _ in range(count):
        engine.backward(engine(torch.ones(2, 8, dtype=torch.half)).float().pow(2).sum())
        engine.step()

first, first_optimizer = engine()
steps(first, 5)
saved = json.loads(json.dumps(zero.loss_scaler_state(first_optimizer)))
second, second_optimizer = engine()
zero.load_loss_scaler_state(second_optimizer, saved)
steps(first, 2)
steps(second, 2)
third, third_optimizer = engine()
zero.load_loss_scaler_state(third_optimizer, {"scale": 1024.0, "_growth_tracker": 1})
states = [zero.loss_scaler_state(o) for o in (first_optimizer, second_optimizer, third_optimizer)]
print(json.dumps([saved, *states]))
"""


def test_deepspeeds_fp16_loss_scale_is_saved_and_restored(tmp_path: Path) -> None:
    # A real ZeRO-2 fp16 engine on the CPU (llama-tune trains fp16 on GPUs alone), its scale
    # doubling every two steps: saved after 5 steps and restored into a fresh engine, the two
    # go on alike; a GradScaler's scale (a DDP run's checkpoint) carries over alone. Fails if
    # DeepSpeed renames the scaler's attributes.
    probe = tmp_path / "probe.py"
    probe.write_text(LOSS_SCALE_PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "1", str(probe)]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved, first, second, third = json.loads(done.stdout.strip().splitlines()[-1])
    assert saved["scale"] == 64
    assert saved["deepspeed"] == {
        "cur_scale": 64,
        "cur_iter": 5,
        "last_overflow_iter": -1,
        "cur_hysteresis": 2,
    }
    assert first == second
    assert first["scale"] == 128
    assert third["scale"] == 1024
    assert third["deepspeed"]["cur_iter"] == 0
