"""Adversarial training in embedding space: FGM, PGD, FreeLB, SMART, and NEFTune noise.

`AdversarialObjective` wraps any training objective (task cross-entropy, distillation). A
forward hook on the student's input-embedding layer adds an offset to the embeddings of every
non-padding position; the wrapped objective runs unchanged on top, once clean and once (or, for
FreeLB, `steps` times) under the adversarial offset. The teacher of a distillation has its own
embeddings, so it keeps reading the clean input.

The ascent directions come from `torch.autograd.grad` with respect to the offset only, inside
the forward: the trainer's single backward then carries the clean and adversarial terms, so
gradient accumulation and several processes (DDP) behave exactly as without adversarial
training. Random starts use the global RNG, which checkpoints restore, so resuming is exact.

- FGM (Miyato et al., 2017): one step of length epsilon along the loss gradient.
- PGD (Madry et al., 2018): `steps` ascent steps of `step_size`, each projected back into the
  epsilon ball; FGM is PGD with one step of length epsilon.
- FreeLB (Zhu et al., 2020): from a random start, the loss of every ascent step is kept and
  their mean is the adversarial term, so parameter gradients accumulate along the ascent.
- SMART (Jiang et al., 2020): the adversarial term is the symmetric KL divergence between the
  model's next-token distributions on clean and perturbed embeddings, at the target positions;
  the perturbation ascends that divergence from a tiny random start.
- NEFTune (Jain et al., 2023): uniform noise of scale alpha / sqrt(length x width) on every
  training forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from llama_tune import data, models, packing
from llama_tune.objective import Objective, WrappedObjective, head_paired_sum, target_positions
from llama_tune.schema import AdversarialTrainConfig

SMART_START = 1e-5
"""Standard deviation of SMART's random start (the paper's sigma)."""


def normalised(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit size per position: L2-normalised, or its sign."""
    if norm == "linf":
        return gradient.sign()
    return gradient / gradient.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def projected(offset: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """`offset` with every position's vector pulled back into the epsilon ball."""
    if norm == "linf":
        return offset.clamp(-epsilon, epsilon)
    lengths = offset.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return offset * (epsilon / lengths).clamp(max=1.0)


def random_start(
    shape: torch.Size, epsilon: float, norm: str, device: torch.device
) -> torch.Tensor:
    """A random offset inside the epsilon ball: uniform entries (linf), or a uniformly random
    direction and length up to epsilon (l2)."""
    if norm == "linf":
        return (torch.rand(shape, device=device) * 2 - 1) * epsilon
    direction = normalised(torch.randn(shape, device=device), "l2")
    return direction * torch.rand((*shape[:-1], 1), device=device) * epsilon


def neftune_noise(lengths: torch.Tensor, width: int, alpha: float) -> torch.Tensor:
    """NEFTune's uniform noise, alpha / sqrt(length x width), where `lengths` [batch, seq]
    gives each position the length of its own example (0 at padding: no noise there)."""
    scale = alpha / torch.sqrt(lengths.clamp_min(1).float() * width)
    noise = torch.rand((*lengths.shape, width), device=lengths.device) * 2 - 1
    return noise * (scale * (lengths > 0))[..., None]


def example_lengths(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    """[batch, seq]: the length of the example each position belongs to, 0 at padding, in
    padded rows (`attention_mask`) and packed ones (`position_ids`)."""
    if position_ids is not None:
        example = packing.example_index(position_ids)
        lengths = torch.zeros_like(example).scatter_add_(1, example, torch.ones_like(example))
        return lengths.gather(1, example)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return attention_mask * attention_mask.sum(dim=1, keepdim=True)


def symmetric_kl(first_logits: torch.Tensor, second_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) + KL(q || p) summed over positions, in float32."""
    first = torch.log_softmax(first_logits.float(), dim=-1)
    second = torch.log_softmax(second_logits.float(), dim=-1)
    return ((first.exp() - second.exp()) * (first - second)).sum()


class AdversarialObjective(WrappedObjective):
    """A training objective plus its adversarial term(s), computed in one forward.

    Term names: the wrapped objective's (clean, NEFTune noise included) and, for fgm/pgd/freelb,
    `adversarial_<term>` for each of them with weight `weight` x the term's weight and the same
    counts (a copy of a reference-answer term scores reference answers too); for smart,
    `smoothness` counted over the task's target tokens.
    """

    def __init__(
        self, objective: Objective, settings: AdversarialTrainConfig, reuse_clean_graph: bool = True
    ) -> None:
        """`reuse_clean_graph`: FGM's and PGD's first ascent step takes its gradient through the
        clean forward's graph, which the step's backward then runs again. ZeRO-3 cannot: the
        first backward of its first step releases weights the second one reads (a size-0
        tensor in the final norm's backward); there the ascent makes a forward of its own."""
        super().__init__(objective)
        self.settings = settings
        self.reuse_clean_graph = reuse_clean_graph
        if settings.method == "smart":
            self.weights["smoothness"] = settings.weight
        elif settings.method is not None:
            for name, weight in objective.weights.items():
                self.weights[f"adversarial_{name}"] = settings.weight * weight
            self.reference_terms |= {f"adversarial_{name}" for name in objective.reference_terms}
        base = models.causal_lm(objective.model)
        self._offset: torch.Tensor | None = None
        # Hooks, not a changed forward: the wrapped objective runs as it always does.
        base.get_input_embeddings().register_forward_hook(self._add_offset)
        self._clean_states = models.DecoderStates(objective.model)

    def counts(self, example: data.Example) -> dict[str, int]:
        counts = super().counts(example)
        if self.settings.method == "smart":
            counts["smoothness"] = example.target_length
        elif self.settings.method is not None:
            counts |= {f"adversarial_{name}": count for name, count in counts.items()}
        return counts

    def _add_offset(self, _module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._offset is None or self._offset.shape[:2] != output.shape[:2]:
            # Not a forward of this objective (generation, the gradient attack): untouched.
            return output
        return output + self._offset.to(output.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **extra: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Padded rows come with `attention_mask`, packed ones with `position_ids`."""
        layout = {"attention_mask": attention_mask, "position_ids": position_ids}
        batch = {"input_ids": input_ids, "labels": labels} | layout | extra
        settings = self.settings
        embedding = models.causal_lm(self.model).get_input_embeddings()
        width = embedding.embedding_dim
        device = input_ids.device
        lengths = example_lengths(input_ids, attention_mask, position_ids)
        # Offsets stay off padding; a packed row has none.
        mask = (lengths > 0)[..., None].float()
        noise = torch.zeros((*input_ids.shape, width), device=device)
        if self.training and settings.neftune_alpha is not None:
            noise = neftune_noise(lengths, width, settings.neftune_alpha)
        if not self.training or settings.method is None:
            return self._run(batch, noise)

        def total(sums: dict[str, torch.Tensor]) -> torch.Tensor:
            # The direction of ascent only: the step's counts scale every example alike.
            return sum(self.objective.weights[name] * value for name, value in sums.items())

        epsilon, norm = settings.epsilon, settings.norm
        step_size = settings.step_size or 1.5 * epsilon / settings.steps
        if settings.method == "smart":
            return self._smart(batch, noise, mask, epsilon, step_size)
        if settings.method == "freelb":
            offset = random_start(noise.shape, epsilon, norm, device) * mask
            clean = self._run(batch, noise)
            ascent: list[dict[str, torch.Tensor]] = []
            for step in range(settings.steps):
                offset = offset.detach().requires_grad_(True)
                ascent.append(self._run(batch, noise + offset))
                if step + 1 < settings.steps:
                    gradient = self._gradient(total(ascent[-1]), offset, retain_graph=True)
                    offset = projected(
                        offset + step_size * normalised(gradient, norm), epsilon, norm
                    )
                    offset = offset * mask
            adversarial = {
                name: sum(sums[name] for sums in ascent) / settings.steps for name in clean
            }
            return clean | {f"adversarial_{name}": value for name, value in adversarial.items()}

        # FGM and PGD; the first ascent step reuses the clean forward's graph where it may.
        steps = 1 if settings.method == "fgm" else settings.steps
        step_size = epsilon if settings.method == "fgm" else step_size
        offset = torch.zeros_like(noise, requires_grad=True)
        if self.reuse_clean_graph:
            clean = sums = self._run(batch, noise + offset)
        else:
            clean, sums = self._run(batch, noise), self._run(batch, noise + offset)
        for step in range(steps):
            retain_graph = step == 0 and self.reuse_clean_graph
            gradient = self._gradient(total(sums), offset, retain_graph=retain_graph)
            offset = projected(
                offset.detach() + step_size * normalised(gradient, norm), epsilon, norm
            )
            offset = offset * mask
            if step + 1 < steps:
                offset.requires_grad_(True)
                sums = self._run(batch, noise + offset)
        adversarial = self._run(batch, noise + offset.detach())
        return clean | {f"adversarial_{name}": value for name, value in adversarial.items()}

    def _gradient(
        self, loss: torch.Tensor, offset: torch.Tensor, retain_graph: bool = False
    ) -> torch.Tensor:
        """The gradient of `loss` with respect to `offset` alone, inside the forward."""
        (gradient,) = torch.autograd.grad(loss, offset, retain_graph=retain_graph)
        if isinstance(self, FSDPModule):
            # Sharded by FSDP2, this objective is the root, and every backward, this one
            # included, ends by resharding the root's weights (embeddings, final norm, head),
            # which the rest of this forward still reads: gather them again.
            self.unshard()
        return gradient

    def _run(
        self, batch: dict[str, torch.Tensor], offset: torch.Tensor, keep_states: bool = False
    ) -> dict[str, torch.Tensor]:
        """The wrapped objective's sums with `offset` added to the input embeddings;
        `keep_states` keeps the student's last hidden states of that forward."""
        self._offset = offset
        try:
            with self._clean_states.keeping() if keep_states else nullcontext():
                return self.objective(**batch)
        finally:
            self._offset = None

    def _student_states(self, batch: dict[str, torch.Tensor], offset: torch.Tensor) -> torch.Tensor:
        """The student's last hidden states where they predict target tokens, under `offset`."""
        self._offset = offset
        try:
            states = (
                models.causal_lm(self.model)
                .get_decoder()(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"],
                    use_cache=False,
                )
                .last_hidden_state
            )
        finally:
            self._offset = None
        return self._at_targets(batch, states)

    def _at_targets(self, batch: dict[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor:
        """The student's last hidden `states` at the positions that predict target tokens."""
        return target_positions(states[:, :-1], batch["labels"])[0]

    def _smart(
        self,
        batch: dict[str, torch.Tensor],
        noise: torch.Tensor,
        mask: torch.Tensor,
        epsilon: float,
        step_size: float,
    ) -> dict[str, torch.Tensor]:
        norm = self.settings.norm
        head = models.causal_lm(self.model).get_output_embeddings()
        # The clean forward's own states give the clean side: no second clean forward.
        clean = self._run(batch, noise, keep_states=True)
        # The student alone from here: the teacher of a distillation plays no part in SMART.
        clean_states = self._at_targets(batch, self._clean_states.take())
        offset = torch.randn_like(noise) * SMART_START * mask
        for _ in range(self.settings.steps):
            offset.requires_grad_(True)
            perturbed_states = self._student_states(batch, noise + offset)
            divergence = head_paired_sum(
                head, symmetric_kl, clean_states.detach(), perturbed_states
            )
            gradient = self._gradient(divergence, offset)
            offset = projected(
                offset.detach() + step_size * normalised(gradient, norm), epsilon, norm
            )
            offset = offset * mask
        perturbed_states = self._student_states(batch, noise + offset)
        smoothness = head_paired_sum(head, symmetric_kl, clean_states, perturbed_states)
        return clean | {"smoothness": smoothness}
