"""`llama-tune export`: a run's trained model as a standalone model folder, and a GGUF file.

A LoRA adapter is merged into its base in float32; a QLoRA adapter into the weights it was
trained against, the 4-bit base dequantised. A full fine-tune or a distilled student is taken
as it is. The model is then cast to the asked dtype and written with its tokenizer (carrying
the recipe's chat template) and generation config, so `AutoModelForCausalLM.from_pretrained`
loads it with neither peft nor the base. The folder is assembled under a temporary name beside
its destination and renamed when complete: a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import __version__, chat_templates, evaluation, gguf_file, models, schema
from llama_tune.distillation import loading
from llama_tune.errors import UserError
from llama_tune.jsonfiles import write_json
from llama_tune.run_folder import check_can_create, holds_something

RECORD = "llama_tune_export.json"
"""What the folder was made from: run, weights, base, dtype, GGUF file."""


class ExportError(UserError):
    """An export that cannot be made: a target that is not a finished run, a folder in the way."""


@dataclass
class Exported:
    """Where an export went."""

    folder: Path
    dtype: str
    gguf_path: Path | None


def export(
    target: str | Path,
    output: str | Path,
    dtype: str | None = None,
    gguf_type: str | None = None,
    overrides: list[str] | None = None,
) -> Exported:
    """Write the trained model of the run folder `target` to the new folder `output`, in
    `dtype` (default: the base model's own), with a GGUF file of `gguf_type` inside if asked.
    Everything is checked before the model loads; nothing existing is replaced."""
    output = Path(output)
    _check_output(output)
    if dtype is not None and dtype not in models.DTYPES:
        raise ExportError(f"--dtype {dtype}: choose one of {', '.join(models.DTYPES)}")
    if gguf_type is not None and gguf_type not in gguf_file.TYPES:
        raise ExportError(f"--gguf {gguf_type}: choose one of {', '.join(gguf_file.TYPES)}")
    if not Path(target).is_dir():
        raise ExportError(f"{target}: export takes a run folder (a trained run), not a recipe")
    resolved = evaluation.resolve_target(target, overrides or [])
    dtype = dtype or _own_dtype(_dtype_source(resolved.recipe))
    tokenizer = _tokenizer(resolved.recipe)
    if gguf_type is not None:
        exported = _adapter_base_or_model(resolved)
        location = models.resolve(exported.name, exported.revision)
        gguf_file.check(AutoConfig.from_pretrained(location), tokenizer)
    model = merged_model(resolved)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        tokenizer.save_pretrained(staging)
        gguf_path = None
        if gguf_type is not None:
            gguf_path = staging / f"{output.name}-{gguf_type}.gguf"
            pre_tokenizer = _builtin_pre_tokenizer(resolved.recipe.model)
            if pre_tokenizer is None:
                print(
                    "note: llama.cpp names each tokenizer's pre-split itself; this GGUF names "
                    "none, so llama.cpp will split text its default way and warn",
                    file=sys.stderr,
                )
            gguf_file.write(model, tokenizer, staging, gguf_path, gguf_type, pre_tokenizer)
        model.to(models.DTYPES[dtype]).save_pretrained(staging)
        write_json(staging / RECORD, _record(resolved, dtype, gguf_path, gguf_type))
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Exported(output, dtype, None if gguf_path is None else output / gguf_path.name)


def _check_output(output: Path) -> None:
    check_can_create(output, "output folder")
    if holds_something(output):
        raise ExportError(f"{output} already exists and is not empty; export into a new folder")


def _adapter_base_or_model(resolved: evaluation.Target) -> schema.ModelConfig:
    """The model whose config the export keeps: an adapter's base, or the trained model."""
    if resolved.recipe.adapter is not None:
        return evaluation.adapter_base(resolved)
    return resolved.recipe.model.model_copy(update={"name": str(resolved.weights_dir)})


def _dtype_source(recipe: schema.Recipe) -> schema.ModelConfig:
    """The published model whose dtype an export keeps by default: the base, or for a student
    cut from its teacher, the teacher."""
    if recipe.distill is not None and recipe.distill.student.from_teacher is not None:
        return loading.teacher_spec(recipe.distill)
    return recipe.model


def _own_dtype(base: schema.ModelConfig) -> str:
    """The dtype the base model is published in (its config's), float32 when it names none."""
    config = AutoConfig.from_pretrained(models.resolve(base.name, base.revision))
    own = getattr(config, "dtype", None)
    names = {value: name for name, value in models.DTYPES.items()}
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return names.get(own, "float32")


def _tokenizer(recipe: schema.Recipe) -> PreTrainedTokenizerBase:
    """The run's tokenizer, carrying the chat template the recipe trained with."""
    tokenizer = models.load_tokenizer(recipe.model.name, recipe.model.revision)
    choice = recipe.data.chat.template
    if choice is not None and choice != chat_templates.TOKENIZER:
        tokenizer.chat_template = chat_templates.resolve(choice, tokenizer).source
    return tokenizer


def merged_model(resolved: evaluation.Target) -> PreTrainedModel:
    """The run's trained model in float32 on the CPU, its adapter (if any) merged in."""
    cpu = torch.device("cpu")
    as_float32 = {"dtype": "float32", "gradient_checkpointing": False}
    if resolved.recipe.adapter is None:
        model_spec = _adapter_base_or_model(resolved).model_copy(update=as_float32)
        return models.load_base_model(model_spec, trained=True, device=cpu)
    assert resolved.weights_dir is not None
    base_spec = evaluation.adapter_base(resolved).model_copy(update=as_float32)
    if base_spec.quantization == "none":
        base = models.load_base_model(base_spec, device=cpu)
    else:
        # bitsandbytes loads onto the accelerator; the adapter learned against these very
        # weights, so it merges into them dequantised, not into the original float weights.
        base = models.load_base_model(base_spec).dequantize().to(cpu, torch.float32)
    return models.load_adapter(base, resolved.weights_dir, "model.name").merge_and_unload()


def _builtin_pre_tokenizer(model: schema.ModelConfig) -> str | None:
    """llama.cpp's pre-tokenizer name for a built-in model (from the GGUF it ships as)."""
    builtin = models.builtin_model(model.name)
    return None if builtin is None else builtin.pre_tokenizer


def _record(
    resolved: evaluation.Target, dtype: str, gguf_path: Path | None, gguf_type: str | None
) -> dict[str, object]:
    recipe = resolved.recipe
    assert resolved.weights_dir is not None
    return {
        "run": resolved.run_dir.name,
        "weights": resolved.weights_dir.name,
        "merged_adapter": recipe.adapter is not None,
        "base": models.base_record(recipe.model),
        "base_quantization": recipe.model.quantization,
        "dtype": dtype,
        "gguf": None if gguf_path is None else {"file": gguf_path.name, "type": gguf_type},
        "llama_tune": __version__,
    }
