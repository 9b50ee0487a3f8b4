"""Load teacher and student for a distillation recipe, after the checks that need no weights.

Order matters: tokenizers are compared and memory is estimated from configs alone, so an
incompatible pair or an impossible size fails in seconds, before gigabytes are read.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import adapters, config, data, inference, models, schema
from llama_tune.distillation import cache, hidden, preflight, student
from llama_tune.distillation.hidden import HiddenStateMatch
from llama_tune.distillation.objective import DistillationObjective, Sampling
from llama_tune.distillation.teacher import FrozenTeacher
from llama_tune.errors import UserError
from llama_tune.run_folder import STUDENT_INIT, TEACHER_CACHE
from llama_tune.runtime import process_state, resolve_precision


class DistillationError(UserError):
    """A distillation recipe that cannot run as written."""


def teacher_spec(settings: schema.DistillConfig) -> schema.ModelConfig:
    """The teacher's model section without its adapter key."""
    return schema.ModelConfig(**settings.teacher.model_dump(exclude={"adapter"}))


def load_teacher(settings: schema.DistillConfig, mixed_precision: str) -> PreTrainedModel:
    """The frozen teacher in its storage dtype, its LoRA adapter merged in when it has one."""
    spec = settings.teacher
    model = models.load_base_model(teacher_spec(settings), mixed_precision)
    if spec.adapter is not None:
        adapter_dir = adapters.locate(spec.adapter, "distill.teacher.adapter")
        models.check_weights(adapter_dir)
        model = models.load_adapter(model, adapter_dir, "distill.teacher.name")
        # Merging removes the adapter's extra matmuls from every teacher forward; a quantised
        # base cannot take merged weights, so it keeps the adapter as is.
        if spec.quantization == "none":
            model = model.merge_and_unload()
    return model.eval().requires_grad_(False)


