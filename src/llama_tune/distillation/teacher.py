"""The teacher's side of distillation: the frozen teacher model, and the positions of a batch
whose next-token distributions are distilled (online, and when building a cache)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from llama_tune import attention, data, packing
from llama_tune.schema import DistillConfig


class FrozenTeacher:
    """The teacher model, deliberately not an nn.Module attribute of the objective."""

    def __init__(self, model: PreTrainedModel, packed: bool = False) -> None:
        """`packed`: the teacher reads the training run's packed rows (`packing`)."""
        self.model = model.eval().requires_grad_(False)
        attention.use_training_attention(model, packed)

    @torch.no_grad()
    def outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        every_layer: bool = False,
    ) -> BaseModelOutputWithPast:
        """The decoder's output for padded (`attention_mask`) or packed (`position_ids`) rows:
        final hidden states, and every layer's with `every_layer`."""
        return self.model.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=every_layer,
            use_cache=False,
        )

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.outputs(input_ids, attention_mask).last_hidden_state

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()


def distilled_positions(
    labels: torch.Tensor,
    settings: DistillConfig,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[batch, seq - 1] mask of the positions whose next-token distribution is distilled, in
    padded rows (`attention_mask`) or packed ones (`position_ids`)."""
    targets = labels[:, 1:] != data.IGNORE_INDEX
    if settings.label_tokens_only:
        # Only the position that predicts an example's first target token, where the label is
        # chosen: the start of its one run of targets (an example's first token is no target,
        # so the runs of packed examples never join).
        return targets & ~torch.nn.functional.pad(targets[:, :-1], (1, 0))
    if settings.positions == "all":
        if position_ids is not None:
            return packing.continues_example(position_ids)
        if attention_mask is not None:
            return attention_mask[:, 1:].bool()
        return torch.ones_like(targets)
    return targets


def distilled_count(example: data.Example, settings: DistillConfig) -> int:
    """How many positions of one example `distilled_positions` selects."""
    if settings.label_tokens_only:
        return 1
    if settings.positions == "all":
        return len(example.input_ids) - 1
    return example.target_length
