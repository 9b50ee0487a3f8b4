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
therefore applies both output heads to a few positions at a time (`objective.head_chunked_sum`):
a frozen student head (LoRA) takes each chunk's gradient at once, a trained one recomputes the
chunk in backward (activation checkpointing), so only hidden states are kept for all positions
and full [positions, vocab] fp32 logits never exist for teacher or student. The
teacher's side comes from its hidden states (online) or from a cache of its top-k
log-probabilities (offline); both give the same loss when the cache keeps the whole vocabulary.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

from llama_tune.objective import head_chunked_sum, head_logits

LossName = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]
# Log of the smallest remainder mass kept: below it the bucket is empty and its gradient zero.
_SMALLEST_LOG_MASS = -80.0


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return torch.sum(log_p.exp() * (log_p - log_q), dim=-1)


def log_divergence(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    loss: LossName,
    beta: float = 0.5,
) -> torch.Tensor:
    """The loss at each position between two distributions given as log-probabilities."""
    if loss == "forward_kl":
        return _kl(teacher_log_probs, student_log_probs)
    if loss == "reverse_kl":
        return _kl(student_log_probs, teacher_log_probs)
    if loss == "jsd":
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
        return beta * teacher_part + (1.0 - beta) * student_part
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(dim=-1)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: LossName,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """The distillation loss at each position (a tensor of shape logits.shape[:-1])."""
    student_log_probs = tempered_log_probs(student_logits, temperature)
    teacher_log_probs = tempered_log_probs(teacher_logits, temperature)
    return log_divergence(student_log_probs, teacher_log_probs, loss, beta) * temperature**2


def tempered_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature), in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def compared_logits(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    vocab_size: int | None,
    token_subset: torch.Tensor | None,
) -> torch.Tensor:
    """Logits over the tokens distillation compares: the tokenizer's (a padded embedding table's
    extra rows belong to no token), or only `token_subset` (for classification, the labels)."""
    logits = head_logits(head, hidden)[..., :vocab_size]
    return logits if token_subset is None else logits[..., token_subset]


class OnlineTeacher:
    """The teacher's distribution at each distilled position, from its final hidden states."""

    def __init__(
        self,
        hidden: torch.Tensor,
        head: torch.nn.Module,
        vocab_size: int | None = None,
        token_subset: torch.Tensor | None = None,
    ) -> None:
        self.hidden = hidden.detach()
        self.head = head
        self.vocab_size = vocab_size
        self.token_subset = token_subset

    @torch.no_grad()
    def pair(
        self, start: int, stop: int, student_log_probs: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) log-probabilities over the same categories at positions start:stop."""
        logits = compared_logits(
            self.head, self.hidden[start:stop], self.vocab_size, self.token_subset
        )
        return student_log_probs, tempered_log_probs(logits, temperature)


def log_remainder(log_kept_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - kept mass), floored so an empty remainder stays finite."""
    remainder = -torch.expm1(log_kept_mass)
    return remainder.clamp(min=torch.finfo(torch.float32).tiny).log().clamp(min=_SMALLEST_LOG_MASS)


class TopKTeacher:
    """The teacher's distribution at each distilled position, from its cached top-k log-probs.

    The student is compared over the same k tokens plus one bucket for all other tokens (unless
    the k tokens are all there are), so k equal to the vocabulary is exactly online distillation.
    """

    def __init__(
        self, ids: torch.Tensor, log_probs: torch.Tensor, rest: torch.Tensor, has_rest: bool
    ) -> None:
        self.ids = ids.long()
        self.log_probs = log_probs.float()
        self.rest = rest.float()
        self.has_rest = has_rest

    def pair(
        self, start: int, stop: int, student_log_probs: torch.Tensor, _temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) log-probabilities over the cached tokens (+ the remainder); the
        cache was built at the recipe's temperature."""
        student_top = student_log_probs.gather(-1, self.ids[start:stop])
        teacher_top = self.log_probs[start:stop]
        if not self.has_rest:
            return student_top, teacher_top
        student_rest = log_remainder(student_top.logsumexp(dim=-1).clamp(max=0.0))
        teacher_rest = self.rest[start:stop]
        return (
            torch.cat([student_top, student_rest[:, None]], dim=-1),
            torch.cat([teacher_top, teacher_rest[:, None]], dim=-1),
        )


def chunked_distillation(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher: OnlineTeacher | TopKTeacher,
    loss: LossName,
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 128,
    vocab_size: int | None = None,
    token_subset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed distillation loss over positions, given the student's final hidden states there.

    `teacher` gives the teacher's side at the same positions: `OnlineTeacher` from its hidden
    states, or `TopKTeacher` from a cache. The teacher carries no gradient.
    """

    def chunk_loss(student_chunk: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        logits = compared_logits(student_head, student_chunk, vocab_size, token_subset)
        student_log_probs = tempered_log_probs(logits, temperature)
        student_side, teacher_side = teacher.pair(start, stop, student_log_probs, temperature)
        return log_divergence(student_side, teacher_side, loss, beta).sum() * temperature**2

    return head_chunked_sum(student_head, chunk_loss, student_hidden, chunk_size)
