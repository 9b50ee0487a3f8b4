"""The teacher cache: top-k round trip, equality with online distillation, resumable builds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import TEST_DATA, torchrun
from launched import same_steps
from llama_tune import config, data, models, run_folder, schema, train
from llama_tune.distillation import cache, loading, objective, student
from llama_tune.distillation.teacher import FrozenTeacher, distilled_count


def _settings(tiny_model_dir: Path, **values: object) -> schema.DistillConfig:
    return schema.DistillConfig(teacher={"name": str(tiny_model_dir)}, temperature=2.0, **values)


def _examples(tokenizer, count: int) -> list[data.Example]:
    recipe = schema.DataConfig(
        source=str(TEST_DATA / "sentiment"),
        task="classification",
        max_train_rows=count,
        max_length=64,
    )
    return data.build(recipe, tokenizer).train.examples


def _count_computed_shards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the shards the teacher computes from now on, in order."""
    computed: list[int] = []
    real_shard = cache._teacher_shard
    monkeypatch.setattr(
        cache,
        "_teacher_shard",
        lambda teacher, shard_examples, *rest: (
            computed.append(len(shard_examples)) or real_shard(teacher, shard_examples, *rest)
        ),
    )
    return computed


def _build(run_dir: Path, settings, teacher, examples, tokenizer, precision: str = "no") -> Path:
    return cache.build(
        run_dir,
        settings,
        lambda: teacher,
        examples,
        len(tokenizer),
        None,
        4,
        tokenizer.pad_token_id,
        precision,
    )


