"""DeepSpeed ZeRO, when the launch asks for it (`configs/deepspeed_zero2.yaml`, `zero3.yaml`).

The launch's DeepSpeed JSON gives the ZeRO stage and its tuning; the recipe gives what the
engine must agree on with the loop: micro-batch, accumulation, clipping and precision. Those
keys are filled from the recipe where the JSON says "auto", and a value that contradicts the
recipe stops the run naming both. The engine clips and steps inside the backward of a step's
last micro-batch (Accelerate's DeepSpeed path); llama-tune's scheduler sets its learning rate.

Weights and optimizer state are gathered per parameter with DeepSpeed's full-tensor API into the
unsharded checkpoint layout, so a ZeRO checkpoint resumes under DDP or FSDP and back.
DeepSpeed itself (an optional dependency, seconds to import) is imported where it is used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from safetensors import safe_open

from llama_tune import checkpoint, layout, models, schema
from llama_tune.objective import AGREED_CALLS
from llama_tune.runtime import PROCESS_GROUP_TIMEOUT, LaunchError

CONFIG_FILE = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
"""Where `accelerate launch` puts the DeepSpeed JSON its config names."""
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
LOSS_SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""What DeepSpeed's dynamic (fp16) loss scaler changes as it trains; the rest is its config."""
OFFLOADED = {"offload_optimizer": "optimizer state", "offload_param": "weights"}
"""What each of the JSON's offload settings puts in CPU memory."""
REFUSED_SECTIONS = {
    "optimizer": "llama-tune builds AdamW from the recipe's train section",
    "scheduler": "llama-tune sets the learning rate from train.scheduler",
}


def read_config(path: str | Path) -> dict[str, Any]:
    """The launch's DeepSpeed JSON, checked for what llama-tune does not hand to DeepSpeed."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise LaunchError(f"the launch's DeepSpeed config {path}: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
        raise LaunchError(f"{path}: no zero_optimization section (see configs/deepspeed/)")
    for section, reason in REFUSED_SECTIONS.items():
        if section in config:
            raise LaunchError(f"{path}: remove the {section} section; {reason}")
    zero = config["zero_optimization"]
    for offload in OFFLOADED:
        device = offload_device(config, offload)
        if device not in ("none", "cpu"):
            raise LaunchError(
                f"{path}: zero_optimization.{offload} to {device} is not applied by llama-tune "
                'yet: offload to "cpu" or remove it'
            )
    if offload_device(config, "offload_param") == "cpu" and zero.get("stage") != 3:
        raise LaunchError(f"{path}: zero_optimization.offload_param needs stage 3")
    return config


def offload_device(config: dict[str, Any], offload: str) -> str:
    """Where the JSON's `zero_optimization.<offload>` puts its tensors ("none", "cpu", ...)."""
    return str((config["zero_optimization"].get(offload) or {}).get("device", "none"))


