"""Hidden-state distillation: layer maps, distances, projections trained and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama_tune import checkpoint, config, train
from llama_tune.distillation import hidden


def test_layer_maps() -> None:
    assert hidden.layer_map(15, 30, kept=list(range(0, 30, 2))) == {
        index + 1: 2 * index + 1 for index in range(15)
    }
    assert hidden.layer_map(3, 30) == {1: 10, 2: 20, 3: 30}
    assert hidden.layer_map(2, 4, explicit={2: 4}) == {2: 4}
    with pytest.raises(hidden.LayerMapError, match=r"3->1 outside the student's 0..2"):
        hidden.layer_map(2, 4, explicit={3: 1})


def test_distances_vanish_on_equal_states_and_projections_learn() -> None:
    states = tuple(torch.randn(2, 5, 8) for _ in range(3))
    positions = torch.ones(2, 5, dtype=torch.bool)
    for loss in ("mse", "cosine"):
        same = hidden.HiddenStateMatch({1: 1, 2: 2}, 8, 8, loss)
        assert same(states, states, positions).item() < 1e-5
        assert not list(same.parameters())
    narrow = tuple(torch.randn(2, 5, 4) for _ in range(3))
    projected = hidden.HiddenStateMatch({2: 1}, 4, 8, "mse")
    value = projected(narrow, states, positions)
    value.backward()
    assert projected.projections["2"].weight.grad.abs().sum() > 0


@pytest.fixture
def narrow_student(tmp_path: Path, tokenizer) -> Path:
    """A 32-wide student sharing the tiny teacher's tokenizer: hidden states need projecting."""
    folder = tmp_path / "narrow"
    narrow = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(narrow).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_projected_hidden_distillation_resumes_exactly(
    tiny_recipe, tiny_model_dir: Path, narrow_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [
        f"model.name={narrow_student}",
        f"distill.teacher.name={tiny_model_dir}",
        "distill.hidden_states.loss=cosine",
        "adapter=null",
    ]
    reference = tiny_recipe("hidden-reference", max_steps=6, save_steps=2)
    expected = train.run(config.load(reference, overrides), reference)
    records = [json.loads(line) for line in (expected.run_dir / train.METRICS).open()]
    hidden_losses = [record["hidden_loss"] for record in records if "hidden_loss" in record]
    assert len(hidden_losses) == 6
    assert hidden_losses[-1] < hidden_losses[0]

    crashing = tiny_recipe("hidden-crashing", max_steps=6, save_steps=2)
    real_save = torch.save

    def failing_save(obj: object, path: Path, *args: object, **kwargs: object) -> None:
        if "step-00000004" in str(path):
            raise OSError("disk full (injected)")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        train.run(config.load(crashing, overrides), crashing)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    saved = checkpoint.latest(config.run_dir(config.load(crashing, overrides), crashing))
    assert set(load_file(saved / checkpoint.EXTRA_WEIGHTS)) == {"hidden_match.projections.1.weight"}
    resumed = train.run(config.load(crashing, overrides), crashing, resume=True)
    first = load_file(expected.weights_dir / "model.safetensors")
    second = load_file(resumed.weights_dir / "model.safetensors")
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-6)
