"""The attention training runs with: transformers' SDPA, with packed rows kept apart and the
faster CPU kernel for short rows.

- Packed rows (`packing`) have no attention mask and position ids that restart at each example.
  transformers' own SDPA path turns such a row into a dense [row x row] block-diagonal mask (and,
  unless the forward passes `use_cache=False`, silently into a plain causal mask over the whole
  row), which costs attention over the whole row. `PACKED_SDPA` runs causal attention on each
  example's own slice instead: the attention work of the unpacked examples, none of the padding.
  On a GPU with flash attention, in half precision, one call of torch's variable-length flash
  attention (`varlen_attn`) takes every example of the batch; on a CPU, one call of the
  `packed_kernel` operator, which compiled layers keep inside their graph; elsewhere, one SDPA
  call each.
- On a CPU, PyTorch's flash kernel is slow to train in bf16 on short rows (its backward
  dominates): short rows of a half-precision run attend in fp32 there, with autocast off for
  the call, 1.3-3x faster up to 160 tokens than bf16 (forward and backward per layer on this
  project's 2-core AVX512-BF16 machine: 16 rows of 48 tokens 4.0 against 14.0 ms, 8 of 128
  9.6 against 17.6, one of 40 0.34 against 1.07) and faster than the math kernel in bf16 that
  it replaces (5.6 ms for the 16 rows of 48); beyond about 190 tokens bf16 is faster. fp32 is
  also the more precise, and an fp32 model under autocast (full fine-tuning, a distilled
  student) gets it too, where autocast would have cast SDPA's inputs to bf16.

For every other input (padding masks, generation with a cache, GPUs) it is transformers' SDPA
unchanged, so a model keeps it for evaluation and generation too.
"""

from __future__ import annotations

import functools
import inspect
from itertools import pairwise
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llama_tune.packed_kernel import SHORT_ROWS, packed_attention
from llama_tune.packing import row_bounds
from llama_tune.runtime import compute_dtype

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before variable-length attention: the per-example loop
    varlen_attn = None
VARLEN_USABLE = varlen_attn is not None and {"scale", "window_size", "enable_gqa"} <= set(
    inspect.signature(varlen_attn).parameters
)
"""Whether this torch's varlen_attn takes what a Llama's attention needs (torch 2.13 does;
earlier ones lack a scale or grouped key heads)."""
HALF_DTYPES = (torch.bfloat16, torch.float16)

TRAINING_SDPA = "llama_tune_sdpa"
PACKED_SDPA = "llama_tune_packed_sdpa"
PLAIN_CAUSAL_UNSUPPORTED = ("sliding_window", "softcap", "s_aux")
"""Attention arguments of some architectures that plain causal attention kernels would ignore."""


def _sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' SDPA, in fp32 where that trains faster (see the module docstring), with
    the output in the dtype SDPA would have given: [batch, length, heads, head_dim]."""
    dtype = compute_dtype(query)
    training_short_half_rows = (
        query.device.type == "cpu"
        and dtype in HALF_DTYPES
        and query.requires_grad
        and query.shape[2] <= SHORT_ROWS
    )
    if not training_short_half_rows:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        attended = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )[0]
    return attended.to(dtype)


class _VarlenOffsets:
    """Where each example of the packed rows starts, on the device, for varlen attention: made
    once per forward (copying them to the device syncs with it), not once per layer."""

    def __init__(self) -> None:
        self.rows: list[list[tuple[int, int]]] | None = None
        self.offsets: dict[tuple[int, int, torch.device], tuple[torch.Tensor, int]] = {}

    def __call__(
        self, bounds: list[list[tuple[int, int]]], batch: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """Where each example starts in the batch's rows laid end to end (and where the last
        ends), on `device`; and the longest example's length."""
        if bounds is not self.rows:
            self.rows, self.offsets = bounds, {}
        key = (batch, length, device)
        if key not in self.offsets:
            edges = [0]
            for row in range(batch):
                edges += [row * length + end for _, end in bounds[row if len(bounds) > 1 else 0]]
            longest = max(end - start for start, end in pairwise(edges))
            self.offsets[key] = torch.tensor(edges, dtype=torch.int32, device=device), longest
        return self.offsets[key]


_varlen_offsets = _VarlenOffsets()


def _varlen_dtype(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kwargs: dict[str, Any],
) -> torch.dtype | None:
    """The half dtype torch's variable-length flash attention would run a packed batch in, or
    None where it cannot: it needs an NVIDIA GPU of compute capability 8.0 or later, bf16 or
    fp16 (the inputs', or autocast's, as SDPA would be cast), head sizes of up to 256 in
    multiples of 8, and plain causal attention (no dropout, sliding window, soft cap or sinks)."""
    if not (VARLEN_USABLE and query.is_cuda and torch.version.hip is None):
        return None
    dtype = compute_dtype(query)
    head_size = query.shape[-1]
    fits = (
        dtype in HALF_DTYPES
        and key.shape[-1] == value.shape[-1] == head_size <= 256
        and head_size % 8 == 0
        and query.shape[1] % key.shape[1] == 0
    )
    usable = fits and _plain_causal(module, kwargs) and _flash_capable(query.device)
    return dtype if usable else None


