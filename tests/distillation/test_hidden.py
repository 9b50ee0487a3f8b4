"""Hidden-state distillation: layer maps, distances, projections trained and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_tune import checkpoint, config, run_folder, train
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


def test_projected_hidden_distillation_resumes_exactly(
    tiny_recipe, tiny_model_dir: Path, make_tiny_llama, crash_during_save, same_weights
) -> None:
    # A 32-wide student: its hidden states need projecting into the teacher's 64.
    narrow_student = make_tiny_llama("narrow", width=32, layers=1, seed=1)
    overrides = [
        f"model.name={narrow_student}",
        f"distill.teacher.name={tiny_model_dir}",
        "distill.hidden_states.loss=cosine",
        "adapter=null",
    ]
    reference = tiny_recipe("hidden-reference", max_steps=6, checkpoint={"every": 2})
    expected = train.run(config.load(reference, overrides), reference)
    records = [json.loads(line) for line in (expected.run_dir / run_folder.METRICS).open()]
    hidden_losses = [record["hidden_loss"] for record in records if "hidden_loss" in record]
    assert len(hidden_losses) == 6
    assert hidden_losses[-1] < hidden_losses[0]

    crashing = tiny_recipe("hidden-crashing", max_steps=6, checkpoint={"every": 2})
    with crash_during_save("step-00000004"):
        train.run(config.load(crashing, overrides), crashing)
    saved = checkpoint.latest(config.run_dir(config.load(crashing, overrides), crashing))
    assert set(load_file(saved / checkpoint.EXTRA_WEIGHTS)) == {"hidden_match.projections.1.weight"}
    resumed = train.run(config.load(crashing, overrides), crashing, resume=True)
    same_weights(expected.weights_dir, resumed.weights_dir)
