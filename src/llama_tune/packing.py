"""Packed rows: a micro-batch's examples laid end to end in one row, without padding.

A packed row has no attention mask; its position ids restart at 0 where each example starts, and
attention must stay inside each example (`attention.TRAINING_SDPA` keeps it there). These
helpers read the examples back from the position ids.
"""

from __future__ import annotations

import weakref
from itertools import pairwise

import torch


def example_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each example in one row of position ids: a new example starts wherever
    the position does not follow on from the one before (transformers' packed-row rule)."""
    starts = (torch.diff(position_ids) != 1).nonzero().flatten() + 1
    # .tolist() syncs with the device once per call.
    edges = [0, *starts.tolist(), len(position_ids)]
    return list(pairwise(edges))


class _RowBounds:
    """Each packed row's example bounds for the forward under way. Every layer gets the same
    position ids, and finding the bounds syncs with the device: once per forward (a checkpointed
    layer's recomputation and the backward reuse them), not once per layer."""

    def __init__(self) -> None:
        self.source: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.rows: list[list[tuple[int, int]]] = []

    def __call__(self, position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """[start, end) of each example, row by row (one row for rows that share positions)."""
        if position_ids.is_inference():  # no version counter to tell a rewrite by
            return [example_bounds(row) for row in position_ids]
        known = self.source is not None and self.source() is position_ids
        if not known or self.version != position_ids._version:
            self.rows = [example_bounds(row) for row in position_ids]
            self.source, self.version = weakref.ref(position_ids), position_ids._version
        return self.rows


row_bounds = _RowBounds()


def example_index(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, length]: which example of its row each position belongs to (0, 1, ...)."""
    restarts = torch.diff(position_ids, dim=-1) != 1
    return torch.nn.functional.pad(restarts.long().cumsum(dim=-1), (1, 0))


def continues_example(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, length - 1]: whether the token after each position is of the same example, i.e.
    whether the position's next-token prediction stays inside its example."""
    return torch.diff(position_ids, dim=-1) == 1
