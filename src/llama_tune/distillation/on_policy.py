"""On-policy distillation (GKD, Agarwal et al. 2024): train on what the student itself says.

With probability `distill.on_policy.probability` a step replaces the data's answers by
completions the student samples from the prompts, and the teacher's distribution is distilled on
those tokens. The student then learns to recover from its own mistakes, which answers written by
someone else never show it. Those steps have no task cross-entropy: the student's own tokens are
not targets. Which steps are on-policy depends only on the seed and the step, and sampling uses
the global RNG that checkpoints restore, so a resumed run repeats them exactly.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import data, inference
from llama_tune.schema import OnPolicyConfig


def is_on_policy_step(settings: OnPolicyConfig, seed: int, step: int) -> bool:
    """Whether optimizer step `step` (0-based) trains on the student's completions."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand((), generator=generator).item() < settings.probability


@torch.no_grad()
def student_examples(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[data.Example],
    settings: OnPolicyConfig,
    precision: str,
    synced: bool = False,
) -> list[data.Example]:
    """The examples with their answers replaced by the student's sampled completions;
    `synced`: the student's weights are spread over the processes, so each goes on taking
    forward steps until every process's completions are done."""
    prompts = [example.input_ids[: example.prompt_length] for example in examples]
    device = next(model.parameters()).device
    input_ids, attention_mask = inference.left_pad(prompts, tokenizer.pad_token_id, device)
    sampling = settings.temperature > 0
    was_training = model.training
    model.eval()
    with inference.autocast_for(model, precision):
        output = inference.eager_generate(
            model,
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            # Sample from the student's whole distribution: no top-k or nucleus cut.
            temperature=settings.temperature if sampling else None,
            top_k=0 if sampling else None,
            top_p=1.0 if sampling else None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced,
        )
    model.train(was_training)
    rewritten = []
    for example, prompt, row in zip(examples, prompts, output, strict=True):
        completion = row[input_ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in completion:
            completion = completion[: completion.index(tokenizer.eos_token_id) + 1]
        rewritten.append(
            data.Example(
                prompt=example.prompt,
                target=tokenizer.decode(completion, skip_special_tokens=True),
                input_ids=prompt + completion,
                prompt_length=len(prompt),
                row=example.row,
            )
        )
    return rewritten
