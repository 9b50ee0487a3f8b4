"""Compiled decoder layers (`model.compile`) train as the eager ones, packed or padded, and
leave generation eager."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from conftest import TEST_DATA, write_tiny_llama
from llama_tune import compiling, config, lora_fusion, models, run_folder, train

SUMMARIES = [
    f"data.source={TEST_DATA / 'summaries'}",
    "data.task=summarisation",
    "data.splits.train=validation",
    "evaluation.batch_size=2",
    "evaluation.max_new_tokens=5",
]


def _logged(run_dir: Path, key: str) -> list[float]:
    lines = (run_dir / run_folder.METRICS).read_text().splitlines()
    return [record[key] for record in map(json.loads, lines) if key in record]


def _eager_and_compiled(tiny_recipe, overrides: list[str], **sections: object) -> list[Path]:
    """Run folders of the same five steps, eager and then compiled (counted afresh)."""
    eager = tiny_recipe("eager", max_steps=5, lr=1e-2, **sections)
    eager_dir = train.run(config.load(eager, overrides), eager).run_dir
    torch._dynamo.reset()
    counters.clear()
    compiled = tiny_recipe("compiled", max_steps=5, lr=1e-2, **sections)
    compiled_overrides = [*overrides, "model.compile=true"]
    return [eager_dir, train.run(config.load(compiled, compiled_overrides), compiled).run_dir]


def test_compiled_layers_take_the_eager_packed_steps(tiny_recipe) -> None:
    # Rows of other lengths every step: one dynamic graph serves them all. The packed rows'
    # example bounds change every step too: traced, they would recompile the layer each time;
    # the packed attention operator keeps them out of the graph without breaking it.
    overrides = ["train.packing=true", "data.splits.validation=null"]
    eager_dir, compiled_dir = _eager_and_compiled(tiny_recipe, overrides)
    eager_losses, compiled_losses = _logged(eager_dir, "loss"), _logged(compiled_dir, "loss")
    assert len(compiled_losses) == 5
    assert compiled_losses[-1] < compiled_losses[0]
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=0)
    # Five steps made 2 graphs, none broken; with the attention eager between the compiled
    # pieces of each layer, 7 graphs and a break in every layer; traced, 15 graphs.
    assert not counters["graph_break"]
    assert 0 < counters["stats"]["unique_graphs"] <= 3


def test_compiled_layers_train_padded_rows_and_generate_eagerly(tiny_recipe) -> None:
    # Validation generates summaries: a compiled layer would recompile at every new token.
    validation = {"every": 2, "metric_rows": 5}
    eager_dir, compiled_dir = _eager_and_compiled(tiny_recipe, SUMMARIES, validation=validation)
    for key in ("loss", "eval_loss", "eval_rougeL"):
        torch.testing.assert_close(
            _logged(compiled_dir, key), _logged(eager_dir, key), rtol=1e-4, atol=0
        )
    # Training, eval loss and their backward made 3 graphs; generating compiled, 8 (torch's
    # limit of recompiles, after which it gave up with a warning).
    assert 0 < counters["stats"]["unique_graphs"] <= 4


def test_one_graph_serves_every_fused_layer(tmp_path: Path, tokenizer) -> None:
    # More layers than torch's limit of 8 recompiles: had each layer's fused LoRA modules a
    # forward of their own, every layer would compile anew and the last ones run eagerly.
    model = AutoModelForCausalLM.from_pretrained(write_tiny_llama(tmp_path, tokenizer, layers=10))
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert lora_fusion.fuse_lora_layers(adapted) == 70
    torch._dynamo.reset()
    counters.clear()
    compiling.compile_layers(models.causal_lm(adapted))
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    adapted(input_ids=ids, use_cache=False).logits.sum().backward()
    # The first layer's input needs no gradient, the others' do: two graphs for ten layers.
    assert counters["stats"]["unique_graphs"] <= 2
    assert all(
        param.grad is not None for name, param in adapted.named_parameters() if "lora_" in name
    )
