"""Distillation losses against float64 references, and chunked equal to unchunked."""

from __future__ import annotations

import pytest
import torch

from llama_tune.distillation import losses

LOSSES = ["forward_kl", "reverse_kl", "jsd", "tvd"]


def _reference(student: torch.Tensor, teacher: torch.Tensor, loss: str, t: float, beta: float):
    """The textbook formulas on probabilities, in float64."""
    p_s = torch.softmax(student.double() / t, dim=-1)
    p_t = torch.softmax(teacher.double() / t, dim=-1)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * (p.log() - q.log())).sum(-1)

    if loss == "forward_kl":
        value = kl(p_t, p_s)
    elif loss == "reverse_kl":
        value = kl(p_s, p_t)
    elif loss == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        value = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    else:
        value = 0.5 * (p_t - p_s).abs().sum(-1)
    return value * t**2


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(("temperature", "beta"), [(1.0, 0.5), (2.0, 0.1), (0.7, 0.9)])
def test_value_and_gradient_match_float64(loss: str, temperature: float, beta: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(6, 50, generator=generator)).requires_grad_()
    teacher = 3 * torch.randn(6, 50, generator=generator)
    value = losses.divergence(student, teacher, loss, temperature, beta)
    (gradient,) = torch.autograd.grad(value.sum(), student)

    student64 = student.detach().double().requires_grad_()
    expected = _reference(student64, teacher, loss, temperature, beta)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), student64)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_when_student_is_the_teacher(loss: str) -> None:
    logits = 4 * torch.randn(16, 49152, generator=torch.Generator().manual_seed(1))
    assert losses.divergence(logits, logits.clone(), loss, 2.0).abs().max() < 1e-6


@pytest.mark.parametrize("trained_head", [True, False], ids=["trained head", "frozen head"])
@pytest.mark.parametrize("loss", LOSSES)
def test_chunks_change_nothing_but_memory(loss: str, trained_head: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    student_head = torch.nn.Linear(16, 103, bias=False).requires_grad_(trained_head)
    teacher_head = torch.nn.Linear(24, 110, bias=False)
    teacher_calls: list[int] = []
    teacher_head.register_forward_hook(lambda *_: teacher_calls.append(1))
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(37, 24, generator=generator)
    trained = [hidden, student_head.weight] if trained_head else [hidden]
    results = []
    for chunk_size in (37, 5):
        teacher = losses.OnlineTeacher(teacher_hidden, teacher_head, 100)
        teacher_calls.clear()
        total = losses.chunked_distillation(
            hidden,
            student_head,
            teacher,
            loss,
            2.0,
            chunk_size=chunk_size,
            vocab_size=100,
        )
        gradients = torch.autograd.grad(total, trained)
        results.append((total, *gradients))
        # A frozen head's chunks are never recomputed: the teacher's head runs once each.
        chunks = -(-37 // chunk_size)
        assert len(teacher_calls) == (2 * chunks - 1 if trained_head else chunks)
    whole = losses.divergence(
        student_head(hidden)[:, :100], teacher_head(teacher_hidden)[:, :100], loss, 2.0
    ).sum()
    torch.testing.assert_close(results[0][0], whole)
    for unchunked, chunked in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(unchunked, chunked, rtol=1e-5, atol=1e-6)
    assert teacher_head.weight.grad is None


def test_token_subset_compares_renormalised_label_distributions() -> None:
    head = torch.nn.Identity()
    student = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    teacher = torch.tensor([[9.0, 1.0, 3.0, 0.0]])
    subset = torch.tensor([1, 3])
    online = losses.OnlineTeacher(teacher, head, token_subset=subset)
    total = losses.chunked_distillation(student, head, online, "forward_kl", token_subset=subset)
    expected = _reference(student[:, subset], teacher[:, subset], "forward_kl", 1.0, 0.5)
    torch.testing.assert_close(total.double(), expected.sum())
