"""Sharding a run's model over its processes with FSDP2, when the launch asks for it.

`accelerate launch --config_file configs/fsdp.yaml` sets ACCELERATE_USE_FSDP. Accelerate's own
FSDP path would wrap only the objective it is given (no decoder layers inside: one all-gather of
the whole model, nothing saved) and exists only on GPUs, so llama-tune calls `fully_shard`
itself: each decoder layer is one unit, the objective the root (embeddings, final norm, head and
anything the objective trains beside the model). The same code then runs on GPUs (NCCL) and on
CPU processes (gloo), where the tests run it.

Weights and optimizer state are gathered into full tensors for saving, in the layout an
unsharded run writes, so the adapter, the model folder and checkpoints look the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from llama_tune import layout, models, schema

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Full tensors on the CPU of the main process (the others get none): what gets saved."""


def check_recipe(recipe: schema.Recipe) -> None:
    """Refuse, before loading anything, what llama-tune's FSDP does not do yet."""
    refused = {
        # bitsandbytes gives its 4-bit weights their quantisation constants back when FSDP
        # replaces them by gathered plain tensors, but not its 8-bit ones.
        "model.quantization (8bit)": recipe.model.quantization == "8bit",
        # Not measured: compiled layers under FSDP's hooks, which gather their weights.
        "model.compile": recipe.model.compile,
    }
    layout.refuse(refused, "FSDP", "launch with configs/multi_gpu.yaml (DDP)")


@contextmanager
def accelerator_unaware() -> Iterator[None]:
    """Hide the launch's FSDP request from an Accelerator being made: it would otherwise shard
    the objective its own way (GPUs) or fall back to DDP silently (CPUs)."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def shard(
    objective: torch.nn.Module, model: torch.nn.Module, device: torch.device, from_main: bool
) -> None:
    """Shard `model`'s decoder layers and then `objective` (the root) over every process.

    Parameters are replaced by sharded ones: collect trainable parameters and build the
    optimizer afterwards. With `from_main` only the main process holds weights (the others
    made the objective on the meta device): each process receives its shards from it, and the
    buffers whole. Otherwise every process starts from the same weights of its own.
    """
    full_state = objective.state_dict() if from_main and dist.get_rank() == 0 else {}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", default=True)
    for layer in models.causal_lm(model).model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(objective, mesh=mesh, reshard_after_forward=reshard)
    if from_main:
        _receive_from_main(objective, full_state, device)


def _receive_from_main(
    objective: torch.nn.Module, full_state: dict[str, torch.Tensor], device: torch.device
) -> None:
    """Give every process's shards their values from the main process's `full_state` (empty
    on the others), and every buffer (some, such as the rotary frequencies, are in no state
    dict) the main process's value."""
    if dist.get_rank() != 0:
        objective.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(objective, full_state, options=options)
    for buffer in objective.buffers():
        dist.broadcast(buffer, src=0)


def gathered_weights(
    objective: torch.nn.Module, model: torch.nn.Module, trained_only: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's weights (only the trained ones with `trained_only`) and the objective's
    trained parameters outside the model, as full CPU tensors on the main process; empty on
    the others. Every process must call it: each contributes its shards.

    A tied weight (the head sharing the embeddings) comes once, under its first name, as an
    unsharded model saves it; gathering would return it twice, as two tensors.
    """
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only
    )
    state = get_model_state_dict(objective, options=options)
    first_names = {name for name, _ in objective.named_parameters()}
    aliases = {name for name, _ in objective.named_parameters(remove_duplicate=False)}
    aliases -= first_names
    prefix = layout.model_prefix(objective, model)
    weights, extras = {}, {}
    for name, value in state.items():
        if name in aliases:
            continue
        if name.startswith(prefix):
            weights[name.removeprefix(prefix)] = value
        else:
            extras[name] = value
    return weights, extras


def _trained_names(objective: torch.nn.Module) -> list[str]:
    return [name for name, param in objective.named_parameters() if param.requires_grad]


def gathered_optimizer(
    objective: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The optimizer's state with full tensors on the main process, keyed by parameter index
    like `optimizer.state_dict()` of an unsharded run (the optimizer holds the objective's
    trained parameters in order). Every process must call it."""
    state = get_optimizer_state_dict(objective, optimizer, options=GATHERED)
    if not state:
        return {}
    index = {name: position for position, name in enumerate(_trained_names(objective))}
    groups = [
        group | {"params": [index[name] for name in group["params"]]}
        for group in state["param_groups"]
    ]
    return {
        "state": {index[name]: values for name, values in state["state"].items()},
        "param_groups": groups,
    }


def load_optimizer(
    objective: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Apply an index-keyed optimizer state (`gathered_optimizer`, or an unsharded run's) to
    the sharded optimizer: each process keeps its own shard."""
    names = _trained_names(objective)
    groups = [
        group | {"params": [names[position] for position in group["params"]]}
        for group in saved["param_groups"]
    ]
    state = {names[position]: values for position, values in saved["state"].items()}
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(
        objective, optimizer, {"state": state, "param_groups": groups}, options=options
    )


class FullyShardedLayout(layout.Layout):
    """FSDP2: each process holds 1/N of every decoder layer and of the rest of the objective."""

    name = "fsdp"
    gathers = True
    spreads_weights = True

    def __init__(self, recipe: schema.Recipe) -> None:
        check_recipe(recipe)
        # The launch config's fsdp_cpu_ram_efficient_loading, unless the student of a
        # distillation, which is cut from its teacher, and every process loads that whole, or
        # a quantised base, whose quantisation constants are no weights to send.
        self.quantised = recipe.model.quantization != "none"
        self.from_main = (
            parse_flag_from_env("FSDP_CPU_RAM_EFFICIENT_LOADING", default=True)
            and recipe.distill is None
            and not self.quantised
        )

    def load_device(self, accelerator: Accelerator) -> torch.device | None:
        # Only the main process reads the weights, on its CPU; the others receive their shards
        # (a 70B model read by each of 8 processes would need 8 copies of it in CPU memory).
        if self.from_main and not accelerator.is_main_process:
            return torch.device("meta")
        # A quantised base is read onto the process's own device, as one GPU reads it: its
        # quantisation constants stay there, unsharded, beside the sharded 4-bit weights.
        return accelerator.device if self.quantised else torch.device("cpu")

    def accelerator(self, **settings: Any) -> Accelerator:
        with accelerator_unaware():
            return super().accelerator(**settings)

    def place(
        self, accelerator: Accelerator, objective: torch.nn.Module, model: torch.nn.Module
    ) -> None:
        shard(objective, model, accelerator.device, self.from_main)

    def prepare(
        self,
        accelerator: Accelerator,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        # Autocast, but no DDP around a sharded model: FSDP reduces the gradients itself. It
        # does so after every micro-batch (Accelerate, unaware of FSDP here, syncs nothing
        # less): one reduce-scatter per micro-batch instead of per step, chosen for memory,
        # since skipping it would hold every weight's whole gradient between micro-batches.
        loss_module = accelerator.prepare_model(objective, evaluation_mode=True)
        return loss_module, accelerator.prepare_optimizer(optimizer)

    def main_copy(self, tensor: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
        if not self.from_main:
            return tensor
        # The others made theirs from meta weights: a shape without values. Sent through the
        # accelerator's device, which NCCL needs.
        if tensor.is_meta:
            received = torch.empty(tensor.shape, dtype=tensor.dtype, device=accelerator.device)
        else:
            received = tensor.to(accelerator.device)
        dist.broadcast(received, src=0)
        return received.to("cpu" if tensor.is_meta else tensor.device)

    @contextmanager
    def whole_model(self, objective: torch.nn.Module) -> Iterator[None]:
        # Each decoder layer gathers its weights when called; the root's (embeddings, final
        # norm, head) are gathered by the objective's own forward only, so here by hand.
        # Before the objective's first forward (no validation split, or a resumed run that
        # attacks or generates at once), FSDP has not yet chosen its root: the first layer
        # called here would make itself one, and the objective's next forward fail. Private
        # to torch; the launched attack test without a validation split fails if it changes.
        objective._get_fsdp_state()._lazy_init()
        objective.unshard()
        try:
            yield
        finally:
            objective.reshard()

    def regather(self, objective: torch.nn.Module) -> None:
        # Every FSDP backward ends by resharding the root (embeddings, final norm, head).
        objective.unshard()

    def gathered_weights(
        self, objective: torch.nn.Module, model: torch.nn.Module, trained_only: bool
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        return gathered_weights(objective, model, trained_only)

    def optimizer_state(
        self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        return gathered_optimizer(objective, optimizer.optimizer)

    def load_optimizer(
        self,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        saved: dict[str, Any],
    ) -> None:
        load_optimizer(objective, optimizer.optimizer, saved)
