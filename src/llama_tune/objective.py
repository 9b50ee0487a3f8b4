"""The training objective contract and the target-token loss every objective builds on.

An objective is an `nn.Module` whose forward returns named loss *sums* over positions. It
declares each term's weight and, per example, over how many positions each term is summed; the
loop divides every sum by its count over the whole optimizer step, so any split of a step into
micro-batches or processes gives the same gradient. Features (distillation, adversarial terms)
implement the contract or wrap an objective that does; they never import the loop.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import peft
import torch
import transformers
from torch.utils.checkpoint import checkpoint

from llama_tune import data, models


@dataclass(frozen=True)
class ModelCalls:
    """How a training step may call its model outside the objective's forward (on-policy
    generation, the gradient attack of augmentation): inside `whole()` it can be called on its
    own (FSDP gathers the root's weights). `synced`: its weights are spread over the
    processes, so every process makes the same calls, as many as the busiest needs; `most(n)`
    is the largest `n` of any process. `regather()` after a backward gathers again what its
    end released (FSDP reshards the root)."""

    whole: Callable[[], contextlib.AbstractContextManager]
    synced: bool
    most: Callable[[int], int]
    regather: Callable[[], None]


ALONE = ModelCalls(
    contextlib.nullcontext, synced=False, most=lambda count: count, regather=lambda: None
)
"""A process holding its whole model, that answers for itself alone."""


class Objective(Protocol):
    """What the training loop asks of an objective, besides being an `nn.Module`."""

    weights: dict[str, float]
    """Weight of each term in the loss the optimizer minimises."""
    reference_terms: frozenset[str]
    """Terms that score the data's reference answers: an on-policy step, which trains on the
    model's own completions instead, counts them over no position."""

    @property
    def model(self) -> torch.nn.Module:
        """The trained model (the loop saves, checkpoints and scores it)."""
        ...

    def counts(self, example: data.Example) -> dict[str, int]:
        """Over how many positions of `example` each term is summed."""
        ...

    def extra_inputs(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Tensors the forward needs besides the batch, by training example index."""
        ...

    def rewrite_step(
        self, step: int, batches: list[list[data.Example]], calls: ModelCalls
    ) -> list[list[data.Example]] | None:
        """Other examples to train this step on (on-policy distillation); None keeps the data's."""
        ...

    def parameters(self) -> Any: ...

    def named_parameters(self) -> Any: ...

    def __call__(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TargetTokenLoss(torch.nn.Module):
    """Summed cross-entropy over target tokens, with the output head applied only there.

    The vocabulary is wide (49,152 for SmolLM2) and most positions are prompt, so projecting only
    the target positions saves much of the head's compute. Wrapping this as a module lets
    Accelerate prepare it (autocast, DDP) like any model.
    """

    weights: ClassVar[dict[str, float]] = {"ce": 1.0}
    reference_terms: ClassVar[frozenset[str]] = frozenset({"ce"})

    def __init__(self, model: peft.PeftModel | transformers.PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def counts(self, example: data.Example) -> dict[str, int]:
        return {"ce": example.target_length}

    def extra_inputs(self, _indices: list[int]) -> dict[str, torch.Tensor]:
        return {}

    def rewrite_step(
        self, _step: int, _batches: list[list[data.Example]], _calls: ModelCalls
    ) -> list[list[data.Example]] | None:
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`attention_mask` for padded rows, `position_ids` for packed ones (`data.collate*`)."""
        base = models.causal_lm(self.model)
        hidden = base.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            # A cache would make a packed row causal over its whole length (docs/plans).
            use_cache=False,
        )
        head = base.get_output_embeddings()
        return {"ce": target_cross_entropy(head, hidden.last_hidden_state[:, :-1], labels)}


class WrappedObjective(torch.nn.Module):
    """Base of objectives that add terms to another (consistency, adversarial): everything the
    contract asks is delegated to the wrapped objective unless the wrapper says otherwise."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective
        self.weights = dict(objective.weights)
        self.reference_terms = objective.reference_terms

    @property
    def model(self) -> torch.nn.Module:
        return self.objective.model

    def counts(self, example: data.Example) -> dict[str, int]:
        return dict(self.objective.counts(example))

    def extra_inputs(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.objective.extra_inputs(indices)

    def rewrite_step(
        self, step: int, batches: list[list[data.Example]], calls: ModelCalls
    ) -> list[list[data.Example]] | None:
        return self.objective.rewrite_step(step, batches, calls)


HEAD_CHUNK = 256
"""Target positions the output head and the cross-entropy take at a time: a 49,152-wide
vocabulary makes [positions, vocab] float32 logits a step's largest tensors (an instruction
row's answers), so only one chunk's exist at once."""


AGREED_CALLS = "llama_tune_agreed_calls"
"""The attribute a layout sets on an output head whose every call gathers its weights from
every process (ZeRO-3's hooks, forward and backward): `most(count)`, the largest `count` of any
process. A process with fewer chunks of positions than another then calls the head on filler
chunks as often as the busiest does; one skipping a call would leave the others waiting in a
gather it never joins. Its chunks are all checkpointed alike, so that the backward's calls
match too."""


def _agreed_chunk_count(head: torch.nn.Module, count: int) -> int:
    most = getattr(head, AGREED_CALLS, None)
    return count if most is None else most(count)


def chunked_sum(
    chunk_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
    states: torch.Tensor,
    chunk_size: int,
    checkpoint_last: bool = False,
) -> torch.Tensor:
    """The sum of `chunk_loss(states[start:stop], start, stop)` over chunks of `states`' rows.

    Only the states are kept for backward: each chunk's loss (its logits) is recomputed there
    (activation checkpointing). The last chunk is exempt unless `checkpoint_last`: backward
    starts with it, so its logits are freed before any other chunk's are recomputed, and the
    peak stays one chunk's.
    """
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], chunk_size):
        stop = min(start + chunk_size, states.shape[0])
        chunk = states[start:stop]
        if chunk.requires_grad and (checkpoint_last or stop < states.shape[0]):
            value = checkpoint(chunk_loss, chunk, start, stop, use_reentrant=False)
        else:
            value = chunk_loss(chunk, start, stop)
        total = total + value
    return total


FP32_HEAD_POSITIONS = 64
"""Up to this many positions, an fp32 head under a CPU's autocast runs in fp32."""


def head_logits(head: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """`head(states)`; at a few positions on a CPU, an fp32 head under autocast runs in fp32.
    Autocast would cast its whole weight to bf16 each forward (a trained head's gradient back
    too: the built-in model's tied 49,152 x 576 head, two passes over 28 M weights), which
    costs more than the fp32 products up to about 100 positions on this project's CPU (16
    positions, forward and backward: 57 against 85 ms). Classification answers and distilled
    label positions are this few; a chat row's answer is not."""
    weight = getattr(head, "weight", None)
    device = states.device.type
    positions = states.numel() // states.shape[-1]
    in_fp32 = (
        device == "cpu"
        and isinstance(weight, torch.Tensor)
        and weight.dtype == torch.float32
        and torch.is_autocast_enabled(device)
        and positions <= FP32_HEAD_POSITIONS
    )
    if not in_fp32:
        return head(states)
    with torch.autocast(device, enabled=False):
        return head(states.float())


def target_cross_entropy(
    head: torch.nn.Module, predicting_states: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of the target tokens, the head applied only where they are
    predicted, `HEAD_CHUNK` positions at a time.

    `predicting_states` are the final hidden states of positions 0..n-2: position t predicts
    token t + 1 (`head_chunked_sum`).
    """
    states, targets, _ = target_positions(predicting_states, labels)

    def chunk_loss(chunk: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        logits = head_logits(head, chunk).float()
        return torch.nn.functional.cross_entropy(logits, targets[start:stop], reduction="sum")

    return head_chunked_sum(head, chunk_loss, states)


def head_chunked_sum(
    head: torch.nn.Module,
    chunk_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
    states: torch.Tensor,
    chunk_size: int = HEAD_CHUNK,
    filler_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`chunked_sum` of a loss that applies the output `head` to chunks of `states`.

    A frozen head (LoRA) gets each chunk's gradient in the forward, so nothing is computed
    twice (nor the head called again in backward, where a sharded one is no longer gathered);
    a trained one recomputes each chunk's logits in backward. Where the processes must call
    the head alike (`AGREED_CALLS`), filler chunks make up the difference: `filler_loss` of a
    row of zeros calls the head as a real chunk's loss does (default: once).
    """
    chunks = -(-states.shape[0] // chunk_size)
    fillers = _agreed_chunk_count(head, chunks) - chunks
    total = _head_chunks(head, chunk_loss, states, chunk_size)
    if fillers == 0:
        return total

    def no_loss(chunk: torch.Tensor, _start: int, _stop: int) -> torch.Tensor:
        value = head_logits(head, chunk) if filler_loss is None else filler_loss(chunk)
        # Nonlinear in the logits, as every real loss is: a checkpointed chunk's backward
        # then recomputes the head before calling its backward, in a real chunk's order.
        return 0 * value.float().square().sum()

    # One position of zeros each, through the path a real chunk takes, its backward included:
    # tied to `states` (times zero), so that a gradient taken for what they come from alone
    # (SMART's and PGD's ascents) passes through the fillers as through the real chunks.
    filler = states.new_zeros(fillers, states.shape[-1]) + 0 * states.sum()
    return total + _head_chunks(head, no_loss, filler, 1)


def _head_chunks(
    head: torch.nn.Module,
    chunk_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
    states: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    if states.shape[0] == 0:
        return states.new_zeros((), dtype=torch.float32)
    trained_head = any(parameter.requires_grad for parameter in head.parameters())
    if trained_head or not (states.requires_grad and torch.is_grad_enabled()):
        agreed = hasattr(head, AGREED_CALLS)
        return chunked_sum(chunk_loss, states, chunk_size, checkpoint_last=agreed)
    gradients = []

    def loss_and_gradient(chunk: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        chunk = chunk.requires_grad_(True)
        loss = chunk_loss(chunk, start, stop)
        gradients.append(torch.autograd.grad(loss, chunk)[0])
        return loss.detach()

    # Detached states: each chunk is a leaf of its own, its graph freed with its gradient.
    total = chunked_sum(loss_and_gradient, states.detach(), chunk_size)
    return _KnownGradient.apply(total, states, torch.cat(gradients))


def head_paired_sum(
    head: torch.nn.Module,
    pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    first_states: torch.Tensor,
    second_states: torch.Tensor,
    chunk_size: int = HEAD_CHUNK,
    second_fixed: bool = False,
) -> torch.Tensor:
    """`head_chunked_sum` of `pair_loss(first logits, second logits)` over two aligned sets of
    final hidden states, `chunk_size` pairs of positions at a time: a divergence between two
    forwards' [positions, vocabulary] logits (several fp32 copies of each) never exists whole.
    `second_fixed`: the second side is a target, its logits computed without a graph."""
    width = first_states.shape[-1]

    def chunk_loss(chunk: torch.Tensor, _start: int, _stop: int) -> torch.Tensor:
        first = head_logits(head, chunk[:, :width])
        with torch.no_grad() if second_fixed else contextlib.nullcontext():
            second = head_logits(head, chunk[:, width:])
        return pair_loss(first, second)

    second = second_states.detach() if second_fixed else second_states
    paired = torch.cat([first_states, second], dim=-1)
    return head_chunked_sum(
        head, chunk_loss, paired, chunk_size, filler_loss=lambda chunk: chunk_loss(chunk, 0, 1)
    )


class _KnownGradient(torch.autograd.Function):
    """`value`, whose gradient with respect to `inputs` was computed already (`gradient`)."""

    @staticmethod
    def forward(
        ctx: Any, value: torch.Tensor, _inputs: torch.Tensor, gradient: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(gradient)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (gradient,) = ctx.saved_tensors
        return None, gradient * grad_output, None


@torch.no_grad()
def target_token_losses(
    head: torch.nn.Module, predicting_states: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the cross-entropy of each target token, in float32, the [batch, n-1] mask of where
    they are predicted), for scoring without gradients: the head applied only there,
    `HEAD_CHUNK` positions at a time."""
    states, targets, selected = target_positions(predicting_states, labels)
    losses = [
        torch.nn.functional.cross_entropy(
            head_logits(head, states[start : start + HEAD_CHUNK]).float(),
            targets[start : start + HEAD_CHUNK],
            reduction="none",
        )
        for start in range(0, len(states), HEAD_CHUNK)
    ]
    for _ in range(_agreed_chunk_count(head, len(losses)) - len(losses)):
        head_logits(head, states.new_zeros(1, states.shape[-1]))
    return torch.cat(losses or [states.new_zeros(0, dtype=torch.float32)]), selected


def target_positions(
    predicting_states: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the states of the positions that predict a target token, those tokens, the
    [batch, n-1] mask of where the positions are)."""
    targets = labels[:, 1:]
    selected = targets != data.IGNORE_INDEX
    return predicting_states[selected], targets[selected], selected


def step_counts(
    objective: Objective, examples: list[data.Example], reference_answers: bool = True
) -> Counter[str]:
    """Positions each loss term is summed over in these examples; without `reference_answers`
    (the model's own completions) the terms that score reference answers count none."""
    totals: Counter[str] = Counter()
    for example in examples:
        totals.update(objective.counts(example))
    if not reference_answers:
        for name in objective.reference_terms:
            totals[name] = 0
    return totals


def combined(objective: Objective, sums: dict[str, Any], counts: Counter[str]) -> Any:
    """The weighted sum of each term's mean: the loss the optimizer minimises.

    A term counted over no position (task CE on an on-policy distillation step) is left out.
    """
    return sum(
        objective.weights[name] * sums[name] / counts[name] for name in sums if counts[name] > 0
    )
