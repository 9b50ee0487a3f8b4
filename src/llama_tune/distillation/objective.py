"""The student's training objective: task cross-entropy plus distillation from the teacher.

The teacher is held outside the module tree, so Accelerate never wraps it for gradients (no DDP
buckets, no optimizer state) and it stays in eval mode under no_grad in its own dtype. Both terms
come back as sums over their positions; the trainer divides each by its count for the whole
step, so any split of a step into micro-batches gives the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import data, models
from llama_tune.distillation import on_policy
from llama_tune.distillation.cache import CachedTeacher
from llama_tune.distillation.hidden import HiddenStateMatch
from llama_tune.distillation.losses import OnlineTeacher, TopKTeacher, chunked_distillation
from llama_tune.distillation.teacher import FrozenTeacher, distilled_count, distilled_positions
from llama_tune.objective import ModelCalls, target_cross_entropy
from llama_tune.schema import DistillConfig


@dataclass(frozen=True)
class Sampling:
    """What on-policy steps need to let the student generate."""

    tokenizer: PreTrainedTokenizerBase
    precision: str
    seed: int


class DistillationObjective(torch.nn.Module):
    """Summed task cross-entropy and summed distillation loss of a micro-batch.

    The teacher's side comes from `teacher` (online) or from the cached tensors the trainer adds
    to each batch (`extra_inputs`). Without either (scoring the validation split of a cached
    run), only the cross-entropy is returned.
    """

    def __init__(
        self,
        model: PeftModel | PreTrainedModel,
        teacher: FrozenTeacher | None,
        settings: DistillConfig,
        vocab_size: int,
        token_subset: torch.Tensor | None = None,
        cached: CachedTeacher | None = None,
        hidden_match: HiddenStateMatch | None = None,
        sampling: Sampling | None = None,
        clean_examples: list[data.Example] | None = None,
    ) -> None:
        """`clean_examples` (the training split) make an online teacher read each example's
        clean text while the student reads its adversarial version (robust distillation)."""
        super().__init__()
        self.clean_examples = clean_examples
        self.sampling = sampling
        self.model = model
        self.teacher = teacher
        self.settings = settings
        self.vocab_size = vocab_size
        self.token_subset = token_subset
        self.cached = cached
        # A module attribute: its projections (if any) train with the student.
        self.hidden_match = hidden_match
        # The objective contract (objective.Objective): term weights and counts.
        self.weights = {"ce": 1.0 - settings.alpha, "distill": settings.alpha}
        self.reference_terms = frozenset({"ce"})
        if settings.hidden_states is not None:
            self.weights["hidden"] = settings.hidden_states.weight

    def counts(self, example: data.Example) -> dict[str, int]:
        positions = distilled_count(example, self.settings)
        counts = {"ce": example.target_length, "distill": positions}
        if self.hidden_match is not None:
            counts["hidden"] = positions
        return counts

    def rewrite_step(
        self, step: int, batches: list[list[data.Example]], calls: ModelCalls
    ) -> list[list[data.Example]] | None:
        """On an on-policy step, the batches with the student's own completions as answers."""
        settings = self.settings.on_policy
        if settings is None or self.sampling is None:
            return None
        if not on_policy.is_on_policy_step(settings, self.sampling.seed, step):
            return None
        tokenizer, precision = self.sampling.tokenizer, self.sampling.precision
        with calls.whole():
            return [
                on_policy.student_examples(
                    self.model, tokenizer, batch, settings, precision, calls.synced
                )
                for batch in batches
            ]

    def extra_inputs(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """What the teacher's side needs of these training examples: their cached tensors, or
        in robust distillation their clean versions; nothing otherwise."""
        if self.cached is not None:
            return self.cached.batch(indices)
        if self.clean_examples is None or self.sampling is None:
            return {}
        clean = [self.clean_examples[index] for index in indices]
        batch = data.collate(clean, self.sampling.tokenizer.pad_token_id, 1)
        return {f"teacher_{name}": value for name, value in batch.items()}

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        teacher_ids: torch.Tensor | None = None,
        teacher_log_probs: torch.Tensor | None = None,
        teacher_rest: torch.Tensor | None = None,
        teacher_input_ids: torch.Tensor | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
        teacher_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Padded rows come with `attention_mask`, packed ones with `position_ids`; the
        teacher reads the same rows, or `teacher_*` (its clean versions, padded)."""
        base = models.causal_lm(self.model)
        head = base.get_output_embeddings()
        every_layer = self.hidden_match is not None and self.teacher is not None
        hidden = base.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=every_layer,
            use_cache=False,
        )
        student_states = hidden.last_hidden_state[:, :-1]
        cross_entropy = target_cross_entropy(head, student_states, labels)

        distilled = distilled_positions(labels, self.settings, attention_mask, position_ids)
        subset = self.token_subset
        if subset is not None:
            subset = subset.to(input_ids.device)
        if teacher_ids is not None:
            assert self.cached is not None
            assert teacher_log_probs is not None
            assert teacher_rest is not None
            side = TopKTeacher(teacher_ids, teacher_log_probs, teacher_rest, self.cached.has_rest)
        elif self.teacher is not None:
            teacher_distilled = distilled
            if teacher_input_ids is not None:
                # Robust distillation: the teacher reads the clean example. Its target tokens
                # are the student's, so the distilled positions pair up in order.
                assert teacher_attention_mask is not None
                assert teacher_labels is not None
                input_ids, attention_mask = teacher_input_ids, teacher_attention_mask
                position_ids = None
                teacher_distilled = distilled_positions(
                    teacher_labels, self.settings, attention_mask
                )
            teacher_output = self.teacher.outputs(
                input_ids, attention_mask, position_ids, every_layer
            )
            teacher_states = teacher_output.last_hidden_state[:, :-1]
            side = OnlineTeacher(
                teacher_states[teacher_distilled], self.teacher.head, self.vocab_size, subset
            )
        else:
            return {"ce": cross_entropy}
        sums = {"ce": cross_entropy}
        if every_layer:
            # The same positions as the logits: hidden states at the positions that predict.
            shifted = torch.nn.functional.pad(distilled, (0, 1))
            sums["hidden"] = self.hidden_match(
                hidden.hidden_states, teacher_output.hidden_states, shifted
            )
        distillation = chunked_distillation(
            student_states[distilled],
            head,
            side,
            self.settings.loss,
            self.settings.temperature,
            self.settings.beta,
            self.settings.chunk_size,
            self.vocab_size,
            subset,
        )
        return sums | {"distill": distillation}