@pytest.fixture
def teacher(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_top_k_round_trip(tmp_path, tiny_model_dir, teacher, tokenizer) -> None:
    settings = _settings(tiny_model_dir, cache={"top_k": 5, "examples_per_shard": 4})
    examples = _examples(tokenizer, 10)
    folder = _build(tmp_path, settings, teacher, examples, tokenizer)
    assert sorted(path.name for path in folder.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    cached = cache.CachedTeacher(folder)
    assert cached.has_rest
    rows = cached.batch([9])
    example = examples[9]
    positions = distilled_count(example, settings)
    assert rows["teacher_ids"].shape == (positions, 5)

    with torch.no_grad():
        logits = teacher(torch.tensor([example.input_ids])).logits[0, :-1]
    log_probs = torch.log_softmax(logits[example.prompt_length - 1 :] / 2.0, dim=-1)
    top = log_probs.topk(5, dim=-1)
    torch.testing.assert_close(rows["teacher_log_probs"], top.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows["teacher_ids"].long(), top.indices)
    remainder = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(rows["teacher_rest"], remainder, rtol=1e-4, atol=1e-5)


def test_whole_vocabulary_cache_equals_online(tmp_path, tiny_model_dir, teacher, tokenizer) -> None:
    settings = _settings(
        tiny_model_dir, loss="jsd", positions="all", cache={"top_k": len(tokenizer)}
    )
    examples = _examples(tokenizer, 4)
    folder = _build(tmp_path, settings, teacher, examples, tokenizer)
    cached = cache.CachedTeacher(folder)
    assert not cached.has_rest
    learner = student.from_teacher(teacher, [1])
    batch = data.collate(examples, tokenizer.pad_token_id, 8)
    online = objective.DistillationObjective(
        learner, FrozenTeacher(teacher), settings, len(tokenizer)
    )
    offline = objective.DistillationObjective(
        learner, None, settings, len(tokenizer), cached=cached
    )
    expected = online(**batch)["distill"]
    found = offline(**batch, **offline.extra_inputs([0, 1, 2, 3]))["distill"]
    assert expected.item() > 0.01
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


def test_interrupted_build_keeps_finished_shards(
    tmp_path, tiny_model_dir, teacher, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tiny_model_dir, cache={"top_k": 3, "examples_per_shard": 2})
    examples = _examples(tokenizer, 6)
    real_save = cache.save_file

    def failing_save(tensors: dict, path: Path) -> None:
        if ".shard-00002" in str(path):
            raise OSError("disk full (injected)")
        real_save(tensors, path)

    monkeypatch.setattr(cache, "save_file", failing_save)
    with pytest.raises(OSError, match="injected"):
        _build(tmp_path, settings, teacher, examples, tokenizer)
    monkeypatch.setattr(cache, "save_file", real_save)
    folder = tmp_path / run_folder.TEACHER_CACHE
    finished = {path.name: path.stat().st_mtime_ns for path in folder.glob("shard-*")}
    assert sorted(finished) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert cache.missing_shards(folder, len(examples), 2) == [2]

    computed = _count_computed_shards(monkeypatch)
    _build(tmp_path, settings, teacher, examples, tokenizer)
    assert computed == [2]
    assert cache.missing_shards(folder, len(examples), 2) == []
    for name, modified in finished.items():
        assert (folder / name).stat().st_mtime_ns == modified

    changed = _settings(tiny_model_dir, cache={"top_k": 3, "examples_per_shard": 2}, beta=0.3)
    _build(tmp_path, changed, teacher, examples, tokenizer)  # beta does not enter the cache
    hotter = settings.model_copy(update={"temperature": 3.0})
    with pytest.raises(cache.CacheError, match=r"temperature differ"):
        _build(tmp_path, hotter, teacher, examples, tokenizer)


def test_shards_are_not_added_in_another_precision(
    tmp_path, tiny_model_dir, teacher, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tiny_model_dir, cache={"top_k": 3, "examples_per_shard": 2})
    examples = _examples(tokenizer, 6)
    folder = _build(tmp_path, settings, teacher, examples, tokenizer)
    manifest = folder / cache.MANIFEST
    assert json.loads(manifest.read_text())[cache.PRECISION] == "no"
    # A finished cache is read under another precision as it was built.
    computed = _count_computed_shards(monkeypatch)
    _build(tmp_path, settings, teacher, examples, tokenizer, precision="bf16")
    assert computed == []
    assert json.loads(manifest.read_text())[cache.PRECISION] == "no"
    # Completing it in bf16 would mix two roundings of the teacher: refused, nothing changed.
    (folder / "shard-00001.safetensors").unlink()
    kept = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(cache.CacheError, match=r"computed in precision 'no'; this run would add"):
        _build(tmp_path, settings, teacher, examples, tokenizer, precision="bf16")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == kept
    assert computed == []
    # With every shard missing there is nothing to mix with: built in the new precision.
    for shard in folder.glob("shard-*"):
        shard.unlink()
    _build(tmp_path, settings, teacher, examples, tokenizer, precision="bf16")
    assert computed == [2, 2, 2]
    assert json.loads(manifest.read_text())[cache.PRECISION] == "bf16"


def test_a_damaged_shard_is_built_again_with_a_note(
    tmp_path, tiny_model_dir, teacher, tokenizer, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tiny_model_dir, cache={"top_k": 3, "examples_per_shard": 2})
    examples = _examples(tokenizer, 6)
    folder = _build(tmp_path, settings, teacher, examples, tokenizer)
    damaged = folder / "shard-00002.safetensors"
    expected = load_file(damaged)
    os.truncate(damaged, 500)
    assert cache.missing_shards(folder, len(examples), 2) == [2]
    computed = _count_computed_shards(monkeypatch)
    _build(tmp_path, settings, teacher, examples, tokenizer)
    assert computed == [2]
    assert f"note: {damaged} cannot be read (truncated or damaged)" in capsys.readouterr().err
    rebuilt = cache.CachedTeacher(folder).shards[2]
    for name, value in expected.items():
        torch.testing.assert_close(rebuilt[name], value)


def test_a_teacher_retrained_in_place_is_refused_by_name(
    tmp_path, make_tiny_llama, tokenizer
) -> None:
    teacher_dir = make_tiny_llama("teacher", seed=1)
    settings = _settings(teacher_dir, cache={"top_k": 3})
    examples = _examples(tokenizer, 4)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    folder = _build(tmp_path, settings, teacher, examples, tokenizer)
    built = {path.name: path.read_bytes() for path in folder.iterdir()}
    # The same folder, files and shapes: only the weights' values tell the teachers apart.
    make_tiny_llama("teacher", seed=2)
    with pytest.raises(cache.CacheError, match=r"\(teacher_model_weights differ\); delete"):
        _build(tmp_path, settings, teacher, examples, tokenizer)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == built


def test_a_cache_built_before_fingerprints_and_absolute_paths_is_used(
    tmp_path, tiny_model_dir: Path, tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tiny_model_dir, cache={"top_k": 3})
    examples = _examples(tokenizer, 4)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    folder = _build(tmp_path, settings, teacher, examples, tokenizer)
    # As an older build wrote it: no fingerprints, the teacher's path relative, as written.
    path = folder / cache.MANIFEST
    manifest = json.loads(path.read_text())
    for key in cache.FINGERPRINTS:
        manifest.pop(key, None)
    monkeypatch.chdir(tiny_model_dir.parent)
    manifest["teacher"]["name"] = tiny_model_dir.name
    path.write_text(json.dumps(manifest))
    # Used as it is: no teacher is given, and none is needed.
    _build(tmp_path, settings, None, examples, tokenizer)


def test_a_cache_of_a_teacher_adapter_since_retrained_is_refused(
    tiny_recipe, tiny_model_dir: Path, cli_here
) -> None:
    teacher_path = tiny_recipe("teacher", max_steps=2)
    teacher_run = train.run(config.load(teacher_path), teacher_path).run_dir
    path = tiny_recipe("student", max_steps=2)
    overrides = [
        f"distill.teacher.name={tiny_model_dir}",
        f"distill.teacher.adapter={teacher_run}",
        "distill.cache.top_k=8",
    ]
    folder = loading.build_cache(config.load(path, overrides), path)
    shards = {shard.name: shard.read_bytes() for shard in folder.glob("shard-*")}
    # Retrained at the same path: the teacher's name and adapter path are unchanged.
    cli_here("train", str(teacher_path), "train.lr=5e-3", "--overwrite")
    err = cli_here("train", str(path), *overrides, expect=2)
    assert "(teacher_adapter_weights differ); delete the folder" in err
    assert "Traceback" not in err
    assert {shard.name: shard.read_bytes() for shard in folder.glob("shard-*")} == shards
    # Where the teacher's adapter is not (a run copied without it), the complete cache is
    # used, with a note: the teacher is never loaded.
    shutil.rmtree(teacher_run)
    said = cli_here("train", str(path), *overrides)
    assert "the cache's teacher is not checked against it" in said


def test_training_from_the_cache_cli(tiny_recipe, tiny_model_dir: Path) -> None:
    path = tiny_recipe(max_steps=4, validation={"every": 2})
    overrides = [
        f"distill.teacher.name={tiny_model_dir}",
        "distill.student.from_teacher.every=2",
        "distill.cache.top_k=8",
        "distill.cache.examples_per_shard=25",
        "adapter=null",
    ]
    # Built by two processes: the main one computes shards 0 and 2 (25 + 14 rows), the other
    # shard 1; the main prints the folder once.
    built = torchrun(["distill", "cache", str(path), *overrides])
    assert built.returncode == 0, built.stderr[-3000:]
    assert "39/39" in built.stderr
    assert "64/64" not in built.stderr
    recipe = config.load(path, overrides)
    run_dir = config.run_dir(recipe, path)
    assert built.stdout.count("teacher cache:") == 1
    assert f"teacher cache: {run_dir / run_folder.TEACHER_CACHE}" in built.stdout
    shards = sorted((run_dir / run_folder.TEACHER_CACHE).glob("shard-*"))
    assert len(shards) == 3  # 64 training rows
    before = [shard.stat().st_mtime_ns for shard in shards]

    result = train.run(recipe, path)
    assert [shard.stat().st_mtime_ns for shard in shards] == before
    records = [json.loads(line) for line in (run_dir / run_folder.METRICS).read_text().splitlines()]
    assert all(record["distill_loss"] > 0 for record in records if "loss" in record)
    # The validation split is not cached: its eval reports the task loss only.
    assert all("eval_distill_loss" not in record for record in records)
    assert models.parameter_counts(AutoModelForCausalLM.from_pretrained(result.weights_dir))[1] > 0


def test_a_finished_cache_spares_loading_the_teacher(
    tiny_recipe, tiny_model_dir: Path, make_tiny_llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    student_dir = make_tiny_llama("student", width=32, layers=1, seed=1)
    overrides = [
        f"model.name={student_dir}",
        f"distill.teacher.name={tiny_model_dir}",
        "distill.cache.top_k=8",
        "adapter=null",
    ]
    path = tiny_recipe(max_steps=2)
    recipe = config.load(path, overrides)
    folder = loading.build_cache(recipe, path)

    def refuse(*_args: object) -> None:
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(loading, "load_teacher", refuse)
    assert loading.build_cache(recipe, path) == folder
    result = train.run(recipe, path)
    assert result.summary["status"] == "finished"


def test_two_processes_build_the_cache_together_as_one_process_does(
    tiny_recipe, tiny_model_dir: Path, make_tiny_llama
) -> None:
    # Three shards of 25 rows: the first process computes shards 0 and 2, the second shard 1,
    # each with its own teacher on its own device; then each trains on the whole cache.
    student_dir = make_tiny_llama("student", width=32, layers=1, seed=1)
    overrides = [
        f"model.name={student_dir}",
        f"distill.teacher.name={tiny_model_dir}",
        "distill.cache.top_k=8",
        "distill.cache.examples_per_shard=25",
        "adapter=null",
    ]
    one = tiny_recipe("one", max_steps=3, batch_size=8)
    reference = train.run(config.load(one, overrides), one).run_dir
    spread_recipe = tiny_recipe("spread", max_steps=3, batch_size=4)
    done = torchrun(["train", str(spread_recipe), *overrides])
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # The main process's progress counts its own rows: 25 + 14 of the 64.
    assert "39/39" in done.stderr
    assert "64/64" not in done.stderr
    spread = spread_recipe.parent / spread_recipe.stem
    same_steps(reference, spread, ("loss", "distill_loss", "grad_norm"))
    shards = sorted((reference / run_folder.TEACHER_CACHE).glob("shard-*"))
    assert len(shards) == 3
    for shard in shards:
        built_apart = load_file(spread / run_folder.TEACHER_CACHE / shard.name)
        for name, value in load_file(shard).items():
            torch.testing.assert_close(built_apart[name], value, rtol=1e-5, atol=1e-6)


def test_a_cache_of_label_tokens_is_refused_for_other_labels(
    tmp_path, tiny_model_dir, teacher, tokenizer
) -> None:
    # Cached ids index the labels' first tokens in data.labels order: with the labels listed
    # the other way round, the same examples read each label's probability as the other's.
    settings = _settings(tiny_model_dir, label_tokens_only=True, cache={"top_k": 2})
    examples = _examples(tokenizer, 4)
    first_tokens = torch.tensor([tokenizer(f" {word}")["input_ids"][0] for word in ("no", "yes")])

    def build(subset: torch.Tensor) -> Path:
        vocab, pad = len(tokenizer), tokenizer.pad_token_id
        return cache.build(
            tmp_path, settings, lambda: teacher, examples, vocab, subset, 4, pad, "no"
        )

    build(first_tokens)
    build(first_tokens)  # the same labels: the finished cache is kept
    with pytest.raises(cache.CacheError, match=r"\(compared_tokens differ\)"):
        build(first_tokens.flip(0))
