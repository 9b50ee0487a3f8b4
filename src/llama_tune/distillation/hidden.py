"""Hidden-state distillation: pull chosen student layers towards teacher layers.

Layers are numbered as `output_hidden_states` numbers them: 0 is the embedding output, i the
output of decoder layer i. When the widths differ, a learned linear projection maps each student
layer into the teacher's width (trained with the student, used only for this loss).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

from llama_tune.errors import UserError


class LayerMapError(UserError):
    """A hidden-state layer map that names layers the models do not have."""


def layer_map(
    student_layers: int,
    teacher_layers: int,
    kept: list[int] | None = None,
    explicit: dict[int, int] | None = None,
) -> dict[int, int]:
    """Student layer -> teacher layer to match.

    By default each student layer is matched to the teacher layer it was copied from (a student
    built from the teacher), or to the evenly spaced teacher layer (any other student).
    """
    if explicit is not None:
        outside = [
            f"{student}->{teacher}"
            for student, teacher in explicit.items()
            if not (0 <= student <= student_layers and 0 <= teacher <= teacher_layers)
        ]
        if outside:
            raise LayerMapError(
                f"distill.hidden_states.layers: {', '.join(outside)} outside the student's "
                f"0..{student_layers} or the teacher's 0..{teacher_layers} layers"
            )
        return dict(explicit)
    if kept is not None:
        return {index + 1: teacher_index + 1 for index, teacher_index in enumerate(kept)}
    return {
        index: round(index * teacher_layers / student_layers)
        for index in range(1, student_layers + 1)
    }


class HiddenStateMatch(torch.nn.Module):
    """Summed per-position distance between mapped student and teacher hidden states."""

    def __init__(
        self,
        pairs: dict[int, int],
        student_width: int,
        teacher_width: int,
        loss: Literal["mse", "cosine"],
    ) -> None:
        super().__init__()
        self.pairs = pairs
        self.loss = loss
        self.projections = None
        if student_width != teacher_width:
            self.projections = torch.nn.ModuleDict(
                {
                    str(student): torch.nn.Linear(student_width, teacher_width, bias=False)
                    for student in pairs
                }
            )

    def forward(
        self,
        student_states: tuple[torch.Tensor, ...],
        teacher_states: tuple[torch.Tensor, ...],
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Sum over the selected [batch, seq] positions of the distance summed over pairs."""
        total = student_states[0].new_zeros((), dtype=torch.float32)
        for student, teacher in self.pairs.items():
            mine = student_states[student][positions].float()
            if self.projections is not None:
                mine = self.projections[str(student)](mine)
            theirs = teacher_states[teacher][positions].float().detach()
            if self.loss == "mse":
                distance = (mine - theirs).pow(2).mean(dim=-1)
            else:
                distance = 1.0 - F.cosine_similarity(mine, theirs, dim=-1)
            total = total + distance.sum()
        return total
