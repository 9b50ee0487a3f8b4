"""Assembling a training run from its recipe: model, data, objective and data rewrites.

The objective is composed in layers: the task's target-token loss (or distillation, which
contains it), then the consistency term of augmented pairs, then adversarial embedding terms on
top of whatever is below. Features are imported only when a recipe asks for them, so plain
fine-tuning never loads their code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator

from llama_tune import attention, compiling, data, lora_fusion, models, runtime, schema
from llama_tune.layout import Layout
from llama_tune.objective import Objective, TargetTokenLoss

if TYPE_CHECKING:
    from llama_tune.adversarial.augment import Augmenter


@dataclass
class TrainingSetup:
    """Everything a run trains with, before Accelerate prepares it."""

    bundle: models.ModelBundle
    objective: Objective
    datasets: data.Datasets
    augmenter: Augmenter | None
    """Rewrites training batches with adversarial examples (adversarial.augment); None: none."""


def layout_for_launch(recipe: schema.Recipe, mixed_precision: str) -> Layout:
    """The layout the launch asks for (FSDP, DeepSpeed ZeRO, else replicated), with the recipe
    checked against it before anything loads."""
    if runtime.fsdp_requested():
        from llama_tune.sharding import FullyShardedLayout

        return FullyShardedLayout(recipe)
    if runtime.deepspeed_requested():
        from llama_tune.zero import ZeroLayout

        return ZeroLayout(recipe, mixed_precision)
    return Layout()


def build(
    recipe: schema.Recipe,
    accelerator: Accelerator,
    run_dir: Path,
    layout: Layout,
) -> TrainingSetup:
    """Load the model (and teacher) and data, and compose the recipe's objective.

    The trained model is created where its layout says (`Layout.load_device`,
    `Layout.creating_model`): a model to be sharded or partitioned is created on the CPU,
    without weights on the meta device, or already partitioned (ZeRO-3), so that no GPU ever
    holds the whole model.
    """
    device = layout.load_device(accelerator)
    if recipe.distill is None:
        precision = accelerator.mixed_precision
        bundle = models.load(recipe.model, recipe.adapter, precision, device, layout.creating_model)
        objective: Objective = TargetTokenLoss(bundle.model)
        datasets = data.build(recipe.data, bundle.tokenizer, recipe.train.seed)
    else:
        from llama_tune.distillation import loading

        bundle, objective, datasets = loading.load(
            recipe, accelerator, run_dir, device, layout.creating_model
        )
    attention.use_training_attention(models.causal_lm(bundle.model), recipe.packed)
    if not layout.weights_whole_per_module:
        lora_fusion.fuse_lora_layers(bundle.model)
    if recipe.model.compile:
        compiling.compile_layers(models.causal_lm(bundle.model))
    if accelerator.mixed_precision != "no":
        models.skip_adapter_input_casts(bundle.model)
    augment = recipe.adversarial.augment if recipe.adversarial is not None else None
    if augment is not None and augment.consistency is not None:
        from llama_tune.adversarial.consistency import ConsistencyObjective

        objective = ConsistencyObjective(objective, augment.consistency)
    if recipe.adversarial is not None and recipe.adversarial.train is not None:
        from llama_tune.adversarial.embedding import AdversarialObjective

        reuse = not layout.weights_whole_per_module
        objective = AdversarialObjective(objective, recipe.adversarial.train, reuse)
    augmenter = None
    if augment is not None:
        from llama_tune.adversarial.augment import Augmenter, refuse_unperturbable

        refuse_unperturbable(datasets)

        # Its table of neighbouring tokens is made from the input embeddings, whole.
        embeddings = models.causal_lm(bundle.model).get_input_embeddings().weight
        with layout.reading([embeddings]):
            augmenter = Augmenter(
                augment,
                data.TaskFormatter(recipe.data, datasets.labels),
                bundle.tokenizer,
                bundle.model,
                recipe.train.seed,
                accelerator.mixed_precision,
            )
    return TrainingSetup(bundle, objective, datasets, augmenter)
