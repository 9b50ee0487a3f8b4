"""Packed rows: a micro-batch's examples laid end to end in one row, without padding.

A packed row has no attention mask; its position ids restart at 0 where each example starts, and
attention must stay inside each example (`attention.TRAINING_SDPA` keeps it there). These
helpers read the examples back from the position ids.
"""

from __future__ import annotations

from itertools import pairwise

import torch


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