def fill_config(
    config: dict[str, Any], path: str | Path, recipe: schema.Recipe, mixed_precision: str
) -> dict[str, Any]:
    """A copy of `config` with the keys the recipe decides filled in; `auto` takes the
    recipe's value, anything else must equal it."""
    train = recipe.train
    decided = {
        "train_micro_batch_size_per_gpu": (train.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (train.grad_accumulation, "train.grad_accumulation"),
        # 0 turns DeepSpeed's clipping off.
        "gradient_clipping": (train.max_grad_norm or 0.0, "train.max_grad_norm"),
        "bf16.enabled": (mixed_precision == "bf16", "train.precision"),
        "fp16.enabled": (mixed_precision == "fp16", "train.precision"),
    }
    if train.max_nonfinite_steps > 0:
        # How ZeRO-1 and 2 find a non-finite step to skip: the gradient norm (fp32) or an
        # overflow check (bf16). ZeRO-3 checks the norm in every precision.
        skipping = (True, "train.max_nonfinite_steps")
        decided["zero_optimization.compute_grad_norm"] = skipping
        if mixed_precision == "bf16":
            decided["bf16.check_grad_overflow"] = skipping
    filled = json.loads(json.dumps(config))
    for key, (wanted, recipe_key) in decided.items():
        *sections, name = key.split(".")
        holder = filled
        for section in sections:
            holder = holder.setdefault(section, {})
        given = holder.get(name, "auto")
        if given != "auto" and given != wanted:
            raise LaunchError(
                f"{path}: {key} is {json.dumps(given)}, but the recipe's {recipe_key} makes it "
                f'{json.dumps(wanted)}: set it to "auto"'
            )
        holder[name] = wanted
    # DeepSpeed derives the global batch from the two above and the process count.
    if filled.get("train_batch_size", "auto") == "auto":
        filled.pop("train_batch_size", None)
    # The optimizer is torch's AdamW, which ZeRO partitions like its own; with the optimizer
    # offloaded it steps on the CPU (DeepSpeed's own CPU Adam would need a compiled extension
    # and keeps another state layout).
    filled["zero_allow_untested_optimizer"] = True
    if offload_device(filled, "offload_optimizer") == "cpu":
        filled["zero_force_ds_cpu_optimizer"] = False
    return filled


def check_recipe(recipe: schema.Recipe, stage: int) -> None:
    """Refuse, before loading anything, what llama-tune's ZeRO does not do yet."""
    # The engine steps inside the last backward, before the loop knows the step's loss. Its
    # ZeRO optimizers (stages 1-3) skip a step whose gradients overflow, and a non-finite
    # loss makes them NaN; without ZeRO the optimizer would apply them.
    refused = {"train.max_nonfinite_steps": recipe.train.max_nonfinite_steps > 0 and stage == 0}
    layout.refuse(refused, "DeepSpeed without ZeRO (stage 0)", "set zero_optimization.stage")
    # Not measured: compiled layers inside DeepSpeed's engine, whose hooks partition them.
    compiled = {"model.compile": recipe.model.compile}
    layout.refuse(compiled, "DeepSpeed", "launch with configs/multi_gpu.yaml (DDP)")


class ZeroLayout(layout.Layout):
    """ZeRO stage 1 or 2 (optimizer state and gradients partitioned over the processes) or 3
    (the weights too)."""

    gathers = True

    def __init__(self, recipe: schema.Recipe, mixed_precision: str) -> None:
        path = os.environ.get(CONFIG_FILE)
        if not path:
            raise LaunchError(
                "the launch asks for DeepSpeed without a DeepSpeed config file: launch with "
                "configs/deepspeed_zero2.yaml or configs/deepspeed_zero3.yaml"
            )
        self.config = fill_config(read_config(path), path, recipe, mixed_precision)
        self.stage = int(self.config["zero_optimization"].get("stage", 0))
        # ZeRO-3's hooks gather each module's weights from every process when it is called.
        self.spreads_weights = self.stage == 3
        self.weights_whole_per_module = self.stage == 3
        self.name = f"deepspeed zero-{self.stage}"
        check_recipe(recipe, self.stage)
        self.quantised = recipe.model.quantization != "none"
        # ZeRO-3 creates the model already partitioned (zero.Init): the main process reads
        # the files and each process keeps its part, so no process ever holds the whole
        # model. A quantised base is quantised on each process's device instead.
        self.creates_partitioned = self.stage == 3 and not self.quantised
        if self.creates_partitioned:
            self.name += ", created partitioned"
        offloaded = [
            what for key, what in OFFLOADED.items() if offload_device(self.config, key) == "cpu"
        ]
        if offloaded:
            self.name += f", {' and '.join(offloaded)} in cpu memory"
        # The half dtype DeepSpeed holds the model in (bf16, fp16); None in fp32.
        self.half = None
        if mixed_precision != "no":
            self.half = models.DTYPES[models.AUTO_DTYPES[mixed_precision]]
        self.masters: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        # A resumed checkpoint's weights for parameters created partitioned, set after
        # the engine is made (its fp32 copies included), tensor by tensor.
        self.resumed_weights: tuple[Path, list[tuple[torch.nn.Parameter, str]]] | None = None

    def accelerator(self, **settings: Any) -> Accelerator:
        from transformers.integrations import unset_hf_deepspeed_config

        plugin = DeepSpeedPlugin(hf_ds_config=self.config, zero3_init_flag=False)
        # Without a GPU, Accelerate would leave each process alone under DeepSpeed.
        backend = None if torch.cuda.is_available() else "gloo"
        handlers = [InitProcessGroupKwargs(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)]
        accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers, **settings)
        # Accelerate tells Transformers about ZeRO-3, which would then create every model
        # partitioned (zero.Init), a distillation teacher too: only `creating_model` does.
        unset_hf_deepspeed_config()
        return accelerator

    @contextlib.contextmanager
    def creating_model(self) -> Iterator[None]:
        if not self.creates_partitioned:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

        # Transformers creates models under zero.Init while this config is alive, and loads
        # the files into the partitions (each process reads them; the main one's values go in).
        registered = HfDeepSpeedConfig(self.config)
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del registered

    def reading(self, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
        if not self.creates_partitioned:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero import GatheredParameters

        return GatheredParameters(params)

    def load_device(self, accelerator: Accelerator) -> torch.device | None:
        # The CPU: zero.Init places each process's partition on its device itself (and
        # Transformers refuses a device map with it); a model read whole is partitioned by the
        # engine. A quantised base is quantised where it runs, as on one GPU: bitsandbytes
        # moves its quantisation constants with the weights, and ZeRO-3 partitions the 4-bit
        # bytes.
        return accelerator.device if self.quantised else torch.device("cpu")

    def place(
        self,
        accelerator: Accelerator,  # noqa: ARG002 - the layout interface
        objective: torch.nn.Module,
        model: torch.nn.Module,  # noqa: ARG002
    ) -> None:
        # In bf16 or fp16 the engine casts the whole model, trained weights included, and keeps
        # fp32 copies made from the cast ones: the trained weights are kept here to give
        # those copies their full values (a resumed run's, a fresh adapter's initialisation).
        # Weights created partitioned are created in the half dtype: a fresh run's fp32 copies
        # start from those values, a resumed run's from the checkpoint (`resumed_weights`).
        if self.half is None:
            return
        self.masters = [
            (param, param.detach().to("cpu", torch.float32, copy=True))
            for param in layout.trained_parameters(objective)
            if not _created_partitioned(param)
        ]
        if self.creates_partitioned:
            # The engine casts nothing of a model created partitioned (in the half dtype
            # already): what was created whole after it (the adapter) is cast here instead.
            for param in objective.parameters():
                if not _created_partitioned(param) and param.is_floating_point():
                    param.data = param.data.to(self.half)

    def prepare(
        self,
        accelerator: Accelerator,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from deepspeed.utils import safe_set_full_fp32_param

        engine, prepared = accelerator.prepare(objective, optimizer)
        if self.stage == 3:
            # Each call of the partitioned head gathers it from every process: they call it
            # alike, however many positions each holds (objective.AGREED_CALLS).
            head = models.causal_lm(objective.model).get_output_embeddings()
            most = functools.partial(layout.most_of_processes, accelerator)
            setattr(head, AGREED_CALLS, most)
        for param, value in self.masters:
            safe_set_full_fp32_param(param, value.to(accelerator.device))
        self.masters = []
        if self.resumed_weights is not None:
            path, saved_names = self.resumed_weights
            with safe_open(path, framework="pt", device=str(accelerator.device)) as saved:
                for param, name in saved_names:
                    safe_set_full_fp32_param(param, saved.get_tensor(name).float())
            self.resumed_weights = None
        return engine, prepared

    def restore_weights(
        self,
        saved: checkpoint.SavedCheckpoint,
        model: torch.nn.Module,
        extras: dict[str, torch.nn.Parameter],
    ) -> None:
        trained = [param for param in model.parameters() if param.requires_grad]
        if not any(_created_partitioned(param) for param in trained):
            checkpoint.restore_weights(saved, model, extras)
            return
        from deepspeed.runtime.zero import GatheredParameters

        # A fully fine-tuned model created partitioned: parameter by parameter, the main
        # process's read value goes into every process's partition (no process holds the whole
        # model), and again into the engine's fp32 copies once it is made.
        checkpoint.restore_weights(saved, None, extras)
        path = saved.folder / checkpoint.FULL_WEIGHTS
        main = torch.distributed.get_rank() == 0
        with safe_open(path, framework="pt") as stored:
            self.resumed_weights = path, _saved_names(path, set(stored.keys()), model)
            for param, name in self.resumed_weights[1]:
                with GatheredParameters([param], modifier_rank=0), torch.no_grad():
                    if main:
                        param.copy_(stored.get_tensor(name))

    def gathered_weights(
        self, objective: torch.nn.Module, model: torch.nn.Module, trained_only: bool
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_get_full_fp32_param

        main = torch.distributed.get_rank() == 0
        prefix = layout.model_prefix(objective, model)
        weights, extras = {}, {}
        # Parameter by parameter, in the same order on every process: each gathers from all.
        for name, param in objective.named_parameters():
            if param.requires_grad:
                value = safe_get_full_fp32_param(param)
            elif trained_only:
                continue
            else:
                with GatheredParameters([param]):
                    value = param.detach().clone()
            if not main:
                continue
            if name.startswith(prefix):
                weights[name.removeprefix(prefix)] = value.cpu()
            else:
                extras[name] = value.cpu()
        return weights, extras

    def optimizer_state(
        self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        adam = optimizer.optimizer.optimizer
        hyper = {key: value for key, value in adam.param_groups[0].items() if key != "params"}
        trained = layout.trained_parameters(objective)
        main = torch.distributed.get_rank() == 0
        state: dict[int, dict[str, torch.Tensor]] = {}
        if adam.state:
            step = next(iter(adam.state.values()))["step"].to("cpu", copy=True)
            for index, param in enumerate(trained):
                # Every process joins each gather; only the main one, which saves, keeps the
                # whole moments (an 8B model's are 64 GB of CPU memory).
                moments = {key: safe_get_full_optimizer_state(param, key) for key in ADAM_MOMENTS}
                if main:
                    state[index] = {"step": step, **{k: v.cpu() for k, v in moments.items()}}
        return {"state": state, "param_groups": [hyper | {"params": list(range(len(trained)))}]}

    def load_optimizer(
        self,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        saved: dict[str, Any],
    ) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        partitioned = optimizer.optimizer
        _create_adam_state(partitioned, self.stage)
        device = next(iter(partitioned.optimizer.state.values()))["exp_avg"].device
        for index, param in enumerate(layout.trained_parameters(objective)):
            for key in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, saved["state"][index][key].to(device), key)
        # On the partitions' device: the fused AdamW keeps its step beside them.
        step = saved["state"][0]["step"]
        for values in partitioned.optimizer.state.values():
            values["step"] = step.to(device, copy=True)

    def loss_scale(
        self,
        accelerator: Accelerator,  # noqa: ARG002 - the layout interface
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any] | None:
        return loss_scaler_state(optimizer)

    def load_loss_scale(
        self,
        accelerator: Accelerator,  # noqa: ARG002 - the layout interface
        optimizer: torch.optim.Optimizer,
        saved: dict[str, Any] | None,
    ) -> None:
        load_loss_scaler_state(optimizer, saved)


def loss_scaler_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The engine's own fp16 loss scaler (Accelerate has none under DeepSpeed) in plain
    values: `scale`, as every layout saves it, and DeepSpeed's counters; None in bf16/fp32.
    `tests/test_zero.py` fails if DeepSpeed renames them."""
    scaler = getattr(optimizer.optimizer, "loss_scaler", None)
    if scaler is None or not scaler.dynamic:
        return None
    counters = {name: getattr(scaler, name) for name in LOSS_SCALER_STATE}
    return {"scale": float(scaler.cur_scale), "deepspeed": counters}


def load_loss_scaler_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any] | None) -> None:
    """Set the engine's fp16 loss scaler from a checkpoint's `loss_scale`: all of it from a
    ZeRO run's, the scale alone from another layout's (a GradScaler's)."""
    scaler = getattr(optimizer.optimizer, "loss_scaler", None)
    if scaler is None or not scaler.dynamic or not saved:
        return
    for name, value in saved.get("deepspeed", {"cur_scale": saved["scale"]}).items():
        setattr(scaler, name, value)


def _created_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 made `param` a partition (zero.Init, or the engine once prepared)."""
    return hasattr(param, "ds_id")


def _saved_names(
    path: Path, stored: set[str], module: torch.nn.Module
) -> list[tuple[torch.nn.Parameter, str]]:
    """Each trained parameter of `module` created partitioned, with its name among `stored`,
    the names in the checkpoint file `path` (a tied head and embedding are saved under one of
    their two names)."""
    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if param.requires_grad and _created_partitioned(param):
            names.setdefault(id(param), []).append(name)
            params[id(param)] = param
    found = []
    for key, param in params.items():
        saved_as = [name for name in names[key] if name in stored]
        if not saved_as:
            raise checkpoint.CheckpointError(f"{path}: no weights for {names[key][0]}")
        found.append((param, saved_as[0]))
    return found


def _create_adam_state(partitioned: Any, stage: int) -> None:
    """Give the partitioned optimizer its AdamW state before any step, to be overwritten with
    a checkpoint's. Each process's flat fp32 partitions get the state torch's AdamW makes on a
    first step (made by a scratch AdamW at learning rate 0, which changes no weight)."""
    if stage < 3:
        flats = partitioned.single_partition_of_fp32_groups
    else:
        flats = partitioned.fp32_partitioned_groups_flat
    for flat in flats:
        scratch = layout.adamw([flat], lr=0.0)
        # With the optimizer offloaded, the partition's gradient is the buffer the engine
        # copies each step's gradients into: it is put back.
        gradient, flat.grad = flat.grad, torch.zeros_like(flat)
        scratch.step()
        flat.grad = gradient
        partitioned.optimizer.state[flat] = scratch.state[flat]
    if stage < 3:
        # ZeRO 1 and 2 link each parameter to its slice of the state after the first step
        # (private to DeepSpeed, like the partitions above: the resume tests fail if they
        # change); ZeRO-3 reads the state when asked.
        partitioned._lazy_init_hp_params_optimizer_state()
