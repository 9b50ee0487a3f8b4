"""Consistency between clean training examples and their perturbed copies (TRADES-style).

With `adversarial.augment.mode: add` a perturbed example joins the micro-batch of the clean
example it was made from. `ConsistencyObjective` wraps the training objective and adds the term
`consistency`: KL(p_clean || p_perturbed) of the model's next-token distributions at the target
positions, summed, and counted over the perturbed examples' target tokens. A robustness drop
measures answers that change under perturbation; this term trains exactly that away, where the
task loss on the perturbed copy only trains it to be right.

The clean side is held fixed (no gradient): the clean example learns from its own loss, and the
term moves the perturbed answer towards it rather than the clean answer towards a hedge between
the two. Both sides come from the objective's own forward: no extra decoder pass.
(Zhang et al., 2019, "Theoretically Principled Trade-off between Robustness and Accuracy".)
"""

from __future__ import annotations

from itertools import accumulate

import torch

from llama_tune import data, models, packing
from llama_tune.objective import (
    HEAD_CHUNK,
    Objective,
    WrappedObjective,
    head_paired_sum,
    target_positions,
)


def clean_rows(indices: list[int]) -> torch.Tensor:
    """For each row of a micro-batch, the row that holds its clean example; -1 for clean rows.

    In add mode a perturbed copy carries its clean example's training index and comes after it.
    """
    first_row: dict[int, int] = {}
    rows = []
    for row, index in enumerate(indices):
        rows.append(first_row.get(index, -1))
        first_row.setdefault(index, row)
    return torch.tensor(rows, dtype=torch.long)


def paired_divergence(
    head: torch.nn.Module,
    states: torch.Tensor,
    targets_per_row: torch.Tensor,
    pairs: torch.Tensor,
    chunk_size: int = HEAD_CHUNK,
) -> torch.Tensor:
    """KL(clean || perturbed) summed over every perturbed row's target positions.

    `states` are the final hidden states of the target positions, row after row
    (`objective.target_positions`); `targets_per_row` counts them per row; `pairs` is
    `clean_rows` of the micro-batch. The head runs on `chunk_size` pairs of positions at a
    time (`objective.head_paired_sum`), the clean side held fixed.
    """
    counts = targets_per_row.tolist()
    starts = [0, *accumulate(counts)]
    clean_positions, perturbed_positions = [], []
    for row, clean_row in enumerate(pairs.tolist()):
        if clean_row < 0:
            continue
        # The augmenter keeps the clean example's target tokens, so the counts agree.
        assert counts[row] == counts[clean_row], "a perturbed copy's targets changed"
        perturbed_positions += range(starts[row], starts[row] + counts[row])
        clean_positions += range(starts[clean_row], starts[clean_row] + counts[row])
    # A micro-batch without a perturbed copy sums over no position; under ZeRO-3 it still
    # calls the head as often as another process's (`objective.AGREED_CALLS`).
    perturbed, clean = states[perturbed_positions], states[clean_positions]
    return head_paired_sum(head, _kl_from_clean, perturbed, clean, chunk_size, second_fixed=True)


def _kl_from_clean(perturbed_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || perturbed) summed over positions, in float32."""
    perturbed = torch.log_softmax(perturbed_logits.float(), dim=-1)
    clean = torch.log_softmax(clean_logits.float(), dim=-1)
    return (clean.exp() * (clean - perturbed)).sum()


class ConsistencyObjective(WrappedObjective):
    """A training objective plus `consistency`, weighted `weight`, on its own forward."""

    def __init__(self, objective: Objective, weight: float) -> None:
        super().__init__(objective)
        self.weights["consistency"] = weight
        self._states = models.DecoderStates(objective.model)

    def counts(self, example: data.Example) -> dict[str, int]:
        perturbed_targets = example.target_length if example.perturbation is not None else 0
        return super().counts(example) | {"consistency": perturbed_targets}

    def extra_inputs(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return super().extra_inputs(indices) | {"clean_rows": clean_rows(indices)}

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        clean_rows: torch.Tensor | None = None,
        **layout: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The wrapped objective's sums, plus `consistency` for training micro-batches
        (evaluation batches come without `clean_rows`: nothing is paired there). `layout` is
        the padded rows' `attention_mask` or the packed row's `position_ids`, and any inputs
        the wrapped objective takes besides."""
        batch = {"input_ids": input_ids, "labels": labels} | layout
        if clean_rows is None:
            return self.objective(**batch)
        with self._states.keeping():
            sums = self.objective(**batch)
        head = models.causal_lm(self.model).get_output_embeddings()
        states, _, selected = target_positions(self._states.take()[:, :-1], labels)
        position_ids = layout.get("position_ids")
        if position_ids is None:
            per_example = selected.sum(dim=1)
        else:
            # A packed row holds the examples in order: count each one's targets.
            example = packing.example_index(position_ids)[:, :-1]
            per_example = torch.bincount(example[selected], minlength=len(clean_rows))
        return sums | {"consistency": paired_divergence(head, states, per_example, clean_rows)}
