"""Models: name resolution, the built-in cache, LoRA and QLoRA adapters."""

from __future__ import annotations

import shutil
from pathlib import Path

import bitsandbytes
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import AutoModelForCausalLM

from llama_tune import models
from llama_tune.schema import AdapterConfig, ModelConfig


def test_unknown_names_list_the_built_in_models(tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match="built-in models: smollm2-135m-instruct"):
        models.resolve("./no/such/folder")
    with pytest.raises(models.ModelError, match="not found"):
        models.resolve("SmolLM2-135M-Instruct.Q4_1.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match=r"has no config\.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(models.ModelError, match="built-in models"):
        models.load_tokenizer("nobody-here/no-such-model-xyz")


def test_hub_ids_pass_through_unchanged() -> None:
    for name in ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B-Instruct", "gpt2"):
        assert models.resolve(name) == name


def test_built_in_model_is_converted_once(builtin_dir: Path) -> None:
    weights = builtin_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert models.builtin_folder("smollm2-135m-instruct") == builtin_dir
    assert weights.stat().st_mtime_ns == stamp
    config = AutoModelForCausalLM.from_pretrained(builtin_dir).config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert not hasattr(config, "quantization_config")
    assert not list(builtin_dir.parent.glob(".smollm2-135m-instruct-*"))


def test_lora_adapts_every_linear_layer(tiny_model_dir: Path) -> None:
    bundle = models.load(ModelConfig(name=str(tiny_model_dir)), AdapterConfig(r=4))
    adapted = {
        name.split(".")[-4] for name, _ in bundle.model.named_parameters() if "lora_A" in name
    }
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable, total = models.parameter_counts(bundle.model)
    assert 0 < trainable < total
    assert bundle.tokenizer.pad_token is not None


def test_unknown_target_module_is_a_model_error(tiny_model_dir: Path) -> None:
    with pytest.raises(models.ModelError, match=r"adapter\.target_modules"):
        models.load(ModelConfig(name=str(tiny_model_dir)), AdapterConfig(target_modules=["nope"]))


def test_a_target_module_that_matches_nothing_is_named(tiny_model_dir: Path) -> None:
    # peft alone adapts q_proj and ignores the misspelt name as long as one name matches.
    linear = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    misspelt = AdapterConfig(target_modules=["q_proj", "foo_proj", "self_attn.v_prj"])
    with pytest.raises(
        models.ModelError,
        match=rf"^adapter\.target_modules: foo_proj, self_attn\.v_prj names no module of the "
        rf"model, whose linear modules are {linear}$",
    ):
        models.add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), misspelt)
    # A module of a decoder layer that adapter.layers leaves out is not adapted either.
    outside = AdapterConfig(target_modules=["q_proj", "layers.0.mlp.up_proj"], layers=[1])
    with pytest.raises(
        models.ModelError,
        match=r"^adapter\.target_modules: layers\.0\.mlp\.up_proj names no module in "
        r"adapter\.layers \[1\], whose linear modules are down_proj, gate_proj, k_proj, o_proj",
    ):
        models.add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), outside)
    # A name matches a module's whole name or its last dotted parts, as in peft.
    suffixes = AdapterConfig(target_modules=["self_attn.q_proj", "model.layers.0.mlp.up_proj"])
    model = models.add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), suffixes)
    adapted = {name.rsplit(".", 1)[-1] for name in model.base_model.targeted_module_names}
    assert adapted == {"q_proj", "up_proj"}


def _lora_gradients(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_a_model_made_on_the_meta_device_reads_no_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # What an FSDP process other than the main one does: it receives its weights instead.
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    recipe = ModelConfig(name=str(folder))
    with pytest.raises(models.ModelError):
        models.load(recipe, AdapterConfig())
    bundle = models.load(recipe, AdapterConfig(), device=torch.device("meta"))
    assert all(param.is_meta for param in bundle.model.parameters())
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shapes = {name: param.shape for name, param in original.named_parameters()}
    made = models.causal_lm(bundle.model)
    base_shapes = {
        name.replace(".base_layer", ""): param.shape
        for name, param in made.named_parameters()
        if "lora_" not in name
    }
    assert base_shapes == shapes
    assert made.generation_config.eos_token_id == original.generation_config.eos_token_id


def test_an_adapter_on_the_top_layers_leaves_the_backward_out_of_the_others(
    tiny_model_dir: Path,
) -> None:
    model = models.add_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), AdapterConfig(layers=[1])
    )
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained
    assert all(".layers.1." in name for name in trained)
    reached = []
    layers = models.causal_lm(model).model.layers
    layers[0].register_full_backward_hook(lambda *_: reached.append(0))
    layers[1].register_full_backward_hook(lambda *_: reached.append(1))
    model(input_ids=torch.randint(0, 1000, (2, 12))).logits.sum().backward()
    assert reached == [1]
    with pytest.raises(models.ModelError, match=r"adapter\.layers: 2 is not a layer .* 0 to 1"):
        models.add_adapter(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), AdapterConfig(layers=[0, 2])
        )


def test_qlora_gradients_match_a_dequantised_reference_after_eval(tiny_model_dir: Path) -> None:
    adapter = AdapterConfig(r=4, dropout=0.0)
    quantised = models.add_adapter(
        models.load_base_model(ModelConfig(name=str(tiny_model_dir), quantization="4bit")), adapter
    )
    linear_4bit = {
        name.replace(".base_layer", ""): module
        for name, module in quantised.get_base_model().named_modules()
        if isinstance(module, bitsandbytes.nn.Linear4bit)
    }
    assert len(linear_4bit) == 14
    reference_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dequantised = {
        f"{name}.weight": bitsandbytes.functional.dequantize_4bit(
            module.weight.data, module.weight.quant_state
        ).float()
        for name, module in linear_4bit.items()
    }
    reference_base.load_state_dict(dequantised, strict=False)
    reference = models.add_adapter(reference_base, adapter)
    quantised_lora = dict(quantised.named_parameters())
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, parameter in reference.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
                quantised_lora[name].copy_(parameter)
    input_ids = torch.randint(0, 1000, (8, 40), generator=generator)
    # An evaluation pass first: bitsandbytes may repack CPU weights for inference in eval mode,
    # and training after it must still get the right gradients.
    quantised.eval()
    with torch.no_grad():
        quantised(input_ids=input_ids)
    quantised.train()
    expected = _lora_gradients(reference, input_ids)
    actual = _lora_gradients(quantised, input_ids)
    assert expected.keys() == actual.keys()
    assert len(expected) == 28
    for name, gradient in expected.items():
        error = (actual[name] - gradient).abs().max() / gradient.abs().max()
        assert error < 0.02, name


def test_auto_dtype_stores_the_base_in_the_compute_dtype(tiny_model_dir: Path) -> None:
    bundle = models.load(ModelConfig(name=str(tiny_model_dir)), AdapterConfig(r=4), "bf16")
    dtypes = {name: p.dtype for name, p in bundle.model.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == (
        torch.bfloat16
    )
    # Trainable adapter weights stay fp32 so optimizer updates keep their precision.
    assert {dtypes[name] for name in dtypes if "lora_" in name} == {torch.float32}
    fp32 = models.load(ModelConfig(name=str(tiny_model_dir)), AdapterConfig(r=4), "no")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}


def test_fp16_weights_that_train_are_refused_under_fp16_naming_the_key() -> None:
    # fp16 (a GPU's) scales the loss, and its scaler refuses to unscale fp16 gradients.
    half = ModelConfig(name="any", dtype="float16")
    with pytest.raises(models.ModelError, match=r"model\.dtype: float16") as refused:
        models.storage_dtype(half, "fp16", trained=True)
    assert "model.dtype auto" in str(refused.value)
    # Frozen fp16 weights (LoRA's base), or trained ones without the scaler, are the user's call.
    assert models.storage_dtype(half, "fp16") == torch.float16
    assert models.storage_dtype(half, "no", trained=True) == torch.float16
    assert models.storage_dtype(ModelConfig(name="any"), "fp16", trained=True) == torch.float32


def test_qlora_keeps_unquantised_weights_in_the_storage_dtype(tiny_model_dir: Path) -> None:
    # peft's kbit preparation would upcast them to fp32: twice the memory of an 8B Llama's
    # embeddings and head, cast back to bf16 at every forward.
    spec = ModelConfig(name=str(tiny_model_dir), quantization="4bit", dtype="bfloat16")
    model = models.load_base_model(spec, "bf16")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_the_built_in_models_hub_id_stands_in_for_it_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], builtin_dir: Path
) -> None:
    # The Hub cannot serve the adapter's portable base name (what hf_hub_download raises with
    # no network, or with HF_HUB_OFFLINE): it loads the built-in copy.
    origin = models.BUILTIN_MODELS["smollm2-135m-instruct"].origin

    def offline(*_args: object, **_kwargs: object) -> str:
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(models, "hf_hub_download", offline)
    models.offline_stand_in.cache_clear()
    assert models.resolve(origin) == str(builtin_dir)
    assert f"the Hub cannot serve {origin}" in capsys.readouterr().err
    record = models.base_record(ModelConfig(name=origin))
    assert record["name"] == record["portable_name"] == origin
    assert "Q4_1.gguf" in str(record["weights"])
    # A pinned revision, or a Hub that serves the id, is never stood in for.
    assert models.resolve(origin, "abc123") == origin
    models.offline_stand_in.cache_clear()
    monkeypatch.setattr(models, "hf_hub_download", lambda *_args, **_kwargs: "config.json")
    assert models.resolve(origin) == origin
    models.offline_stand_in.cache_clear()


def test_a_folders_weights_fingerprint_follows_its_weights_not_its_files(
    make_tiny_llama, tmp_path: Path
) -> None:
    folder = make_tiny_llama("teacher", seed=1)
    weights = folder / "model.safetensors"
    before, size = models.weights_fingerprint(str(folder)), weights.stat().st_size
    # A copy (new dates, same bytes) is the same model.
    copy = shutil.copytree(folder, tmp_path / "copy", copy_function=shutil.copyfile)
    assert models.weights_fingerprint(str(copy)) == before
    # Retrained in place: the same files, sizes, names and shapes, other values.
    make_tiny_llama("teacher", seed=2)
    assert weights.stat().st_size == size
    assert models.weights_fingerprint(str(folder)) != before


def test_a_hub_models_weights_fingerprint_is_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--someone--teacher"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert models.weights_fingerprint("someone/teacher") == commit
    with pytest.raises(models.ModelError, match="cannot load model 'someone/other'"):
        models.weights_fingerprint("someone/other")
