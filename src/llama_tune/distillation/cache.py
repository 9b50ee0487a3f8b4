"""Offline distillation: the teacher runs once over the training split, training reads a cache.

For every training example the cache holds, at each distilled position, the teacher's top-k
log-probabilities (at the recipe's temperature, over the compared tokens) and the log of the
probability mass left outside them. Training then compares the student's distribution over the
same k tokens plus one "everything else" bucket, so no teacher weights are loaded at all. With k
equal to the vocabulary there is no remainder and the loss equals online distillation.

The cache lives in `<run>/teacher-cache/` as shards of `examples_per_shard` examples, each
written atomically, with a manifest of what it was built from, the teacher's weights included
(fingerprints of its model and adapter, so a teacher retrained in place is noticed) and the
precision of its shards. Building resumes: finished shards are kept, and a manifest that no
longer matches the recipe, the teacher's weights or the data is an error, not a silent mix of
two teachers; so is adding shards in another precision than the finished ones. A shard that
cannot be read (a truncated file) is built again like an absent one, with a note naming it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llama_tune import adapters, config, data, inference, models, schema
from llama_tune.distillation.losses import compared_logits, log_remainder, tempered_log_probs
from llama_tune.distillation.teacher import FrozenTeacher, distilled_positions
from llama_tune.errors import UserError
from llama_tune.jsonfiles import read_json, write_json
from llama_tune.run_folder import TEACHER_CACHE

MANIFEST = "manifest.json"


class CacheError(UserError):
    """A teacher cache that does not belong to this recipe or data."""


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def teacher_fingerprint(teacher: schema.TeacherConfig) -> dict[str, str]:
    """What the teacher's model and adapter are, not only where: a teacher retrained in place
    (`train --overwrite`) keeps its name and adapter path, but its cache no longer holds. A
    part not found here is left out, with a note: a complete cache never loads the teacher, so
    a run copied without it trains on; a build loads it, and names what is missing."""
    fingerprints = {}
    try:
        fingerprints["teacher_model_weights"] = models.weights_fingerprint(
            teacher.name, teacher.revision
        )
        if teacher.adapter is not None:
            folder = adapters.locate(teacher.adapter, "distill.teacher.adapter")
            # A damaged adapter is named as such, not reported as another teacher.
            models.check_weights(folder)
            fingerprints["teacher_adapter_weights"] = adapters.fingerprint(folder)
    except UserError as error:
        print(f"note: {error}; the cache's teacher is not checked against it", file=sys.stderr)
    return fingerprints


def manifest(
    settings: schema.DistillConfig,
    examples: list[data.Example],
    vocab_size: int,
    token_subset: torch.Tensor | None,
) -> dict[str, Any]:
    """What a cache is built from; any difference makes an existing cache unusable."""
    assert settings.cache is not None
    compared_width = vocab_size if token_subset is None else len(token_subset)
    return {
        "teacher": settings.teacher.model_dump(mode="json"),
        **teacher_fingerprint(settings.teacher),
        "temperature": settings.temperature,
        "positions": settings.positions,
        "label_tokens_only": settings.label_tokens_only,
        "top_k": min(settings.cache.top_k, compared_width),
        "compared_width": compared_width,
        # Cached ids index the compared tokens: the labels' first tokens in data.labels order
        # (label_tokens_only), which the encoded examples do not show.
        "compared_tokens": None if token_subset is None else token_subset.tolist(),
        "examples": len(examples),
        "examples_per_shard": settings.cache.examples_per_shard,
        "data": data.fingerprint(examples),
    }


FINGERPRINTS = ("teacher_model_weights", "teacher_adapter_weights")
"""Manifest keys compared only where both the cache and the recipe's teacher have them."""


PRECISION = "precision"
"""The precision the shards were computed in: recorded, and compared only when shards are
to be added (`_shard_precision`); a finished cache is read under any precision."""


