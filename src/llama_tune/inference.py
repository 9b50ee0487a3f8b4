"""Batched inference for scoring and training: left padding, autocast, label log-probabilities
and generation.

Classification never generates: every label string is scored as a continuation of the prompt
(one forward over the prompts, then one per chunk of labels reusing the prompts' KV cache).
Summarisation and translation decode greedily or with beam search from left-padded prompts.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import models
from llama_tune.schema import EvaluationConfig

# Prompts are left-padded to a multiple of this: a new input shape rebuilds kernels (bf16 on
# CPUs), so few distinct shapes is faster than the least padding.
LENGTH_BUCKET = 16


def left_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (so generation continues each one), with their mask."""
    longest = max(len(sequence) for sequence in sequences)
    width = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def label_token_ids(
    tokenizer: PreTrainedTokenizerBase, labels: list[str], in_chat: bool
) -> list[list[int]]:
    """Token ids of each label as the target would start: a space first in plain templates,
    none as a chat template's answer (`in_chat`)."""
    prefix = "" if in_chat else " "
    return [tokenizer(prefix + label, add_special_tokens=False)["input_ids"] for label in labels]


def _decoder_and_head(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = models.causal_lm(model)
    return base.get_decoder(), base.get_output_embeddings()


def _head_logprobs(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # The head gets a contiguous 2-D input: a strided 3-D slice makes torch.matmul expand the
    # 49,152-wide weight per row (measured: 2.5x slower scoring on the CPU).
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    logprobs = torch.log_softmax(head(flat).float(), dim=-1)
    return logprobs.view(*hidden.shape[:-1], -1)


LABEL_ROW_TOKENS = 16_384
"""Cached prompt tokens the label continuations hold at once: each (prompt, label) row has its
own copy of its prompt's KV cache, so the labels run a chunk at a time (a copy of 16k tokens
is 2 GiB for Llama-3-8B in bf16; all of banking77's 77 labels after 16 prompts of 512 tokens
at once would be 77 GiB)."""


@torch.no_grad()
def label_logprobs(
    model: PreTrainedModel,
    prompts: list[list[int]],
    label_ids: list[list[int]],
    pad_id: int,
) -> torch.Tensor:
    """[prompts, labels] summed log-probabilities of each label continuing each prompt.

    The prompts run once; the labels' later tokens run against the prompts' KV cache, repeated
    for each of a chunk of labels (`LABEL_ROW_TOKENS`), so a prompt is never recomputed for
    each label. The output head runs only where a label token is predicted.
    """
    decoder, head = _decoder_and_head(model)
    device = head.weight.device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    longest = max(len(ids) for ids in label_ids)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=longest > 1,
    )
    first = _head_logprobs(head, out.last_hidden_state[:, -1])
    first_ids = torch.tensor([ids[0] for ids in label_ids], device=device)
    scores = first[:, first_ids]
    if longest == 1:
        return scores
    per_chunk = max(1, LABEL_ROW_TOKENS // input_ids.numel())
    chunks = [label_ids[start : start + per_chunk] for start in range(0, len(label_ids), per_chunk)]
    later = [
        _later_tokens(
            decoder,
            head,
            out.cache if len(chunks) == 1 else copy.deepcopy(out.cache),
            attention_mask,
            chunk,
            pad_id,
        )
        for chunk in chunks
    ]
    return scores + torch.cat(later, dim=1)


def _later_tokens(
    decoder: torch.nn.Module,
    head: torch.nn.Module,
    cache: Any,
    attention_mask: torch.Tensor,
    label_ids: list[list[int]],
    pad_id: int,
) -> torch.Tensor:
    """[prompts, labels] summed log-probabilities of the labels' tokens after their first,
    run against the prompts' KV `cache` (which this extends)."""
    device, prompts, count = attention_mask.device, attention_mask.shape[0], len(label_ids)
    longest = max(len(ids) for ids in label_ids)
    if longest == 1:
        return torch.zeros(prompts, count, device=device)
    cache.batch_repeat_interleave(count)
    # Row (prompt p, label j) feeds label j's tokens but the last, to predict tokens 1.. of it.
    feed = torch.full((count, longest - 1), pad_id, dtype=torch.long)
    wanted = torch.full((count, longest - 1), -1, dtype=torch.long)
    for j, ids in enumerate(label_ids):
        feed[j, : len(ids) - 1] = torch.tensor(ids[:-1])
        wanted[j, : len(ids) - 1] = torch.tensor(ids[1:])
    feed = feed.to(device).repeat(prompts, 1)
    wanted = wanted.to(device).repeat(prompts, 1)
    prompt_mask = attention_mask.repeat_interleave(count, dim=0)
    full_mask = torch.cat([prompt_mask, (wanted >= 0).long()], dim=1)
    start = attention_mask.sum(-1).repeat_interleave(count).unsqueeze(1)
    hidden = decoder(
        input_ids=feed,
        attention_mask=full_mask,
        position_ids=start + torch.arange(longest - 1, device=device),
        cache=cache,
        use_cache=True,
    ).last_hidden_state
    predicting = wanted >= 0
    logits = head(hidden[predicting]).float()
    picked = logits.gather(-1, wanted[predicting].unsqueeze(-1)).squeeze(-1)
    picked = picked - logits.logsumexp(dim=-1)
    summed = torch.zeros(wanted.shape, device=device).masked_scatter(predicting, picked)
    return summed.sum(-1).view(prompts, count)


def eager_generate(model: PreTrainedModel, **settings: Any) -> torch.Tensor:
    """`model.generate`, with decoder layers compiled for training (`model.compile`) run
    eagerly: every new token's longer cache would recompile them until torch gave up."""
    with torch.compiler.set_stance("force_eager"):
        return model.generate(**settings)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    settings: EvaluationConfig,
    stop_strings: list[str],
    synced: bool = False,
) -> list[str]:
    """Greedy or beam-search completions of left-padded prompts, cut where an answer ends: the
    end-of-sequence token or the first of `stop_strings` (a plain template's line end, a chat
    template's end of turn). `synced`: the model's weights are spread over the processes, so
    each goes on taking forward steps until every process's batch is done."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    output = eager_generate(
        model,
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=settings.max_new_tokens,
        num_beams=settings.num_beams,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=stop_strings or None,
        tokenizer=tokenizer,
        synced_gpus=synced,
    )
    texts = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [cut_at_stops(text, stop_strings) for text in texts]


def cut_at_stops(text: str, stop_strings: list[str]) -> str:
    """A generated text up to its first stop string (a row of a batch, or a beam, may run past
    it while others go on), without surrounding whitespace. A whitespace stop (a plain
    template's line end) counts only after the answer has started."""
    for stop in stop_strings:
        text = text.split(stop, 1)[0] if stop.strip() else text.strip().split(stop, 1)[0]
    return text.strip()


def autocast_for(model: PreTrainedModel, precision: str) -> contextlib.AbstractContextManager:
    device_type = next(model.parameters()).device.type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()
