"""A LoRA-adapted linear layer as one autograd function.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as six autograd nodes per
adapted layer: the two small products, then a multiplication by the scale and an addition, each
a pass over the layer's whole output, in the forward and again in the backward. Here the scale
and the sum ride inside the products (`addmm`'s `alpha`), and the backward computes the input's
gradient as one product plus one accumulated small one: the same products, none of the
elementwise passes, one node. The adapter's weights stay peft's parameters, so saving, loading,
merging and the optimizer see nothing new.

Only plain LoRA on an unquantised `nn.Linear` is fused, one active adapter, without dropout
(llama-tune's default) or in eval mode; everything else (DoRA, quantised bases, dropout in
training, disabled or merged adapters, several adapters) runs peft's own forward, decided at
every call.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear

from llama_tune.runtime import compute_dtype


class _LoraProduct(torch.autograd.Function):
    """y = x W^T + b + scale (x A^T) B^T, every tensor already in the compute dtype."""

    @staticmethod
    def forward(
        ctx: Any,
        inputs: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1])
        hidden = rows @ lora_a.t()
        outputs = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        outputs.addmm_(hidden, lora_b.t(), alpha=scale)
        ctx.save_for_backward(rows, weight, lora_a, lora_b, hidden)
        ctx.scale = scale
        ctx.input_shape = inputs.shape
        return outputs.view(*inputs.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, output_gradient: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, lora_a, lora_b, hidden = ctx.saved_tensors
        gradient = output_gradient.reshape(-1, weight.shape[0])
        # The gradient at the adapter's r-wide middle, already scaled: every gradient below it
        # carries the scale once.
        hidden_gradient = (gradient @ lora_b).mul_(ctx.scale)
        needs = ctx.needs_input_grad
        input_gradient = weight_gradient = bias_gradient = a_gradient = b_gradient = None
        if needs[0]:
            input_gradient = (gradient @ weight).addmm_(hidden_gradient, lora_a)
            input_gradient = input_gradient.view(ctx.input_shape)
        if needs[1]:
            weight_gradient = gradient.t() @ rows
        if needs[2]:
            bias_gradient = gradient.sum(0)
        if needs[3]:
            a_gradient = hidden_gradient.t() @ rows
        if needs[4]:
            # (h^T g)^T: the same product, faster than g^T h on oneDNN for these shapes.
            b_gradient = (hidden.t() @ gradient).mul_(ctx.scale).t()
        return input_gradient, weight_gradient, bias_gradient, a_gradient, b_gradient, None


def _plain_adapter(layer: LoraLinear, args: tuple, kwargs: dict) -> str | None:
    """The adapter this call computes as plain LoRA, which the fused product computes exactly;
    None where peft's forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or type(layer.get_base_layer()) is not torch.nn.Linear:
        return None
    name = active[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.fan_in_fan_out:
        return None
    dropout = layer.lora_dropout[name]
    return name if isinstance(dropout, torch.nn.Identity) or not dropout.training else None


class FusedLoraLinear(LoraLinear):
    """peft's LoRA linear layer whose forward computes plain LoRA as one `_LoraProduct`.

    A subclass rather than a forward set on each instance: torch.compile guards on what a call
    runs, and thirty per-instance forwards would compile a decoder layer thirty times, past
    torch's limit of recompiles (after 8 it left the other layers eager), where one class
    gives every layer the same code and one graph."""

    def forward(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = _plain_adapter(self, args, kwargs)
        if name is None:
            return super().forward(inputs, *args, **kwargs)
        base = self.get_base_layer()
        dtype = compute_dtype(inputs)
        # The casts are autograd's own: the adapter's fp32 weights get their gradients back in
        # fp32.
        return _LoraProduct.apply(
            inputs.to(dtype),
            base.weight.to(dtype),
            None if base.bias is None else base.bias.to(dtype),
            self.lora_A[name].weight.to(dtype),
            self.lora_B[name].weight.to(dtype),
            self.scaling[name],
        )


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Make every peft LoRA linear layer in `model` a `FusedLoraLinear`; returns how many.

    Only layers of peft's own class change (its subclasses keep their forward); a second call
    finds none left. Not for a model whose weights are whole only inside their own module's
    forward (ZeRO-3): the fused forward reads the base and adapter weights without calling
    their modules."""
    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused
