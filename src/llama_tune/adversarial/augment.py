"""Adversarial examples during training: which examples are perturbed, how, and into what.

At every step each training example is perturbed with probability `adversarial.augment.
probability`, by one of the recipe's methods. The choice and the perturbation depend only on
the seed, the step and the example's index (the gradient method also on the model at that
step, which checkpoints hold), so a resumed run repeats them exactly. Only the input side
changes: the target text and tokens stay those of the clean row.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import data, models, schema
from llama_tune.adversarial import text_noise, token_substitutes
from llama_tune.objective import ALONE, ModelCalls
from llama_tune.schema import AugmentConfig
from llama_tune.tasks import TASKS


def example_rng(seed: int, step: int, index: int) -> random.Random:
    """The random source of one example at one step (string seeds hash stably)."""
    return random.Random(f"augment:{seed}:{step}:{index}")


@dataclass
class Perturbed:
    """An example and its perturbed version (`clean` itself when no perturbation applied)."""

    clean: data.Example
    example: data.Example

    @property
    def method(self) -> str | None:
        """The method that perturbed the example; None when it stayed clean."""
        return self.example.perturbation


def needs_model(methods: list[str]) -> bool:
    """Whether any of these methods reads the model (its embeddings, or its gradients)."""
    return bool({"neighbour", "gradient"} & set(methods))


def _misspellings_lexicon(formatter: data.TaskFormatter) -> frozenset[str]:
    """The words of the training data (`text_noise.lexicon`: the training split and the
    `data.mix` sources) a misspelling must not make."""
    try:
        return text_noise.lexicon(data.training_inputs(formatter))
    except data.DataError as error:
        raise data.DataError(
            "gradient_candidates: misspellings (adversarial.augment or "
            f"evaluation.robustness) reads its lexicon from the training data: {error}"
        ) from None


AttackTables = tuple[token_substitutes.Substitutes | None, frozenset[str] | None]
"""The neighbour table and the misspellings' lexicon of a set of methods (None: not read)."""


def attack_tables(
    methods: list[str],
    gradient_candidates: str,
    model: PreTrainedModel | PeftModel | None,
    tokenizer: PreTrainedTokenizerBase,
    formatter: data.TaskFormatter,
) -> AttackTables:
    """The tables `methods` read: the model's input-embedding neighbours, and the training
    data's words where the gradient method offers misspellings (`_misspellings_lexicon`)."""
    # The data first: a split it cannot read is named before the table's work.
    lexicon = None
    if "gradient" in methods and gradient_candidates == "misspellings":
        lexicon = _misspellings_lexicon(formatter)
    substitutes = None
    if needs_model(methods):
        assert model is not None
        embeddings = models.causal_lm(model).get_input_embeddings().weight
        substitutes = token_substitutes.Substitutes(embeddings, tokenizer)
    return substitutes, lexicon


class Augmenter:
    """Turns the clean examples of a training step into the ones the model trains on."""

    def __init__(
        self,
        settings: AugmentConfig,
        formatter: data.TaskFormatter,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel | PeftModel | None,
        seed: int,
        precision: str,
        tables: AttackTables | None = None,
    ) -> None:
        """`tables` reuses the `attack_tables` already made for this model and these methods."""
        self.settings = settings
        self.formatter = formatter
        self.tokenizer = tokenizer
        self.model = model
        self.seed = seed
        self.precision = precision
        if tables is None:
            methods, candidates = settings.methods, settings.gradient_candidates
            tables = attack_tables(methods, candidates, model, tokenizer, formatter)
        self.substitutes, self.lexicon = tables

    def share_tables(self, main_copy: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Take the main process's substitute table (`Layout.main_copy`): a process that made
        the model without weights built its own from nothing. Every process calls it."""
        if self.substitutes is not None:
            self.substitutes.unit = main_copy(self.substitutes.unit)

    def method_for(self, step: int, index: int) -> str | None:
        """The method that perturbs example `index` at `step`, or None to keep it clean."""
        rng = random.Random(f"choose:{self.seed}:{step}:{index}")
        if rng.random() >= self.settings.probability:
            return None
        method = rng.choice(self.settings.methods)
        if method == "gradient" and step % self.settings.gradient_every:
            return None
        return method

    def perturb(
        self,
        step: int,
        indices: list[int],
        examples: list[data.Example],
        methods: list[str | None] | None = None,
        calls: ModelCalls = ALONE,
    ) -> list[Perturbed]:
        """Each example with its perturbation at `step` (gradient ones attacked as a batch).

        `methods` forces each example's method (the preview); None draws them as training does.
        `calls`: how the model is called; when the processes attack together, every process
        takes part in each attack the others make, whether or not it drew the gradient method.
        """
        if methods is None:
            methods = [self.method_for(step, index) for index in indices]
        results = []
        attacked: list[int] = []
        for position, (index, example, method) in enumerate(
            zip(indices, examples, methods, strict=True)
        ):
            rng = example_rng(self.seed, step, index)
            if method in text_noise.TEXT_METHODS:
                results.append(self._text_perturbed(example, method, rng))
            elif method == "neighbour":
                assert self.substitutes is not None
                where = token_substitutes.input_positions(example, self.formatter, self.tokenizer)
                substitutions = token_substitutes.neighbour_substitutions(
                    example,
                    where,
                    self.substitutes,
                    self.settings.neighbours,
                    self.settings.budget,
                    rng,
                )
                results.append(self._token_perturbed(example, substitutions, method, where))
            else:
                results.append(Perturbed(example, example))
                if method == "gradient":
                    attacked.append(position)
        if attacked or (calls.synced and self._may_attack(step)):
            self._attack(step, [indices[i] for i in attacked], results, attacked, calls)
        return results

    def _may_attack(self, step: int) -> bool:
        """Whether `method_for` may draw the gradient method at `step`, on any process."""
        settings = self.settings
        return "gradient" in settings.methods and step % settings.gradient_every == 0

    def _gradient_options(self, input_ids: list[int], positions: list[int]) -> list[list[int]]:
        """The tokens the gradient attack may put in place of the token at each of `positions`."""
        assert self.substitutes is not None
        pool = self.settings.gradient_candidates
        if pool == "spelling":
            return [self.substitutes.spellings(input_ids[p]) for p in positions]
        if pool == "misspellings":
            assert self.lexicon is not None
            return [self.substitutes.misspellings(input_ids, p, self.lexicon) for p in positions]
        token_ids = [input_ids[p] for p in positions]
        return self.substitutes.nearest_many(token_ids, self.settings.neighbours)

    def _attack(
        self,
        step: int,
        indices: list[int],
        results: list[Perturbed],
        attacked: list[int],
        calls: ModelCalls,
    ) -> None:
        assert self.model is not None
        clean = [results[i].clean for i in attacked]
        where = [
            token_substitutes.input_positions(e, self.formatter, self.tokenizer) for e in clean
        ]
        model = token_substitutes.AttackedModel(
            self.model, self.tokenizer.pad_token_id, self.precision, calls
        )
        with calls.whole():
            substitutions = token_substitutes.gradient_substitutions(
                model,
                clean,
                where,
                self._gradient_options,
                self.settings.budget,
                [example_rng(self.seed, step, index) for index in indices],
            )
        for i, example, chosen, positions in zip(
            attacked, clean, substitutions, where, strict=True
        ):
            results[i] = self._token_perturbed(example, chosen, "gradient", positions)

    def _text_perturbed(self, example: data.Example, method: str, rng: random.Random) -> Perturbed:
        fields = dict(example.fields)
        for name in self.formatter.task.input_fields:
            fields[name] = text_noise.TEXT_METHODS[method](fields[name], self.settings.budget, rng)
        if fields == example.fields:
            # The budget rounded down to no edit.
            return Perturbed(example, example)
        try:
            encoded = data.encode(fields, self.formatter, self.tokenizer)
        except ValueError:
            encoded = None
        if encoded is None:
            # Longer than data.max_length allows, under truncation: drop or error: stay clean.
            return Perturbed(example, example)
        input_ids, prompt_length, _ = encoded
        # The target tokens are the clean example's, whatever re-encoding the prompt did.
        input_ids = input_ids[:prompt_length] + example.input_ids[example.prompt_length :]
        perturbed = replace(
            example,
            prompt=self.formatter.prompt(fields, self.tokenizer),
            input_ids=input_ids,
            prompt_length=prompt_length,
            fields=fields,
            perturbation=method,
        )
        return Perturbed(example, perturbed)

    def _token_perturbed(
        self,
        example: data.Example,
        substitutions: dict[int, int],
        method: str,
        where: list[int],
    ) -> Perturbed:
        """`example` with `substitutions` made; `where` are its input field's positions."""
        if not substitutions:
            return Perturbed(example, example)
        perturbed = token_substitutes.with_tokens(example, substitutions)
        fields = dict(example.fields)
        (name,) = self.formatter.task.input_fields
        # The input as the model now reads it, for previews and predictions.
        span = perturbed.input_ids[where[0] : where[-1] + 1]
        fields[name] = self.tokenizer.decode(span).strip()
        prompt = self.tokenizer.decode(perturbed.input_ids[: perturbed.prompt_length])
        perturbed = replace(perturbed, prompt=prompt, fields=fields, perturbation=method)
        return Perturbed(example, perturbed)

    def training_batches(
        self,
        step: int,
        indices: list[list[int]],
        batches: list[list[data.Example]],
        calls: ModelCalls = ALONE,
    ) -> tuple[list[list[int]], list[list[data.Example]]]:
        """The step's micro-batches as trained on, with the example index of each row.

        replace: perturbed examples take their clean ones' places; add: they join their
        micro-batch after the clean examples. Every process has as many micro-batches (the
        accumulation), so where the processes attack together they do so micro-batch by
        micro-batch.
        """
        new_indices, new_batches = [], []
        for batch_indices, batch in zip(indices, batches, strict=True):
            perturbed = self.perturb(step, batch_indices, batch, calls=calls)
            if self.settings.mode == "replace":
                new_indices.append(list(batch_indices))
                new_batches.append([item.example for item in perturbed])
                continue
            added = [
                (index, item.example)
                for index, item in zip(batch_indices, perturbed, strict=True)
                if item.method is not None
            ]
            new_indices.append(list(batch_indices) + [index for index, _ in added])
            new_batches.append(list(batch) + [example for _, example in added])
        return new_indices, new_batches


def refuse_unperturbable(datasets: data.Datasets) -> None:
    """Stop when any training source, the main one or one of `data.mix`, holds rows without
    one prompt to rewrite: a mixed conversation was re-encoded as its last prompt alone, its
    history and earlier answers lost."""
    for stats in [datasets.train.stats, *datasets.mixed]:
        data.refuse_perturbing(stats.format, stats.origin, "adversarial.augment")


def preview(
    recipe: schema.Recipe,
    count: int,
    precision: str,
    student: PreTrainedModel | PeftModel | None = None,
) -> list[Perturbed]:
    """The first `count` training rows, each perturbed by the recipe's methods in turn.

    Every row shown is perturbed (the probability is for training); the gradient method attacks
    the model as training starts: `student` (a distillation's student cut from its teacher),
    else the base model wearing a fresh adapter.
    """
    assert recipe.adversarial is not None
    assert recipe.adversarial.augment is not None
    settings = recipe.adversarial.augment
    model = student
    if needs_model(settings.methods) and model is None:
        loaded = models.load(recipe.model, recipe.adapter, precision)
        tokenizer, model = loaded.tokenizer, loaded.model
    else:
        tokenizer = models.load_tokenizer(recipe.model.name, recipe.model.revision)
    limited = recipe.data.model_copy(update={"max_train_rows": count})
    datasets = data.build(limited, tokenizer, recipe.train.seed)
    # Training refuses these rows: the preview must not show them perturbed.
    refuse_unperturbable(datasets)
    formatter = data.TaskFormatter(recipe.data, datasets.labels)
    augmenter = Augmenter(settings, formatter, tokenizer, model, recipe.train.seed, precision)
    examples = datasets.train.examples[:count]
    methods: list[str | None] = [
        settings.methods[i % len(settings.methods)] for i in range(len(examples))
    ]
    return augmenter.perturb(0, list(range(len(examples))), examples, methods)


def input_fields(recipe: schema.Recipe) -> tuple[str, ...]:
    """The task fields that perturbations change."""
    return TASKS[recipe.data.task].input_fields