def label_first_tokens(recipe: schema.Recipe, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The token id each label starts with; they must differ to tell the labels apart."""
    labels = data.label_set(recipe.data)
    assert labels is not None
    label_ids = inference.label_token_ids(tokenizer, labels, recipe.data.chat.template is not None)
    first_tokens = [ids[0] for ids in label_ids]
    shared = sorted(
        label
        for label, token in zip(labels, first_tokens, strict=True)
        if first_tokens.count(token) > 1
    )
    if shared:
        raise DistillationError(
            f"distill.label_tokens_only: labels {shared} start with the same token, so their "
            "distributions cannot be told apart; use distill.positions instead"
        )
    return torch.tensor(first_tokens)


def _memory_estimate(
    recipe: schema.Recipe, settings: schema.DistillConfig, mixed_precision: str
) -> preflight.MemoryEstimate:
    spec = teacher_spec(settings)
    teacher_location = models.resolve(spec.name, spec.revision)
    teacher_parameters = preflight.parameter_count(teacher_location, spec.revision)
    if settings.student.from_teacher is not None:
        student_parameters = preflight.parameter_count(
            teacher_location, spec.revision, _kept_layers(settings, teacher_location)
        )
    else:
        student_parameters = preflight.parameter_count(
            models.resolve(recipe.model.name, recipe.model.revision), recipe.model.revision
        )
    full = recipe.adapter is None
    student_dtype = models.storage_dtype(recipe.model, mixed_precision, trained=full)
    teacher_dtype = models.storage_dtype(spec, mixed_precision)
    return preflight.estimate_memory(
        teacher_parameters,
        teacher_dtype.itemsize,
        student_parameters,
        student_dtype.itemsize,
        # A LoRA adapter is a small fraction of the model; count it as 2% of it.
        student_parameters if full else student_parameters // 50,
    )


def _kept_layers(settings: schema.DistillConfig, teacher_location: str) -> list[int]:
    choice = settings.student.from_teacher
    assert choice is not None
    layer_count = preflight.layer_count(teacher_location, settings.teacher.revision)
    return student.chosen_layers(layer_count, choice.every, choice.keep_layers)


def _checked_tokenizers(
    recipe: schema.Recipe, settings: schema.DistillConfig
) -> PreTrainedTokenizerBase:
    """The student's tokenizer, once it is known to match the teacher's."""
    teacher_tokenizer = _tokenizer(teacher_spec(settings), "distill.teacher.name")
    student_tokenizer = _tokenizer(recipe.model, "model.name")
    preflight.check_tokenizers(teacher_tokenizer, student_tokenizer)
    return student_tokenizer


def _tokenizer(spec: schema.ModelConfig, key: str) -> PreTrainedTokenizerBase:
    """The tokenizer of one of the two models; a recipe names two, so a model that cannot be
    found is named by its key."""
    try:
        return models.load_tokenizer(spec.name, spec.revision)
    except models.ModelError as error:
        raise DistillationError(f"{key}: {error}") from None


def _build_cache(
    recipe: schema.Recipe,
    run_dir: Path,
    teacher: Callable[[], PreTrainedModel],
    examples: list[data.Example],
    tokenizer: PreTrainedTokenizerBase,
    token_subset: torch.Tensor | None,
    precision: str,
    share: cache.Share = cache.ALONE,
) -> Path:
    assert recipe.distill is not None
    return cache.build(
        run_dir,
        recipe.distill,
        teacher,
        examples,
        len(tokenizer),
        token_subset,
        recipe.train.batch_size,
        tokenizer.pad_token_id,
        precision,
        share,
    )


def build_cache(recipe: schema.Recipe, recipe_path: str | Path) -> Path:
    """`llama-tune distill cache`: run the teacher over the training split and store it.
    Under a launch each process computes its share of the shards on its own device."""
    settings = recipe.distill
    if settings is None or settings.cache is None:
        raise DistillationError(f"{recipe_path}: distill.cache is not set; nothing to cache")
    precision = resolve_precision(recipe.train.precision)
    tokenizer = _checked_tokenizers(recipe, settings)
    datasets = data.build(recipe.data, tokenizer, recipe.train.seed)
    token_subset = label_first_tokens(recipe, tokenizer) if settings.label_tokens_only else None
    run_dir = config.run_dir(recipe, recipe_path)
    state = process_state()
    share = cache.Share(state.process_index, state.num_processes, state.wait_for_everyone)
    folder = _build_cache(
        recipe,
        run_dir,
        lambda: load_teacher(settings, precision),
        datasets.train.examples,
        tokenizer,
        token_subset,
        precision,
        share,
    )
    state.wait_for_everyone()
    return folder


def _layer_pairs(recipe: schema.Recipe, settings: schema.DistillConfig) -> dict[int, int] | None:
    """Student layer -> teacher layer of the hidden-state loss, from the models' configs: a map
    naming a layer either model lacks stops before any weights are read."""
    if settings.hidden_states is None:
        return None
    teacher_location = models.resolve(settings.teacher.name, settings.teacher.revision)
    keep = None
    if settings.student.from_teacher is not None:
        keep = _kept_layers(settings, teacher_location)
        student_layers = len(keep)
    else:
        student_location = models.resolve(recipe.model.name, recipe.model.revision)
        student_layers = preflight.layer_count(student_location, recipe.model.revision)
    return hidden.layer_map(
        student_layers,
        preflight.layer_count(teacher_location, settings.teacher.revision),
        keep,
        settings.hidden_states.layers,
    )


def _hidden_match(
    settings: schema.DistillConfig,
    pairs: dict[int, int] | None,
    student_model: PreTrainedModel | PeftModel,
    teacher: PreTrainedModel | None,
) -> HiddenStateMatch | None:
    """The hidden-state loss the recipe asks for, between these two models."""
    if settings.hidden_states is None or pairs is None or teacher is None:
        return None
    student_width = models.causal_lm(student_model).config.hidden_size
    return HiddenStateMatch(
        pairs, student_width, teacher.config.hidden_size, settings.hidden_states.loss
    )


def _robust(recipe: schema.Recipe) -> bool:
    """Whether the student trains on adversarial examples (the teacher then reads clean ones)."""
    return recipe.adversarial is not None and recipe.adversarial.augment is not None


def _student(
    recipe: schema.Recipe,
    teacher: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    run_dir: Path,
    accelerator: Accelerator,
    device: torch.device | None,
    creating: Callable[[], AbstractContextManager],
) -> PeftModel | PreTrainedModel:
    """The student to train (with its adapter): cut from the teacher, or loaded from its own
    weights, on `device`, inside `creating()`."""
    assert recipe.distill is not None
    settings, mixed_precision = recipe.distill, accelerator.mixed_precision
    full = recipe.adapter is None
    cut = settings.student.from_teacher is not None
    if cut:
        assert teacher is not None
        built = _cut_from(teacher, recipe, mixed_precision)
        if not full and accelerator.is_main_process:
            # The adapter's base must be found again at evaluation: keep it with the run.
            built.save_pretrained(run_dir / STUDENT_INIT)
            tokenizer.save_pretrained(run_dir / STUDENT_INIT)
        student_model = models.ready_for_training(built, recipe.model)
    else:
        student_model = models.load_base_model(
            recipe.model, mixed_precision, full, device, creating
        )
    if recipe.adapter is not None:
        # A student cut from the teacher sits on the run's own copy of itself.
        base = recipe.model
        if cut:
            base = base.model_copy(update={"name": str(run_dir / STUDENT_INIT), "revision": None})
        student_model = models.add_adapter(student_model, recipe.adapter, base)
    return student_model


def _cut_from(
    teacher: PreTrainedModel, recipe: schema.Recipe, mixed_precision: str
) -> PreTrainedModel:
    """The student cut from `teacher` (`distill.student.from_teacher`), trainable, in the
    dtype its weights are stored in."""
    assert recipe.distill is not None
    settings = recipe.distill
    keep = _kept_layers(settings, models.resolve(settings.teacher.name, settings.teacher.revision))
    dtype = models.storage_dtype(recipe.model, mixed_precision, trained=recipe.adapter is None)
    return student.from_teacher(teacher, keep).to(dtype).requires_grad_(True)


def cut_student(recipe: schema.Recipe, precision: str) -> PeftModel | PreTrainedModel | None:
    """The student as training starts when it is cut from its teacher (a fresh adapter on it,
    where the recipe has one), for `llama-tune augment`'s preview, whose gradient method
    attacks it; None when the student has weights of its own (`model`). Writes nothing."""
    if recipe.distill is None or recipe.distill.student.from_teacher is None:
        return None
    built = _cut_from(load_teacher(recipe.distill, precision), recipe, precision)
    return built if recipe.adapter is None else models.add_adapter(built, recipe.adapter)


def load(
    recipe: schema.Recipe,
    accelerator: Accelerator,
    run_dir: Path,
    student_device: torch.device | None = None,
    creating_student: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[models.ModelBundle, DistillationObjective, data.Datasets]:
    """Check, then load teacher, student and data; the objective that trains the student.

    A student loaded from its own weights goes on `student_device` (default: this process's),
    read inside `creating_student()` (`Layout.creating_model`); the teacher always on this
    process's device, whole: FSDP and ZeRO spread the student only.

    With `distill.cache`, the teacher first fills the cache (or its missing shards) and is
    then released: training reads the cache.
    """
    assert recipe.distill is not None
    settings = recipe.distill
    mixed_precision = accelerator.mixed_precision
    tokenizer = _checked_tokenizers(recipe, settings)
    accelerator.print(_memory_estimate(recipe, settings, mixed_precision).describe())
    pairs = _layer_pairs(recipe, settings)

    # A cached run needs the teacher only for missing shards (or to build the student from it).
    teacher = None
    if settings.cache is None or settings.student.from_teacher is not None:
        teacher = load_teacher(settings, mixed_precision)
    student_model = _student(
        recipe, teacher, tokenizer, run_dir, accelerator, student_device, creating_student
    )

    datasets = data.build(recipe.data, tokenizer, recipe.train.seed)
    token_subset = label_first_tokens(recipe, tokenizer) if settings.label_tokens_only else None
    frozen = None
    if teacher is not None:
        frozen = FrozenTeacher(teacher.to(accelerator.device), packed=recipe.packed)
    cached = None
    if settings.cache is not None:
        examples = datasets.train.examples

        def cache_teacher() -> PreTrainedModel:
            if teacher is not None:
                return teacher
            return load_teacher(settings, mixed_precision).to(accelerator.device)

        # build() checks the whole manifest against this recipe and data, and computes only
        # missing shards: a finished cache costs nothing, a stale one is refused. Each process
        # computes its share on its own device (one alone would leave the others waiting in a
        # barrier that NCCL gives up on after ten minutes).
        share = cache.Share(
            accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone
        )
        _build_cache(
            recipe,
            run_dir,
            cache_teacher,
            examples,
            tokenizer,
            token_subset,
            mixed_precision,
            share,
        )
        accelerator.wait_for_everyone()
        cached = cache.CachedTeacher(run_dir / TEACHER_CACHE)
        # Training reads the cache; dropping the last reference frees the teacher's memory.
        frozen, teacher = None, None
    objective = DistillationObjective(
        student_model,
        frozen,
        settings,
        len(tokenizer),
        token_subset,
        cached,
        _hidden_match(settings, pairs, student_model, teacher),
        Sampling(tokenizer, mixed_precision, recipe.train.seed),
        # A cache already holds the teacher's view of the clean examples.
        datasets.train.examples if _robust(recipe) and frozen is not None else None,
    )
    bundle = models.ModelBundle(model=student_model, tokenizer=tokenizer)
    return bundle, objective, datasets
