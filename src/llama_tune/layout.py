"""Where a run's weights and optimizer state live across its processes, as the launch asks.

`Layout` is the plain case: one process, or data-parallel (DDP) processes that each hold the
whole model. `sharding.FullyShardedLayout` (FSDP2) and `zero.ZeroLayout` (DeepSpeed ZeRO)
spread them out. The training loop asks its layout to place the model, prepare it, gather what
a checkpoint saves and restore what a resume reads, so it reads the same under each; every
layout saves in the unsharded layout, so a checkpoint resumes under any of them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from llama_tune import checkpoint
from llama_tune.errors import UserError
from llama_tune.runtime import PROCESS_GROUP_TIMEOUT, cpu_processes


def most_of_processes(accelerator: Accelerator, count: int) -> int:
    """The largest `count` of any process (every process calls it)."""
    counts = accelerator.gather(torch.tensor([count], device=accelerator.device))
    return int(counts.max().item())


class LayoutError(UserError):
    """A recipe the launch's layout cannot train yet, named before any model loads."""


def refuse(recipe_uses: dict[str, bool], launch: str, instead: str) -> None:
    """Stop on the recipe keys in `recipe_uses` that are used, naming them all at once."""
    named = [key for key, used in recipe_uses.items() if used]
    if named:
        raise LayoutError(
            f"the launch asks for {launch}, which llama-tune does not combine with "
            f"{', '.join(named)} yet: remove it from the recipe, or {instead}"
        )


