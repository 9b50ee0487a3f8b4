"""Training through the real launcher under a layout (DDP, FSDP, DeepSpeed ZeRO) on two gloo
CPU processes, and comparing what two runs logged and saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEST_DATA, torchrun
from llama_tune import config, run_folder, train

TIED = {"lm_head.weight": "model.embed_tokens.weight"}
COMPARED = {
    "lora": {
        "max_steps": 4,
        "batch_size": 4,
        "grad_accumulation": 2,
        "checkpoint": {"every": 2},
        "validation": {"every": 1, "best_metric": "eval_loss", "metric_rows": 5},
    },
    "full": {
        "max_steps": 4,
        "batch_size": 4,
        # Fast enough for a summary word or two by step 4: a ROUGE above 0 to compare.
        "lr": 5e-3,
        "checkpoint": {"every": 2},
        "validation": {"every": 2, "metric_rows": 5},
    },
    "attack": {"max_steps": 3, "batch_size": 4},
}
"""The runs each layout is compared with DDP on (tiny recipe keys), by name."""
# Five metric rows in batches of two: one process scores three rows in two batches, the other
# two in one; a spread-out model's second process runs a filler batch to keep up.
SCORING = ["evaluation.batch_size=2", "evaluation.max_new_tokens=5"]
GRADIENT_ATTACK = (
    "adversarial.augment={methods: [gradient], probability: 0.4, budget: 0.25, mode: add}"
)
"""Some of each process's rows attacked through the model, in as many rounds as their budgets
ask. On the tiny recipe's rows the processes attack unequally: at one step one process has no
row to attack while the other takes 3 rounds, at another they need 3 and 4 rounds."""
COMPARED_OVERRIDES = {
    # 20 validation rows make 5 eval batches: one process runs an extra forward, without which
    # a sharded model's other process would wait for it in every eval.
    # Text-space adversarial examples (data alone, and the input embeddings' neighbours) with
    # a consistency term on each pair: the same steps under every layout.
    "lora": [
        "data.max_eval_rows=20",
        *SCORING,
        "adversarial.augment={methods: [char, word, neighbour], mode: add, consistency: 1.0}",
    ],
    # Full fine-tuning learns to summarise (the eight emails of tests/data both split): task
    # metrics by generation.
    "full": [
        "adapter=null",
        f"data.source={TEST_DATA / 'summaries'}",
        "data.task=summarisation",
        "data.splits.train=validation",
        *SCORING,
    ],
    # Without a validation split, the first attack comes before any forward of the objective
    # (FSDP has not chosen its root yet).
    "attack": [GRADIENT_ATTACK, "data.splits.validation=null"],
}
COMPARED_METRICS = {"lora": "eval_accuracy", "full": "eval_rougeL"}
FULL_WEIGHTS_ATOL = 5e-6
"""How far two layouts' fully tuned weights may drift apart in 4 steps at lr 5e-3: AdamW divides
by the root of the second moment, so a near-zero gradient's fp32 noise (another order of
additions) moves a weight by up to about lr times its relative size (measured: 1.6e-6, one of
the embedding's 3.1M entries)."""


def launch_environment(config_file: Path) -> dict[str, str]:
    """The FSDP or DeepSpeed variables `accelerate launch --config_file CONFIG_FILE` gives
    each process, made by Accelerate's own launcher code (its GPU launch, which torchrun
    stands in for)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    arguments = ["--config_file", str(config_file), "--num_processes", "2", "-m", "llama_tune"]
    parsed, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(arguments))
    if not parsed.use_deepspeed:
        environment = prepare_multi_gpu_env(parsed)
        return {name: value for name, value in environment.items() if "FSDP" in name}
    # As `accelerate launch` does before its DeepSpeed launcher.
    parsed.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, environment = prepare_deepspeed_cmd_env(parsed)
    return {name: value for name, value in environment.items() if "DEEPSPEED" in name}


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / run_folder.METRICS).read_text().splitlines()
    return [json.loads(line) for line in lines]


def launched(recipe: Path, *arguments: str, launch: dict[str, str] | None = None) -> Path:
    """Train `recipe` on two processes; its run folder."""
    done = torchrun(["train", str(recipe), *arguments], launch=launch)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return recipe.parent / recipe.stem


def same_steps(expected: Path, actual: Path, keys: tuple[str, ...]) -> None:
    """The two runs logged the same steps, with each of `keys` (each logged somewhere) alike."""
    one, two = metrics(expected), metrics(actual)
    assert [line["step"] for line in one] == [line["step"] for line in two]
    assert all(any(key in line for line in one) for key in keys), keys
    for first, second in zip(one, two, strict=True):
        for key in keys:
            assert (key in first) == (key in second), (first["step"], key)
            if key in first:
                # The gradient norm sums the squares of each shard, then of the shards: another
                # order of fp32 additions than over whole gradients (the 3M entries of the
                # tiny model's embedding differ in the 6th digit when it trains).
                tolerance = 1e-4 if key == "grad_norm" else 1e-5
                # A divergence between near-equal distributions (a distillation loss of 0.003)
                # is a difference of close fp32 numbers: absolute noise of about 1e-7.
                assert second[key] == pytest.approx(first[key], rel=tolerance, abs=1e-6), (
                    first["step"],
                    key,
                )


def same_tensors(expected: Path, actual: Path, atol: float = 1e-6) -> None:
    # A tied head and embedding are stored once, under either name: safetensors' save_model
    # (an unsharded run's checkpoint) keeps the head's, the gathered state the embedding's;
    # loading restores the tie from either.
    first, second = (
        {TIED.get(name, name): value for name, value in load_file(path).items()}
        for path in (expected, actual)
    )
    assert sorted(first) == sorted(second)
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=1e-5, atol=atol)


def same_optimizers(expected: Path, actual: Path) -> None:
    """Two checkpoints' optimizer files hold the same index-keyed AdamW state."""
    one, two = (torch.load(path / "optimizer.pt", weights_only=True) for path in (expected, actual))
    assert one["param_groups"] == two["param_groups"]
    assert sorted(one["state"]) == sorted(two["state"])
    for index, values in one["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(two["state"][index][name], value)


def resumes_to(
    expected: Path, stopped: Path, weights: Path, launch: dict[str, str], folder: Path
) -> None:
    """Resume a copy of `stopped` (made in `folder`) under `launch`, from its step-2
    checkpoint, as if it had stopped there; check that it takes `expected`'s steps and ends
    with its `weights`."""
    resumed = folder / f"{stopped.name}-resumed"
    shutil.copytree(stopped, resumed)
    shutil.rmtree(resumed / weights.parent)
    summary = json.loads((resumed / run_folder.SUMMARY).read_text())
    (resumed / run_folder.SUMMARY).write_text(json.dumps(summary | {"status": "interrupted"}))
    done = torchrun(["train", str(resumed), "--resume"], launch=launch)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "resuming from" in done.stdout
    same_steps(expected, resumed, ("loss", "grad_norm"))
    same_tensors(expected / weights, resumed / weights)


def trains_as_one_process(
    tiny_recipe,
    overrides: list[str],
    launch: dict[str, str],
    layout: str,
    folder: Path,
    resumed: bool = True,
) -> None:
    """Train 4 steps on two processes under `launch`, whose summary names `layout`; check
    that they take the steps and save the adapter of one process taking both processes' rows,
    and (`resumed`) that their step-2 checkpoint resumes to the same end."""
    settings = {"max_steps": 4, "batch_size": 4, "checkpoint": {"every": 2}}
    one = tiny_recipe("one", **settings | {"batch_size": 8})
    reference = train.run(config.load(one, overrides), one).run_dir
    spread = launched(tiny_recipe("spread", **settings), *overrides, launch=launch)
    summary = json.loads((spread / run_folder.SUMMARY).read_text())
    assert (summary["processes"], summary["layout"]) == (2, layout)
    same_steps(reference, spread, ("loss", "grad_norm", "eval_loss"))
    adapter = Path(run_folder.ADAPTER) / "adapter_model.safetensors"
    same_tensors(reference / adapter, spread / adapter)
    if resumed:
        resumes_to(spread, spread, adapter, launch, folder)


def attacks_as_ddp(ddp_reference, tiny_recipe, launch: dict[str, str]) -> None:
    """Train 3 steps attacking examples through the model under `launch`; check that they take
    DDP's steps (each process attacking its own rows with its whole model) and save its
    adapter."""
    ddp = ddp_reference("attack")
    spread = launched(
        tiny_recipe("spread", **COMPARED["attack"]), *COMPARED_OVERRIDES["attack"], launch=launch
    )
    same_steps(ddp, spread, ("loss", "grad_norm"))
    adapter = Path(run_folder.ADAPTER) / "adapter_model.safetensors"
    same_tensors(ddp / adapter, spread / adapter)
