"""The target-token loss applies the head a chunk of positions at a time and gives the loss and
gradients of whole logits (`objective.target_cross_entropy`)."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_tune import attention, data, objective
from llama_tune.schema import DataConfig, SplitsConfig


@pytest.fixture(scope="module")
def alpaca_row(data_root: Path, tokenizer) -> dict[str, torch.Tensor]:
    """Six alpaca examples packed into one row: a few hundred answer tokens."""
    config = DataConfig(
        source=str(data_root / "instruction" / "alpaca_en_demo"),
        task="instruction",
        max_train_rows=6,
        splits=SplitsConfig(validation=None, test=None),
    )
    return data.collate_packed(data.build(config, tokenizer).train.examples)


def _whole_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=data.IGNORE_INDEX, reduction="sum"
    )


def _loss_and_gradients(
    model: torch.nn.Module, loss_of: objective.Objective | None, batch: dict[str, torch.Tensor]
) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """The summed loss, its gradient with respect to the input embeddings taken inside the
    step (as adversarial training does, keeping the graph), and the trained parameters'
    gradients of a backward of twice the loss."""
    model.zero_grad()
    embedding = model.get_input_embeddings()
    offset = torch.zeros((*batch["input_ids"].shape, embedding.embedding_dim), requires_grad=True)
    handle = embedding.register_forward_hook(lambda _m, _i, output: output + offset)
    try:
        loss = _whole_logits_loss(model, batch) if loss_of is None else loss_of(**batch)["ce"]
    finally:
        handle.remove()
    (input_gradient,) = torch.autograd.grad(loss, offset, retain_graph=True)
    (loss * 2).backward()
    trained = {
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    return loss.item(), input_gradient, trained


@pytest.mark.parametrize("adapted", [True, False], ids=["lora, frozen head", "full, trained head"])
def test_chunks_of_the_head_give_the_loss_and_gradients_of_whole_logits(
    tiny_model_dir: Path, alpaca_row, monkeypatch: pytest.MonkeyPatch, adapted: bool
) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    attention.use_training_attention(model, packed=True)
    if adapted:
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(model, config)
    head = model.get_output_embeddings()
    assert any(parameter.requires_grad for parameter in head.parameters()) is not adapted
    targets = int((alpaca_row["labels"] != data.IGNORE_INDEX).sum())
    monkeypatch.setattr(objective, "HEAD_CHUNK", 64)
    assert targets > 3 * objective.HEAD_CHUNK
    whole = _loss_and_gradients(model, None, alpaca_row)
    chunked = _loss_and_gradients(model, objective.TargetTokenLoss(model), alpaca_row)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-6)
    assert whole[2]
    assert whole[2].keys() == chunked[2].keys()
    for name, gradient in [("input embeddings", whole[1]), *whole[2].items()]:
        found = chunked[1] if name == "input embeddings" else chunked[2][name]
        # Another order of fp32 additions: differences of a few 1e-8 of the largest entry.
        largest = float(gradient.abs().max())
        torch.testing.assert_close(found, gradient, rtol=1e-4, atol=1e-6 * largest, msg=name)


def test_a_few_positions_of_an_fp32_head_under_autocast_run_in_fp32() -> None:
    """On a CPU, autocast would cast the head's whole weight for a handful of answer positions:
    up to FP32_HEAD_POSITIONS they take the fp32 product, gradient included; more positions
    and half-precision heads keep autocast's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300, bias=False)
    few = torch.randn(2, objective.FP32_HEAD_POSITIONS // 2, 32, requires_grad=True)
    many = torch.randn(objective.FP32_HEAD_POSITIONS + 1, 32)
    expected = head(few)
    (expected_gradient,) = torch.autograd.grad(expected.square().sum(), head.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = objective.head_logits(head, few)
        assert objective.head_logits(head, many).dtype == torch.bfloat16
        half_head = torch.nn.Linear(32, 300, bias=False, dtype=torch.bfloat16)
        assert objective.head_logits(half_head, few).dtype == torch.bfloat16
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected)
    (gradient,) = torch.autograd.grad(logits.square().sum(), head.weight)
    assert gradient.dtype == torch.float32
    torch.testing.assert_close(gradient, expected_gradient)


def test_scoring_losses_come_per_target_token_in_chunks(
    tiny_model_dir: Path, alpaca_row, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HotFlip scores whole batches of long rows: per-token losses of chunks of the head equal
    # those of whole logits, position for position.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    monkeypatch.setattr(objective, "HEAD_CHUNK", 64)
    with torch.no_grad():
        output = model(**alpaca_row, use_cache=False, output_hidden_states=True)
        states = output.hidden_states[-1][:, :-1]
        losses, selected = objective.target_token_losses(
            model.get_output_embeddings(), states, alpaca_row["labels"]
        )
        targets = alpaca_row["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(
            output.logits[:, :-1].float().transpose(1, 2),
            targets,
            reduction="none",
            ignore_index=data.IGNORE_INDEX,
        )
    assert torch.equal(selected, targets != data.IGNORE_INDEX)
    assert len(losses) > 3 * objective.HEAD_CHUNK
    torch.testing.assert_close(losses, expected[selected])


class _CountedHead(torch.nn.Linear):
    """An output head that counts its calls, forward and backward, as ZeRO-3's hooks see them."""

    def __init__(self, trained: bool) -> None:
        super().__init__(8, 16, bias=False)
        self.weight.requires_grad_(trained)
        self.calls: list[str] = []
        self.register_forward_pre_hook(lambda *_: self.calls.append("forward"))
        self.register_full_backward_pre_hook(lambda *_: self.calls.append("backward"))


def _head_sum(head: _CountedHead, states: torch.Tensor, paired: bool) -> torch.Tensor:
    """A loss over `states` in chunks of 4 positions: one side, or paired with other states."""
    if paired:
        squared = lambda first, second: (first - second).pow(2).sum()  # noqa: E731
        return objective.head_paired_sum(head, squared, states, states.flip(0) * 2, 4)
    return objective.head_chunked_sum(head, lambda chunk, *_: head(chunk).pow(2).sum(), states, 4)


@pytest.mark.parametrize("trained", [False, True], ids=["frozen head", "trained head"])
@pytest.mark.parametrize("paired", [False, True], ids=["one side", "paired"])
def test_agreed_head_calls_add_fillers_that_change_nothing(trained: bool, paired: bool) -> None:
    # Three processes of a ZeRO-3 run holding 3 chunks of positions, 1 and none: each calls the
    # head as the busiest does, forward and backward, and the fillers add no loss or gradient.
    # The gradient for the states' source alone (SMART's ascent), then for everything.
    torch.manual_seed(0)
    calls = []
    for positions in (12, 1, 0):
        head = _CountedHead(trained)
        source = torch.randn(positions, 8, requires_grad=True)
        results = []
        for agreed in (False, True):
            if agreed:
                setattr(head, objective.AGREED_CALLS, lambda count: max(count, 3))
            head.calls.clear()
            loss = _head_sum(head, source * 2, paired)
            if loss.requires_grad:
                (ascent,) = torch.autograd.grad(loss, source, retain_graph=True)
                loss.backward()
                torch.testing.assert_close(ascent, source.grad)
            gradients = [source.grad, head.weight.grad]
            source.grad, head.weight.grad = None, None
            results.append((loss.item(), gradients))
        (loss, gradients), (agreed_loss, agreed_gradients) = results
        assert agreed_loss == loss
        for gradient, agreed_gradient in zip(gradients, agreed_gradients, strict=True):
            if gradient is not None:
                torch.testing.assert_close(agreed_gradient, gradient, rtol=0, atol=0)
        calls.append(head.calls)
    assert calls[0] == calls[1] == calls[2]
    # A trained head's chunks run again in each of the two backwards.
    assert calls[0].count("forward") == 3 * (2 if paired else 1) * (3 if trained else 1)
