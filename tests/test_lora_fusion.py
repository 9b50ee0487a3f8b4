"""The fused LoRA layer computes what peft computes: outputs and every gradient."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llama_tune import lora_fusion
from llama_tune.lora_fusion import _LoraProduct


def test_gradients_match_finite_differences() -> None:
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator, dtype=torch.float64)
        return values.requires_grad_()

    inputs = (tensor(2, 3, 5), tensor(4, 5), tensor(4), tensor(2, 5), tensor(4, 2), 1.5)
    assert torch.autograd.gradcheck(_LoraProduct.apply, inputs)


def _adapted(model_dir: Path, **settings: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **settings)
    adapted = get_peft_model(model, config)
    # peft starts B at zero; a trained adapter has both factors, and so must the comparison.
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return adapted


def _loss_and_gradients(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), trained


def test_fused_model_matches_peft(tiny_model_dir: Path) -> None:
    peft_model = _adapted(tiny_model_dir)
    fused_model = copy.deepcopy(peft_model)
    layers = sum(isinstance(m, lora_fusion.LoraLinear) for m in fused_model.modules())
    assert lora_fusion.fuse_lora_layers(fused_model) == layers > 0
    assert lora_fusion.fuse_lora_layers(fused_model) == 0
    ids = torch.randint(0, peft_model.config.vocab_size, (2, 12), generator=torch.Generator())

    expected_loss, expected = _loss_and_gradients(peft_model, ids)
    loss, gradients = _loss_and_gradients(fused_model, ids)

    assert loss == pytest.approx(expected_loss, abs=1e-6)
    assert gradients.keys() == expected.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_keeps_fp32_adapter_gradients(tiny_model_dir: Path) -> None:
    peft_model = _adapted(tiny_model_dir)
    peft_model.base_model.model.to(torch.bfloat16)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    fused_model = copy.deepcopy(peft_model)
    lora_fusion.fuse_lora_layers(fused_model)
    ids = torch.randint(0, peft_model.config.vocab_size, (2, 12), generator=torch.Generator())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected = _loss_and_gradients(peft_model, ids)
        loss, gradients = _loss_and_gradients(fused_model, ids)

    # bf16 rounds peft's separate scale and sum, which the fused product accumulates in fp32.
    assert loss == pytest.approx(expected_loss, rel=2e-2)
    for name, gradient in gradients.items():
        assert gradient.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(
            gradient.flatten(), expected[name].flatten(), dim=0
        )
        assert cosine > 0.99, name


def test_what_is_not_plain_lora_runs_peft(tiny_model_dir: Path) -> None:
    """Dropout in training, a disabled adapter, a merged one and DoRA take peft's own forward,
    with its results."""
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator())
    with_dropout = _adapted(tiny_model_dir, lora_dropout=0.5)
    lora_fusion.fuse_lora_layers(with_dropout)
    torch.manual_seed(3)
    dropped = with_dropout(input_ids=ids).logits
    with_dropout.eval()
    kept = with_dropout(input_ids=ids).logits
    assert not torch.allclose(dropped, kept)

    model = _adapted(tiny_model_dir)
    expected = model(input_ids=ids).logits
    lora_fusion.fuse_lora_layers(model)
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    assert not torch.allclose(base, expected)
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)

    dora = _adapted(tiny_model_dir, use_dora=True)
    expected = dora(input_ids=ids).logits
    lora_fusion.fuse_lora_layers(dora)
    torch.testing.assert_close(dora(input_ids=ids).logits, expected)
