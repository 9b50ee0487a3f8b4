"""Distillation losses between teacher and student next-token distributions, in chunks.

Every loss compares the temperature-softened distributions p_t = softmax(teacher / T) and
p_s = softmax(student / T) at each counted position and is multiplied by T^2, so its gradient
keeps the same scale whatever the temperature (Hinton et al., 2015):

- forward_kl: KL(p_t || p_s), mass-covering;
- reverse_kl: KL(p_s || p_t), mode-seeking;
- jsd: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s
  (beta = 0.5 is the Jensen-Shannon divergence);
- tvd: total variation, 0.5 * sum |p_t - p_s|.

A 49,152-wide vocabulary makes logits the largest tensors of a step. `chunked_distillation`
therefore applies both output heads to a few positions at a time and recomputes the student's
chunk logits in backward (activation checkpointing), so only hidden states are kept for all
positions and full [positions, vocab] fp32 logits never exist for teacher or student.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch.utils.checkpoint import checkpoint

LossName = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return torch.sum(log_p.exp() * (log_p - log_q), dim=-1)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: LossName,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """The distillation loss at each position (a tensor of shape logits.shape[:-1])."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if loss == "forward_kl":
        value = _kl(teacher_log_probs, student_log_probs)
    elif loss == "reverse_kl":
        value = _kl(student_log_probs, teacher_log_probs)
    elif loss == "jsd":
        # log m - log p_t from d = log p_s - log p_t, with expm1/log1p on the side where they
        # cannot overflow: exact (0) where the two distributions agree, finite everywhere.
        d = student_log_probs - teacher_log_probs
        gap = torch.where(
            d <= 0,
            torch.log1p((1.0 - beta) * torch.expm1(d.clamp(max=0))),
            d + torch.log1p(beta * torch.expm1(-d.clamp(min=0))),
        )
        teacher_part = -(teacher_log_probs.exp() * gap).sum(dim=-1)
        student_part = (student_log_probs.exp() * (d - gap)).sum(dim=-1)
        value = beta * teacher_part + (1.0 - beta) * student_part
    else:
        value = 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(dim=-1)
    return value * temperature**2


def chunked_distillation(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Module,
    loss: LossName,
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 128,
    vocab_size: int | None = None,
    token_subset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed distillation loss over positions, given both models' final hidden states there.

    `vocab_size` cuts both heads' outputs to the shared tokenizer's size (a model may pad its
    embedding table; those logits belong to no token). `token_subset` compares the two
    distributions over those token ids only, renormalised (for classification: the label tokens).
    The teacher's hidden states carry no gradient.
    """
    teacher_hidden = teacher_hidden.detach()

    def chunk_loss(student_chunk: torch.Tensor, teacher_chunk: torch.Tensor) -> torch.Tensor:
        student_logits = student_head(student_chunk)[..., :vocab_size]
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_chunk)[..., :vocab_size]
        if token_subset is not None:
            student_logits = student_logits[..., token_subset]
            teacher_logits = teacher_logits[..., token_subset]
        return divergence(student_logits, teacher_logits, loss, temperature, beta).sum()

    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_size):
        student_chunk = student_hidden[start : start + chunk_size]
        teacher_chunk = teacher_hidden[start : start + chunk_size]
        if student_chunk.requires_grad:
            # Keep only the chunk's hidden states; its logits are recomputed in backward.
            value = checkpoint(chunk_loss, student_chunk, teacher_chunk, use_reentrant=False)
        else:
            value = chunk_loss(student_chunk, teacher_chunk)
        total = total + value
    return total
