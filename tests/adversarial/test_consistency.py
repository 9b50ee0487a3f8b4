"""The consistency term: pairs, the divergence it sums, which side it trains, its counts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_tune import attention, data
from llama_tune.adversarial import consistency
from llama_tune.objective import TargetTokenLoss


def test_each_copy_is_paired_with_its_clean_example() -> None:
    rows = consistency.clean_rows([4, 9, 2, 9, 4])
    assert rows.tolist() == [-1, -1, -1, 1, 0]


def _paired_batch(tokenizer) -> tuple[list[data.Example], list[int]]:
    """Two clean examples, a copy of the first with two prompt tokens changed, and an unchanged
    copy of the second; targets of different lengths."""
    eos = tokenizer.eos_token_id
    first = data.Example("p", "t", [5, 6, 7, 8, 9, 10, eos], 4, 0)
    second = data.Example("p", "t", [11, 12, 13, eos], 3, 1)
    changed = replace(first, input_ids=[5, 60, 70, 8, 9, 10, eos], perturbation="gradient")
    same = replace(second, perturbation="char")
    return [first, second, changed, same], [0, 1, 0, 1]


def test_the_term_is_the_divergence_from_the_clean_answer(tiny_model_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    objective = consistency.ConsistencyObjective(TargetTokenLoss(model), 2.0).train()
    assert objective.weights == {"ce": 1.0, "consistency": 2.0}
    examples, indices = _paired_batch(tokenizer)
    assert [objective.counts(example)["consistency"] for example in examples] == [0, 0, 3, 1]
    batch = data.collate(examples, tokenizer.pad_token_id, 8)
    embedded: list[torch.Tensor] = []

    def keep_embeddings(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        # A leaf in place of the embeddings, so their gradient can be read per row.
        embedded.append(output.detach().requires_grad_(torch.is_grad_enabled()))
        return embedded[-1]

    model.get_input_embeddings().register_forward_hook(keep_embeddings)
    sums = objective(**batch, **objective.extra_inputs(indices))
    assert set(sums) == {"ce", "consistency"}

    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.float()
    predicting = batch["labels"][:, 1:] != data.IGNORE_INDEX
    per_row = [torch.log_softmax(logits[row, :-1][predicting[row]], -1) for row in range(4)]
    # The unchanged copy answers as its clean example: it adds nothing.
    expected = (per_row[0].exp() * (per_row[0] - per_row[2])).sum()
    assert expected > 0
    torch.testing.assert_close(sums["consistency"].detach(), expected)

    # Only the perturbed side learns: no gradient reaches the clean example's input.
    sums["consistency"].backward()
    gradient = embedded[0].grad
    assert gradient[0].abs().sum() == 0
    assert gradient[2].abs().sum() > 0

    # Evaluation batches are not paired: no term.
    assert set(objective.eval()(**batch)) == {"ce"}


def test_a_packed_row_gives_the_padded_term(tiny_model_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    attention.use_training_attention(model, packed=True)
    objective = consistency.ConsistencyObjective(TargetTokenLoss(model), 2.0).train()
    examples, indices = _paired_batch(tokenizer)
    paired = objective.extra_inputs(indices)
    expected = objective(**data.collate(examples, tokenizer.pad_token_id, 8), **paired)
    actual = objective(**data.collate_packed(examples), **paired)
    assert expected["consistency"] > 0
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trained_head", [True, False], ids=["trained head", "frozen head"])
def test_the_term_in_chunks_equals_it_whole_and_leaves_the_clean_side_alone(
    trained_head: bool,
) -> None:
    # Three pairs of positions, one pair at a time: the term and the gradients of the perturbed
    # states (and a trained head) are those of the whole; the clean states get none, and
    # neither does the head through them.
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(trained_head)
    states = torch.randn(7, 8, requires_grad=True)
    per_row, pairs = torch.tensor([3, 1, 3]), torch.tensor([-1, -1, 0])
    clean = torch.log_softmax(head(states[0:3]).detach(), -1)
    perturbed = torch.log_softmax(head(states[4:7]), -1)
    expected = (clean.exp() * (clean - perturbed)).sum()
    trained = [states, head.weight] if trained_head else [states]
    expected_gradients = torch.autograd.grad(expected, trained)
    for chunk_size in (256, 1):
        states.grad, head.weight.grad = None, None
        value = consistency.paired_divergence(head, states, per_row, pairs, chunk_size)
        value.backward()
        torch.testing.assert_close(value.detach(), expected.detach())
        torch.testing.assert_close(states.grad, expected_gradients[0])
        assert states.grad[:4].abs().sum() == 0
        assert states.grad[4:].abs().sum() > 0
        if trained_head:
            torch.testing.assert_close(head.weight.grad, expected_gradients[1])
        else:
            assert head.weight.grad is None