def _check_manifest(folder: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The cache's manifest, if any, after checking it against `expected`."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    found = read_json(path)
    if isinstance(found.get("teacher"), dict):
        # Paths a cache built before recipes' paths were made absolute recorded as written.
        teacher = found["teacher"]
        for key in ("name", "adapter"):
            if isinstance(teacher.get(key), str):
                teacher[key] = config.anchor(teacher[key])
    # A fingerprint one side lacks (an older cache, a teacher not found here) is not compared.
    unchecked = {key for key in FINGERPRINTS if key not in found or key not in expected}
    compared = (expected.keys() | found.keys()) - unchecked - {PRECISION}
    changed = sorted(key for key in compared if found.get(key) != expected.get(key))
    if changed:
        raise CacheError(
            f"{folder} was built for another teacher, data or setting ({', '.join(changed)} "
            f"differ); delete the folder to build it again"
        )
    return found


def _shard_precision(
    folder: Path, found: dict[str, Any] | None, missing: list[int], shards: int, precision: str
) -> str | None:
    """The precision the cache's shards hold once this build is done: a build that adds shards
    in another precision than the finished ones is refused (a teacher whose targets change
    rounding part-way through the epoch), a finished cache keeps what it was built in."""
    built = None if found is None else found.get(PRECISION)
    if not missing:
        return built
    if built is not None and built != precision and len(missing) < shards:
        raise CacheError(
            f"{folder} holds shards computed in precision {built!r}; this run would add "
            f"{len(missing)} in {precision!r}: set train.precision to match, or delete the "
            f"folder to build it again"
        )
    return precision


def _shard_count(example_count: int, per_shard: int) -> int:
    return -(-example_count // per_shard)


@torch.no_grad()
def _teacher_shard(
    teacher: FrozenTeacher,
    examples: list[data.Example],
    settings: schema.DistillConfig,
    top_k: int,
    vocab_size: int,
    token_subset: torch.Tensor | None,
    batch_size: int,
    pad_token_id: int,
    precision: str,
    progress: tqdm,
) -> dict[str, torch.Tensor]:
    """Top-k log-probabilities, their token indices and the remaining mass, per position."""
    device = teacher.head.weight.device
    subset = None if token_subset is None else token_subset.to(device)
    ids, log_probs, rest, counts = [], [], [], []
    with inference.autocast_for(teacher.model, precision):
        for start in range(0, len(examples), batch_size):
            batch_examples = examples[start : start + batch_size]
            batch = data.collate(batch_examples, pad_token_id, 1)
            batch = {name: value.to(device) for name, value in batch.items()}
            chosen = distilled_positions(batch["labels"], settings, batch["attention_mask"])
            states = teacher.hidden(batch["input_ids"], batch["attention_mask"])[:, :-1][chosen]
            counts += chosen.sum(dim=1).tolist()
            for chunk in states.split(settings.chunk_size):
                logits = compared_logits(teacher.head, chunk, vocab_size, subset)
                tempered = tempered_log_probs(logits, settings.temperature)
                top = tempered.topk(top_k, dim=-1)
                kept_mass = top.values.logsumexp(dim=-1).clamp(max=0.0)
                ids.append(top.indices.to(torch.int32).cpu())
                log_probs.append(top.values.cpu())
                rest.append(log_remainder(kept_mass).cpu())
            progress.update(len(batch_examples))
    offsets = torch.tensor([0, *counts]).cumsum(0)
    return {
        "ids": torch.cat(ids),
        "log_probs": torch.cat(log_probs),
        "rest": torch.cat(rest),
        "offsets": offsets,
    }


@dataclass(frozen=True)
class Share:
    """Which shards a process builds when several build a cache together: those whose index
    is `index` modulo `count`. `wait` holds every process until all reach it (a barrier)."""

    index: int = 0
    count: int = 1
    wait: Callable[[], None] = lambda: None


ALONE = Share()
"""One process builds every shard."""


def build(
    run_dir: Path,
    settings: schema.DistillConfig,
    teacher: Callable[[], PreTrainedModel],
    examples: list[data.Example],
    vocab_size: int,
    token_subset: torch.Tensor | None,
    batch_size: int,
    pad_token_id: int,
    precision: str,
    share: Share = ALONE,
) -> Path:
    """Write the missing shards of the teacher cache (this process's `share` of them); returns
    its folder.

    Finished shards are never recomputed, so an interrupted build continues where it stopped;
    a damaged one is (`missing_shards`), with a note.
    `teacher` loads the teacher; it is called only when a shard of the share is missing.
    """
    assert settings.cache is not None
    folder = run_dir / TEACHER_CACHE
    expected = manifest(settings, examples, vocab_size, token_subset)
    # Every process checks, so a stale cache stops each with the same error.
    found = _check_manifest(folder, expected)
    per_shard = settings.cache.examples_per_shard
    missing = missing_shards(folder, len(examples), per_shard)
    shard_total = _shard_count(len(examples), per_shard)
    expected[PRECISION] = _shard_precision(folder, found, missing, shard_total, precision)
    if share.index == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MANIFEST, expected)
    # The manifest is written before any shard: shards never sit in a folder without one.
    share.wait()
    missing = [shard for shard in missing if shard % share.count == share.index]
    if not missing:
        return folder
    _note_damaged(folder, missing)
    frozen = FrozenTeacher(teacher())
    shards = {shard: examples[shard * per_shard : (shard + 1) * per_shard] for shard in missing}
    total = sum(len(shard_examples) for shard_examples in shards.values())
    progress = tqdm(
        total=total,
        desc="teacher cache",
        unit="example",
        dynamic_ncols=True,
        disable=share.index != 0,
    )
    for shard, shard_examples in shards.items():
        tensors = _teacher_shard(
            frozen,
            shard_examples,
            settings,
            expected["top_k"],
            vocab_size,
            token_subset,
            batch_size,
            pad_token_id,
            precision,
            progress,
        )
        final = _shard_path(folder, shard)
        staging = final.with_name(f".{final.name}.tmp")
        save_file(tensors, staging)
        os.replace(staging, final)
    progress.close()
    return folder


def missing_shards(folder: Path, example_count: int, per_shard: int) -> list[int]:
    """Shards of a cache folder not written yet, or unreadable: both are built (again)."""
    shards = range(_shard_count(example_count, per_shard))
    return [shard for shard in shards if not _readable(_shard_path(folder, shard))]


def _note_damaged(folder: Path, missing: list[int]) -> None:
    """Say which of the shards about to be built are there but unreadable: rewriting a file
    without a word would hide that something damaged the cache."""
    for shard in missing:
        path = _shard_path(folder, shard)
        if path.exists():
            print(
                f"note: {path} cannot be read (truncated or damaged); building it again",
                file=sys.stderr,
            )


def _readable(shard: Path) -> bool:
    """Whether a shard file opens with a header that matches its size: shards are written
    atomically, so one that does not was truncated or damaged since, and would stop training
    with safetensors' own traceback."""
    try:
        with safe_open(shard, framework="pt"):
            return True
    except (SafetensorError, OSError):  # OSError: absent (or unreadable to this user)
        return False


class CachedTeacher:
    """The cached teacher distributions, looked up by training example index."""

    def __init__(self, folder: Path) -> None:
        self.manifest = read_json(folder / MANIFEST)
        self.per_shard = self.manifest["examples_per_shard"]
        shard_count = _shard_count(self.manifest["examples"], self.per_shard)
        self.shards = [load_file(_shard_path(folder, shard)) for shard in range(shard_count)]
        # With every compared token kept there is no remainder, and none is compared.
        self.has_rest = self.manifest["top_k"] < self.manifest["compared_width"]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The teacher tensors of these examples' distilled positions, in batch order."""
        parts: dict[str, list[torch.Tensor]] = {"ids": [], "log_probs": [], "rest": []}
        for index in indices:
            shard = self.shards[index // self.per_shard]
            offsets = shard["offsets"]
            local = index % self.per_shard
            start, stop = int(offsets[local]), int(offsets[local + 1])
            for name, values in parts.items():
                values.append(shard[name][start:stop])
        return {f"teacher_{name}": torch.cat(values) for name, values in parts.items()}
