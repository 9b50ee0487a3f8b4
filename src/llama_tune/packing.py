"""Padding-free packing: a micro-batch's examples laid end to end in one row, each attending
only to itself.

A packed row has no attention mask; its position ids restart at 0 where each example starts.
transformers' own SDPA path turns such a row into a dense [row x row] block-diagonal mask (and,
unless the forward passes `use_cache=False`, silently into a plain causal mask over the whole
row), which costs attention over the whole row. `PACKED_SDPA` is SDPA that instead runs causal
attention on each example's own slice: the attention work of the unpacked examples, none of the
padding. For every other input (padding masks, generation with a cache) it is transformers' SDPA
unchanged, so a model keeps it for evaluation and generation too.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "llama_tune_packed_sdpa"


def example_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each example in one row of position ids: a new example starts wherever
    the position does not follow on from the one before (transformers' packed-row rule)."""
    starts = (torch.diff(position_ids) != 1).nonzero().flatten() + 1
    # .tolist() syncs with the device once per call.
    edges = [0, *starts.tolist(), len(position_ids)]
    return list(pairwise(edges))


def example_index(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, length]: which example of its row each position belongs to (0, 1, ...)."""
    restarts = torch.diff(position_ids, dim=-1) != 1
    return torch.nn.functional.pad(restarts.long().cumsum(dim=-1), (1, 0))


def continues_example(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, length - 1]: whether the token after each position is of the same example, i.e.
    whether the position's next-token prediction stays inside its example."""
    return torch.diff(position_ids, dim=-1) == 1


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example; SDPA itself for anything unpacked."""
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
        and query.shape[2] > 1
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    assert position_ids is not None
    rows = []
    for row in range(query.shape[0]):
        row_positions = position_ids[row if position_ids.shape[0] > 1 else 0]
        pieces = [
            sdpa_attention_forward(
                module,
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                None,
                **kwargs,
            )[0]
            for start, end in example_bounds(row_positions)
        ]
        rows.append(torch.cat(pieces, dim=1))
    # sdpa_attention_forward returns [batch, length, heads, head_dim].
    return torch.cat(rows, dim=0), None


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
    """No mask where `packed_sdpa` needs none: a row without padding and without a cache is
    causal within each of its examples, which `packed_sdpa` reads from the position ids. Any
    other case gets SDPA's own mask."""
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


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, packed_mask)


def use_packed_attention(model: PreTrainedModel) -> None:
    """Let `model` read packed rows: SDPA models switch to `PACKED_SDPA`. Flash attention reads
    packed rows from the position ids itself and is left alone; eager attention (which only
    output_attentions needs) would make a block-diagonal mask and is left alone too."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(PACKED_SDPA)
