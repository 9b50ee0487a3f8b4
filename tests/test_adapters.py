"""Starting from a trained adapter (`adapter.init_from`): from a run, a folder or the Hub cache,
and every mismatch with the recipe refused by name."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from llama_tune import adapters, config, train


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "eval_loss" in record]


@pytest.fixture
def finished_run(tiny_recipe) -> Path:
    """A short run whose adapter has moved well away from a fresh one."""
    path = tiny_recipe("first", max_steps=4, lr=5e-2)
    return train.run(config.load(path, []), path).run_dir


def test_a_run_continues_from_another_runs_weights(finished_run: Path, tiny_recipe) -> None:
    path = tiny_recipe("second", max_steps=1)
    second = train.run(config.load(path, [f"adapter.init_from={finished_run}"]), path)
    before = _evals(second.run_dir)[0]
    assert before["step"] == 0
    # The same validation rows, the same weights: the loss the first run ended with.
    assert before["eval_loss"] == pytest.approx(_evals(finished_run)[-1]["eval_loss"], abs=1e-5)
    fresh_path = tiny_recipe("fresh", max_steps=1)
    fresh = _evals(train.run(config.load(fresh_path, []), fresh_path).run_dir)
    assert abs(fresh[0]["eval_loss"] - before["eval_loss"]) > 1e-2, "the first run moved nothing"


def test_a_hub_id_is_read_through_the_hub_cache(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub path is the real one (snapshot_download): offline, it finds the cached copy."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--sentiment-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(finished_run / "adapter", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for reference in ("someone/sentiment-lora", "someone/sentiment-lora@main"):
        found = adapters.locate(reference, "adapter.init_from")
        assert found == repo / "snapshots" / commit
    with pytest.raises(adapters.AdapterError, match="cannot download the adapter someone/other"):
        adapters.locate("someone/other", "adapter.init_from")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapter.r=8"], "adapter.r is 8 but .* was trained with r 4; set adapter.r=4"),
        (["adapter.alpha=4"], "adapter.alpha is 4.0 but .* lora_alpha 8"),
        (["adapter.use_dora=true"], "adapter.use_dora is True but .* use_dora False"),
        (["adapter.layers=[1]"], r"adapter.layers is \[1\] but .* layers_to_transform None"),
        (
            ["adapter.target_modules=[q_proj]"],
            "has base_model.model.model.layers.0.mlp.down_proj.lora_A.weight and the other "
            r"does not \(adapter.target_modules or the base model differ\)",
        ),
    ],
)
def test_an_adapter_that_does_not_fit_the_recipe_is_named(
    finished_run: Path, tiny_recipe, cli_here, overrides: list[str], message: str
) -> None:
    path = tiny_recipe("misfit")
    err = cli_here("train", str(path), f"adapter.init_from={finished_run}", *overrides, expect=2)
    last = err.strip().splitlines()[-1]  # after the model loader's progress bar
    assert last.startswith("error: adapter.init_from: ")
    assert re.search(message, last), err


def test_what_is_not_a_safe_adapter_is_refused(
    finished_run: Path, tmp_path: Path, tiny_recipe
) -> None:
    full = tiny_recipe("full", max_steps=1)
    full_run = train.run(config.load(full, ["adapter=null"]), full).run_dir
    with pytest.raises(adapters.AdapterError, match="is a full fine-tuning run; it has no adapter"):
        adapters.locate(str(full_run), "adapter.init_from")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(finished_run / "adapter" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(adapters.AdapterError, match="reads adapters only as safetensors"):
        adapters.locate(str(pickled), "adapter.init_from")
    with pytest.raises(adapters.AdapterError, match="nowhere not found"):
        adapters.locate("./nowhere", "adapter.init_from")
