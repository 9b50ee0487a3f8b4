"""Trained LoRA adapters found again: in a run folder, an adapter folder or on the Hub.

A run starts from an existing adapter with `adapter.init_from`, and a distillation teacher
wears one with `distill.teacher.adapter`; both take a run folder, an adapter folder or a Hub id
(`owner/name`, or `owner/name@revision`). Only safetensors weights are read, so a downloaded
adapter cannot run code. Starting from an adapter checks it against the recipe first: the same
scaling and variant, the same adapted modules, the same shapes, each mismatch named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from llama_tune.errors import UserError
from llama_tune.run_folder import ADAPTER, BEST, FULL_MODEL
from llama_tune.runtime import holds_weights
from llama_tune.schema import AdapterConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class AdapterError(UserError):
    """An adapter that cannot be found, read or started from."""


def locate(reference: str, key: str) -> Path:
    """The adapter folder `reference` names for the recipe key `key`: the folder itself, a run
    folder's adapter/ (or best/ when training stopped before adapter/ was written), or a Hub
    repository downloaded into the Hub cache."""
    path = Path(reference).expanduser()
    if path.is_dir():
        for candidate in (path, path / ADAPTER, path / BEST):
            if (candidate / CONFIG).is_file():
                return _with_safe_weights(candidate, key)
        if (path / FULL_MODEL).is_dir():
            raise AdapterError(f"{key}: {reference} is a full fine-tuning run; it has no adapter")
        raise AdapterError(
            f"{key}: {reference} is neither an adapter folder nor a run folder with adapter/"
        )
    looks_like_path = reference.startswith((".", "/", "~")) or reference.count("/") != 1
    if looks_like_path:
        raise AdapterError(f"{key}: {reference} not found (a folder, or a Hub id owner/name)")
    return _with_safe_weights(_download(reference, key), key)


def fingerprint(folder: Path) -> str:
    """A hash of an adapter's settings and weights, read whole (an adapter is megabytes): a
    retrained adapter keeps its folder, sizes and shapes, not its values."""
    digests = []
    for name in (CONFIG, WEIGHTS):
        with (folder / name).open("rb") as file:
            digests.append(hashlib.file_digest(file, "sha256").hexdigest())
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]


def _download(reference: str, key: str) -> Path:
    repo_id, _, revision = reference.partition("@")
    try:
        folder = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[CONFIG, WEIGHTS]
        )
    except (OSError, ValueError, HfHubHTTPError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise AdapterError(
            f"{key}: cannot download the adapter {reference} from the Hub "
            f"({type(error).__name__}: {first_line})"
        ) from None
    return Path(folder)


def _with_safe_weights(folder: Path, key: str) -> Path:
    if not (folder / CONFIG).is_file():
        raise AdapterError(f"{key}: {folder} has no {CONFIG}")
    if not (folder / WEIGHTS).is_file():
        raise AdapterError(
            f"{key}: {folder} has no {WEIGHTS} (llama-tune reads adapters only as "
            "safetensors: a pickled adapter_model.bin could run code when loaded)"
        )
    return folder


def _settings(folder: Path, key: str) -> dict:
    try:
        settings = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{key}: {folder / CONFIG} is unreadable ({error})") from None
    if settings.get("peft_type") != "LORA":
        raise AdapterError(f"{key}: {folder} is a {settings.get('peft_type')} adapter, not LoRA")
    return settings


def _check_settings(settings: dict, adapter: AdapterConfig, source: Path) -> None:
    """The recipe's adapter computes what the saved one did: same rank, scaling and variant."""
    pairs = (
        ("adapter.r", adapter.r, "r"),
        ("adapter.alpha", adapter.alpha, "lora_alpha"),
        ("adapter.use_rslora", adapter.use_rslora, "use_rslora"),
        ("adapter.use_dora", adapter.use_dora, "use_dora"),
        ("adapter.layers", adapter.layers, "layers_to_transform"),
    )
    for recipe_key, ours, saved_key in pairs:
        theirs = settings.get(saved_key, None if saved_key == "layers_to_transform" else False)
        if ours != theirs:
            raise AdapterError(
                f"adapter.init_from: {recipe_key} is {ours} but {source} was trained with "
                f"{saved_key} {theirs}; set {recipe_key}={theirs}"
            )


def start_from(model: PeftModel, adapter: AdapterConfig) -> Path:
    """Give the fresh adapter of `model` the weights `adapter.init_from` names; returns the
    folder they came from. Every mismatch with the recipe is refused by name."""
    assert adapter.init_from is not None
    source = locate(adapter.init_from, "adapter.init_from")
    _check_settings(_settings(source, "adapter.init_from"), adapter, source)
    try:
        saved = load_file(source / WEIGHTS)
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise AdapterError(f"adapter.init_from: {source / WEIGHTS} unreadable ({error})") from None
    expected = get_peft_model_state_dict(model)
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        name = (missing or unexpected)[0]
        where = "the recipe's adapter has" if missing else f"{source} has"
        raise AdapterError(
            f"adapter.init_from: {where} {name} and the other does not "
            "(adapter.target_modules or the base model differ)"
        )
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape:
            raise AdapterError(
                f"adapter.init_from: {name} is {tuple(saved[name].shape)} in {source} but "
                f"{tuple(tensor.shape)} here (a base model of another shape)"
            )
    if holds_weights(model):  # else the main process sends them (FSDP)
        set_peft_model_state_dict(model, saved)
    return source
