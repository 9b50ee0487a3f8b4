"""The teacher's side of distillation: the frozen teacher model, and the positions of a batch
whose next-token distributions are distilled (online, and when building a cache)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from llama_tune import data
from llama_tune.schema import DistillConfig


class FrozenTeacher:
    """The teacher model, deliberately not an nn.Module attribute of the objective."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def outputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, every_layer: bool = False
    ) -> BaseModelOutputWithPast:
        """The decoder's output: final hidden states, and every layer's with `every_layer`."""
        return self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=every_layer
        )

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.outputs(input_ids, attention_mask).last_hidden_state

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()


def distilled_positions(
    labels: torch.Tensor, attention_mask: torch.Tensor, settings: DistillConfig
) -> torch.Tensor:
    """[batch, seq - 1] mask of the positions whose next-token distribution is distilled."""
    targets = labels[:, 1:] != data.IGNORE_INDEX
    if settings.label_tokens_only:
        # Only the position that predicts the first target token: where the label is chosen.
        return targets & (targets.long().cumsum(dim=1) == 1)
    if settings.positions == "all":
        return attention_mask[:, 1:].bool()
    return targets


def distilled_count(example: data.Example, settings: DistillConfig) -> int:
    """How many positions of one example `distilled_positions` selects."""
    if settings.label_tokens_only:
        return 1
    if settings.positions == "all":
        return len(example.input_ids) - 1
    return example.target_length
