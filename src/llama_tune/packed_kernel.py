"""Causal attention within each example of packed rows, on the CPU, as one torch operator.

The examples' bounds are Python integers read off the position ids, so a compiled graph that
traced the per-example loop would specialise on them and recompile at every step. Wrapped as a
custom operator (`llama_tune::packed_attention`, with its backward as a second one), the loop
is opaque to torch.compile: a compiled decoder layer keeps its projections, norms and MLP in
one graph and calls the operator in the middle, where it would otherwise break in two around
an eager attention. Eager runs call the same operator.

Each example runs PyTorch's CPU flash-attention kernel (`_scaled_dot_product_flash_attention_
for_cpu`, private aten operators that `tests/test_packed_kernel.py` checks against SDPA), on
the dtype the caller picks per example: short examples of a half-precision run attend in fp32,
where the CPU kernel trains faster (see `attention`). Its forward keeps each example's
log-sum-exp, so the backward recomputes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llama_tune.packing import row_bounds

SHORT_ROWS = 160
"""Examples up to this many tokens of a half-precision run train their attention in fp32."""
_FLASH_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _examples(position_ids: torch.Tensor, batch: int) -> Iterator[tuple[int, int, int]]:
    """(row, start, end) of every example of the batch; rows that share one row of position
    ids (a [1, length] tensor) share its bounds."""
    bounds = row_bounds(position_ids)
    for row in range(batch):
        for start, end in bounds[row if len(bounds) > 1 else 0]:
            yield row, start, end


def _attention_dtype(dtype: torch.dtype, length: int, fp32_short: bool) -> torch.dtype:
    return torch.float32 if fp32_short and length <= SHORT_ROWS else dtype


def _output_dtype(dtype: torch.dtype, fp32_short: bool) -> torch.dtype:
    """fp32 where any example may attend in fp32: the backward then reads those examples'
    outputs unrounded, as SDPA's own backward would."""
    return torch.float32 if fp32_short else dtype


@torch.library.custom_op("llama_tune::packed_attention", mutates_args=(), device_types="cpu")
def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_ids: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    fp32_short: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of query [batch, heads, length, dim] over key and value [batch,
    key heads, length, dim] within each example, in `dtype` (fp32 for examples up to
    `SHORT_ROWS` tokens where `fp32_short`). Returns the output [batch, length, heads, dim]
    (in fp32 where `fp32_short`, else in `dtype`) and the log-sum-exp [batch, heads, length]
    that the backward needs."""
    batch, heads, length, dim = query.shape
    output = query.new_empty(batch, length, heads, dim, dtype=_output_dtype(dtype, fp32_short))
    logsumexp = query.new_empty(batch, heads, length, dtype=torch.float32)
    with torch.autocast("cpu", enabled=False):
        for row, start, end in _examples(position_ids, batch):
            example_dtype = _attention_dtype(dtype, end - start, fp32_short)
            attended, example_logsumexp = _FLASH_FORWARD(
                *(
                    states[row : row + 1, :, start:end].to(example_dtype)
                    for states in (query, key, value)
                ),
                0.0,
                True,
                scale=scale,
            )
            output[row, start:end] = attended[0].transpose(0, 1)
            logsumexp[row, :, start:end] = example_logsumexp[0]
    return output, logsumexp


@packed_attention.register_fake
def _(query, key, value, position_ids, scale, dtype, fp32_short):  # noqa: ARG001
    batch, heads, length, dim = query.shape
    output = query.new_empty(batch, length, heads, dim, dtype=_output_dtype(dtype, fp32_short))
    return output, query.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op(
    "llama_tune::packed_attention_backward", mutates_args=(), device_types="cpu"
)
def packed_attention_backward(
    output_grad: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    output: torch.Tensor,
    logsumexp: torch.Tensor,
    position_ids: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    fp32_short: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `packed_attention` for query, key and value, example by example."""
    grads = [torch.empty_like(states) for states in (query, key, value)]
    # The kernel's operands, all [batch, heads, length, dim].
    operands = (output_grad.transpose(1, 2), query, key, value, output.transpose(1, 2))
    with torch.autocast("cpu", enabled=False):
        for row, start, end in _examples(position_ids, query.shape[0]):
            example = (slice(row, row + 1), slice(None), slice(start, end))
            example_dtype = _attention_dtype(dtype, end - start, fp32_short)
            example_grads = _FLASH_BACKWARD(
                *(states[example].to(example_dtype) for states in operands),
                logsumexp[example],
                0.0,
                True,
                scale=scale,
            )
            for grad, example_grad in zip(grads, example_grads, strict=True):
                grad[example] = example_grad
    return grads[0], grads[1], grads[2]


@packed_attention_backward.register_fake
def _(output_grad, query, key, value, output, logsumexp, position_ids, scale, dtype, fp32_short):  # noqa: ARG001
    return tuple(torch.empty_like(states) for states in (query, key, value))


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, position_ids, scale, dtype, fp32_short = inputs
    ctx.save_for_backward(query, key, value, position_ids, *output)
    ctx.options = scale, dtype, fp32_short


def _backward(ctx, output_grad, _logsumexp_grad):
    query, key, value, position_ids, output, logsumexp = ctx.saved_tensors
    grads = packed_attention_backward(
        output_grad.contiguous(), query, key, value, output, logsumexp, position_ids, *ctx.options
    )
    return *grads, None, None, None, None


packed_attention.register_autograd(_backward, setup_context=_setup_context)