class Layout:
    """Every process holds the whole model and optimizer (one process, or DDP)."""

    name = "replicated"
    gathers = False
    """Whether saving needs every process (each holds only part of the state)."""
    spreads_weights = False
    """Whether each process holds only part of the weights: every forward needs every process."""
    weights_whole_per_module = False
    """Whether a weight is whole only while its own module runs (ZeRO-3's hooks gather it then),
    so code must call each module rather than read its weights."""

    def accelerator(self, **settings: Any) -> Accelerator:
        """The run's Accelerator, made with `settings` (precision, accumulation, ...)."""
        timeout = InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)
        return Accelerator(cpu=cpu_processes(), kwargs_handlers=[timeout], **settings)

    def load_device(
        self,
        accelerator: Accelerator,  # noqa: ARG002 - the layout interface
    ) -> torch.device | None:
        """Where this process creates the model: None, on its own device. The spread-out
        layouts create it on the CPU (or, where the main process sends the weights, on the meta
        device) and move each process's part to its device."""
        return None

    def creating_model(self) -> contextlib.AbstractContextManager:
        """A block in which this process reads the model it trains from its files. ZeRO-3
        creates it there already partitioned, each process keeping its part."""
        return contextlib.nullcontext()

    def reading(
        self,
        params: list[torch.nn.Parameter],  # noqa: ARG002 - the layout interface
    ) -> contextlib.AbstractContextManager:
        """A block in which `params`, as created and before placing, hold their whole values
        (a ZeRO-3 partition is gathered for it). Every process enters it."""
        return contextlib.nullcontext()

    def restore_weights(
        self,
        saved: checkpoint.SavedCheckpoint,
        model: torch.nn.Module,
        extras: dict[str, torch.nn.Parameter],
    ) -> None:
        """Put a read checkpoint's trained weights into the model and `extras` (trained
        parameters outside it), before placing."""
        checkpoint.restore_weights(saved, model, extras)

    def place(
        self, accelerator: Accelerator, objective: torch.nn.Module, model: torch.nn.Module
    ) -> None:
        """Spread the model before its optimizer is built (parameters may be replaced)."""

    def prepare(
        self,
        accelerator: Accelerator,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The module the loop calls and the optimizer it steps."""
        return accelerator.prepare(objective, optimizer)

    def main_copy(
        self,
        tensor: torch.Tensor,
        accelerator: Accelerator,  # noqa: ARG002 - the layout interface
    ) -> torch.Tensor:
        """`tensor`, made on each process from the model's weights before placing, as the
        main process made it. Every process calls it (after `place`); here every process read
        the weights, so its own is the main process's."""
        return tensor

    def whole_model(
        self,
        objective: torch.nn.Module,  # noqa: ARG002 - the layout interface
    ) -> contextlib.AbstractContextManager:
        """A block in which the objective's model can be called on its own (scoring,
        generation), outside the objective's forward."""
        return contextlib.nullcontext()

    def regather(
        self,
        objective: torch.nn.Module,
    ) -> None:
        """Inside `whole_model`, after a backward outside the objective's: gather again what
        the backward's end released."""

    # The arguments unused here are those the spread-out layouts need.
    def gathered_weights(
        self,
        objective: torch.nn.Module,
        model: torch.nn.Module,
        trained_only: bool,  # noqa: ARG002
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
        """The model's weights to save (None: the model saves its own) and the objective's
        trained parameters outside the model. Every process calls it when `gathers`."""
        extras = trained_extras(objective, model)
        return None, {name: param.detach() for name, param in extras.items()}

    def optimizer_state(
        self,
        objective: torch.nn.Module,  # noqa: ARG002
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any]:
        """The optimizer's state, keyed by trained-parameter index as an unsharded AdamW keys
        it. Every process calls it when `gathers`; only the main process's is saved."""
        return optimizer.state_dict()

    def loss_scale(
        self,
        accelerator: Accelerator,
        optimizer: torch.optim.Optimizer,  # noqa: ARG002 - the layout interface
    ) -> dict[str, Any] | None:
        """fp16's dynamic loss scale in plain values, to checkpoint; None without one. Each
        layout's has `scale`, which the others restore (a DDP checkpoint resumes under ZeRO)."""
        scaler = accelerator.scaler
        return scaler.state_dict() if scaler is not None else None

    def load_loss_scale(
        self,
        accelerator: Accelerator,
        optimizer: torch.optim.Optimizer,  # noqa: ARG002 - the layout interface
        saved: dict[str, Any] | None,
    ) -> None:
        """Go on from a checkpoint's `loss_scale`, where this run has a dynamic one."""
        scaler = accelerator.scaler
        if scaler is None or not saved:
            return
        if "_growth_tracker" not in saved:  # DeepSpeed's, from a ZeRO run: its scale alone
            saved = scaler.state_dict() | {"scale": saved["scale"], "_growth_tracker": 0}
        scaler.load_state_dict(saved)

    def load_optimizer(
        self,
        objective: torch.nn.Module,  # noqa: ARG002
        optimizer: torch.optim.Optimizer,
        saved: dict[str, Any],
    ) -> None:
        """Apply a saved (index-keyed) optimizer state."""
        optimizer.load_state_dict(saved)


def trained_parameters(objective: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The objective's trained parameters, in the order its optimizer holds them."""
    return [param for param in objective.parameters() if param.requires_grad]


FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Where torch's AdamW has one fused kernel per parameter: on the CPU it steps the built-in
model's 81 M weights in 75 ms against 268 ms for the default loop (docs/BENCHMARKS.md)."""


def adamw(
    parameters: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """torch's AdamW, fused where every parameter lies on a device with the fused kernel. The
    fused step computes the same update (to rounding) with one kernel per parameter instead
    of a dozen, which matters most for full fine-tuning, where the step reads every weight."""
    fused = all(param.device.type in FUSED_ADAMW_DEVICES for param in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def trained_extras(
    objective: torch.nn.Module, model: torch.nn.Module
) -> dict[str, torch.nn.Parameter]:
    """Trained parameters outside the model (distillation projections), by their name in the
    objective: checkpoints save them beside the model's."""
    in_model = {id(param) for param in model.parameters()}
    return {
        name: param
        for name, param in objective.named_parameters()
        if param.requires_grad and id(param) not in in_model
    }


def model_prefix(objective: torch.nn.Module, model: torch.nn.Module) -> str:
    """How the objective's parameter names start for the model's parameters."""
    for name, module in objective.named_modules():
        if module is model:
            return f"{name}." if name else ""
    raise ValueError("the model is not part of the objective")