def _plain_causal(module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether the attention is causal with no dropout, sliding window, soft cap or sinks: all
    that the packed kernels compute."""
    return (
        not kwargs.get("dropout")
        and kwargs.get("is_causal") is not False
        and getattr(module, "is_causal", True)
        and all(kwargs.get(name) is None for name in PLAIN_CAUSAL_UNSUPPORTED)
    )


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[list[tuple[int, int]]],
    scaling: float | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Causal attention within each example of the packed rows, all in one call of torch's
    variable-length flash attention: no loop over the examples. [batch, length, heads, dim]."""
    batch, heads, length, dim = query.shape
    offsets, longest = _varlen_offsets(bounds, batch, length, query.device)

    def flat(states: torch.Tensor) -> torch.Tensor:
        states = states.to(dtype).transpose(1, 2)
        return states.reshape(batch * length, states.shape[2], dim)

    attended = varlen_attn(
        flat(query),
        flat(key),
        flat(value),
        offsets,
        offsets,
        longest,
        longest,
        scale=scaling,
        window_size=(-1, 0),
        enable_gqa=key.shape[1] != heads,
    )
    return attended.reshape(batch, length, heads, dim)


def training_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    split_packed: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA on the faster kernel; with `split_packed`, causal attention within each example of
    a packed row. Only runs that pack split: finding the examples syncs with the device."""
    if not (split_packed and _is_packed(query, key, attention_mask, position_ids)):
        return _sdpa(module, query, key, value, attention_mask, **kwargs), None
    assert position_ids is not None
    bounds = row_bounds(position_ids)
    varlen_dtype = _varlen_dtype(module, query, key, value, kwargs)
    if varlen_dtype is not None:
        return _varlen(query, key, value, bounds, kwargs.get("scaling"), varlen_dtype), None
    # split, not slicing: the backward of each example's slice fills a zero gradient the size
    # of the whole row (for queries, keys and values), where that of a split concatenates the
    # pieces' gradients once. On a CPU, 16 SST-2 rows packed in bf16: 11.0 against 8.3 ms a
    # layer for the attention's forward and backward, 1.11x the tokens/s of the training step.
    rows = []
    for row, (row_query, row_key, row_value) in enumerate(
        zip(query.split(1), key.split(1), value.split(1), strict=True)
    ):
        sizes = [end - start for start, end in bounds[row if len(bounds) > 1 else 0]]
        pieces = [
            _sdpa(module, *example, None, **kwargs)
            for example in zip(
                row_query.split(sizes, dim=2),
                row_key.split(sizes, dim=2),
                row_value.split(sizes, dim=2),
                strict=True,
            )
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def _is_packed(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> bool:
    """Whether the rows are packed training rows: no mask, no cache, position ids to read the
    examples from."""
    return (
        attention_mask is None
        and position_ids is not None
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
        and query.shape[2] > 1
    )


_eager_packed_sdpa = torch.compiler.disable(functools.partial(training_sdpa, split_packed=True))
"""Packed attention by the examples' bounds as Python integers, which a compiled graph would
specialise on and recompile for at every step: compiled layers leave it eager."""


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`PACKED_SDPA`: causal attention within each example of a packed row. Where varlen
    attention cannot run, on a CPU, the `packed_kernel` operator computes it, inside a compiled
    layer's graph too; anywhere else (and for attention that is not plain causal)
    `training_sdpa` does, eagerly."""
    on_cpu_kernel = (
        query.device.type == "cpu"
        and _is_packed(query, key, attention_mask, position_ids)
        and _plain_causal(module, kwargs)
        and _varlen_dtype(module, query, key, value, kwargs) is None
    )
    if not on_cpu_kernel:
        return _eager_packed_sdpa(
            module, query, key, value, attention_mask, position_ids=position_ids, **kwargs
        )
    dtype = compute_dtype(query)
    scaling = kwargs.get("scaling")
    attended, _ = packed_attention(
        query,
        key,
        value,
        position_ids,
        query.shape[-1] ** -0.5 if scaling is None else scaling,
        dtype,
        dtype in HALF_DTYPES and query.requires_grad,
    )
    return attended.to(dtype), None


def packed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """No mask where `PACKED_SDPA` needs none: a row without padding and without a cache is
    causal within each of its examples, which it reads from the position ids. Any other case
    gets SDPA's own mask."""
    unmasked_row = (
        attention_mask is None
        and local_size is None
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == kv_offset == 0
        and q_length == kv_length
    )
    if unmasked_row:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        local_size=local_size,
        **kwargs,
    )


AttentionInterface.register(TRAINING_SDPA, training_sdpa)
AttentionMaskInterface.register(TRAINING_SDPA, sdpa_mask)
AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, packed_mask)


def use_training_attention(model: PreTrainedModel, packed: bool) -> None:
    """SDPA models switch to `PACKED_SDPA` for a run that packs, else to `TRAINING_SDPA`. Flash
    attention reads packed rows from the position ids itself and is left alone; eager attention
    (which only output_attentions needs) would make a block-diagonal mask and is left alone too."""
    if model.config._attn_implementation in ("sdpa", TRAINING_SDPA, PACKED_SDPA):
        model.set_attn_implementation(PACKED_SDPA if packed else TRAINING_SDPA)
