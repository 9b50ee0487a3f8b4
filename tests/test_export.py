"""`llama-tune export`: merged folders load alone and compute what the adapter did; GGUF files
load back through transformers' own GGUF reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from llama_tune import config, export, gguf_file, models, train
from llama_tune.schema import ModelConfig


def _first_rows(path: Path, count: int) -> list[dict]:
    with path.open() as lines:
        return [json.loads(next(lines)) for _ in range(count)]


def _real_texts(data_root: Path) -> list[str]:
    """Two SST-2 sentences and two AESLC e-mail openings from the shared datasets."""
    sentences = _first_rows(data_root / "classification/sst2/validation.jsonl", 2)
    emails = _first_rows(data_root / "summarisation/aeslc/validation.jsonl", 2)
    return [row["text"] for row in sentences] + [row["document"][:300] for row in emails]


def _logits(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def _trained(tiny_recipe, name: str, *overrides: str) -> Path:
    """A short run with a high learning rate, so its adapter moves the logits."""
    path = tiny_recipe(name, max_steps=4, lr=5e-2)
    return train.run(config.load(path, list(overrides)), path).run_dir


def _adapter_on_base(run_dir: Path, base: ModelConfig) -> PeftModel:
    return PeftModel.from_pretrained(models.load_base_model(base), run_dir / "adapter").eval()


def test_a_merged_adapter_and_its_gguf_compute_the_adapter_model(
    tiny_recipe, tiny_model_dir: Path, data_root: Path, cli_here, tmp_path: Path
) -> None:
    run_dir = _trained(tiny_recipe, "lora")
    out = tmp_path / "exported"
    cli_here("export", str(run_dir), str(out), "--gguf", "f32")
    texts = _real_texts(data_root)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tuned = _adapter_on_base(run_dir, ModelConfig(name=str(tiny_model_dir), dtype="float32"))
    expected = _logits(tuned, tokenizer, texts)
    with tuned.disable_adapter():
        base_logits = _logits(tuned, tokenizer, texts)
    assert (expected - base_logits).abs().max() > 1e-2, "the adapter should change the logits"
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(merged, tokenizer, texts), expected, rtol=0, atol=1e-4)
    gguf_name = "exported-f32.gguf"
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_name, dtype=torch.float32)
    torch.testing.assert_close(_logits(from_gguf, tokenizer, texts), expected, rtol=0, atol=1e-4)
    record = json.loads((out / export.RECORD).read_text())
    assert record["merged_adapter"]
    assert record["gguf"] == {"file": gguf_name, "type": "f32"}
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert str(tmp_path) not in (out / name).read_text(), f"{name} names this machine"
    assert not list(tmp_path.glob(".exported-*")), "the staging folder is left behind"


def test_a_qlora_adapter_merges_into_its_dequantised_base(
    tiny_recipe, tiny_model_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    run_dir = _trained(tiny_recipe, "qlora", "model.quantization=4bit", "model.dtype=float32")
    exported = export.export(run_dir, tmp_path / "merged", dtype="float32")
    texts = _real_texts(data_root)
    tokenizer = AutoTokenizer.from_pretrained(exported.folder)
    quantised = ModelConfig(name=str(tiny_model_dir), dtype="float32", quantization="4bit")
    expected = _logits(_adapter_on_base(run_dir, quantised), tokenizer, texts)
    merged = AutoModelForCausalLM.from_pretrained(exported.folder)
    assert "quantization_config" not in json.loads((exported.folder / "config.json").read_text())
    torch.testing.assert_close(_logits(merged, tokenizer, texts), expected, rtol=0, atol=1e-4)


def test_a_full_fine_tune_is_written_as_it_is_in_the_asked_dtype(
    tiny_recipe, tmp_path: Path
) -> None:
    path = tiny_recipe("full", max_steps=2)
    run_dir = train.run(config.load(path, ["adapter=null"]), path).run_dir
    exported = export.export(run_dir, tmp_path / "bf16", dtype="bfloat16")
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
    written = AutoModelForCausalLM.from_pretrained(exported.folder, dtype="auto")
    assert written.dtype == torch.bfloat16
    for (name, expected), actual in zip(
        trained.state_dict().items(), written.state_dict().values(), strict=True
    ):
        assert torch.equal(actual, expected.to(torch.bfloat16)), name


def test_the_builtin_model_exports_a_q8_0_gguf_that_answers_alike(
    data_root: Path, tmp_path: Path
) -> None:
    """The real SmolLM2 with a trained adapter: merged logits equal the adapter model's, and
    the q8_0 GGUF, read back by transformers, tokenizes alike and decodes the same greedy
    answers. (Transformers reads a GGUF slowly: 30 s for this one.)"""
    recipe = {
        "data": {
            "source": str(data_root / "classification/sst2"),
            "task": "classification",
            "max_train_rows": 64,
            "max_eval_rows": 8,
        },
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "smol")},
    }
    recipe_path = tmp_path / "smol.yaml"
    recipe_path.write_text(json.dumps(recipe))
    run_dir = train.run(config.load(recipe_path, []), recipe_path).run_dir
    exported = export.export(run_dir, tmp_path / "smol-export", dtype="float32", gguf_type="q8_0")
    texts = _real_texts(data_root)
    tokenizer = AutoTokenizer.from_pretrained(exported.folder)
    # In float64: float32 arithmetic alone moves this model's logits (up to 39) by 1.2e-4.
    adapted = _adapter_on_base(run_dir, ModelConfig(dtype="float32")).double()
    expected = _logits(adapted, tokenizer, texts)
    in_float64 = AutoModelForCausalLM.from_pretrained(exported.folder, dtype=torch.float64)
    torch.testing.assert_close(_logits(in_float64, tokenizer, texts), expected, rtol=0, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(exported.folder)
    assert exported.gguf_path is not None
    from_gguf = AutoModelForCausalLM.from_pretrained(
        exported.folder, gguf_file=exported.gguf_path.name, dtype=torch.float32
    )
    gguf_tokenizer = AutoTokenizer.from_pretrained(
        exported.folder, gguf_file=exported.gguf_path.name
    )
    chat = tokenizer.apply_chat_template([{"role": "user", "content": texts[0]}], tokenize=False)
    for text in [*texts, chat]:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    for text in texts[1:3]:  # one SST-2 sentence, one e-mail
        prompt = tokenizer(text, return_tensors="pt")
        answers = [
            model.generate(**prompt, max_new_tokens=8, do_sample=False)
            for model in (merged, from_gguf)
        ]
        assert torch.equal(*answers), text
    # q8_0 rounds each weight to 1/127 of its block's largest: next-token distributions move
    # a little, the most likely token rarely.
    gguf_logits = _logits(from_gguf, tokenizer, texts).double()
    divergence = torch.nn.functional.kl_div(
        gguf_logits.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    same_top = (gguf_logits.argmax(-1) == expected.argmax(-1)).double().mean()
    print(f"q8_0: mean KL {divergence.mean():.5f}, top-1 agreement {same_top:.3f}")
    assert divergence.mean() < 0.01
    assert same_top > 0.95


def test_mistakes_are_named_and_nothing_is_replaced(tiny_recipe, cli_here, tmp_path: Path) -> None:
    run_dir = _trained(tiny_recipe, "lora")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    err = cli_here("export", str(run_dir), str(occupied), expect=2)
    assert "already exists and is not empty" in err
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    under_a_file = occupied / "keep.txt" / "model"
    err = cli_here("export", str(run_dir), str(under_a_file), expect=2)
    assert f"output folder {under_a_file}: {occupied / 'keep.txt'} is a file, not a folder" in err
    err = cli_here("export", str(tiny_recipe("other")), str(tmp_path / "x"), expect=2)
    assert "export takes a run folder" in err
    err = cli_here("export", str(run_dir), str(tmp_path / "x"), "--dtype", "int8", expect=2)
    assert "--dtype int8: choose one of" in err
    err = cli_here("export", str(run_dir), str(tmp_path / "x"), "--gguf", "q4_k", expect=2)
    assert "--gguf q4_k: choose one of" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("model_config", "message"),
    [
        (GPT2Config(), "writes Llama models; this model is 'gpt2'"),
        (
            LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0}),
            "rope_type 'linear'",
        ),
    ],
)
def test_gguf_refuses_what_it_would_write_wrong(model_config, message, tokenizer) -> None:
    with pytest.raises(gguf_file.GGUFError, match=message):
        gguf_file.check(model_config, tokenizer)
