"""Robustness scores: the evaluation split scored again under perturbed inputs.

Each method of `evaluation.robustness` perturbs every example's input at each strength (the
budget), seeded by `evaluation.seed` and the example's place, so every system compared sees the
same character and word noise. The gradient method attacks the system being scored: its own
worst-case substitutions for the reference answer. The drop is the paired difference clean -
perturbed on the same examples, with its bootstrap interval.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from accelerate.utils import gather_object
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import data, schema, scoring
from llama_tune.adversarial.augment import Augmenter, attack_tables
from llama_tune.runtime import process_state
from llama_tune.scoring import own_rows


def as_example(
    example: scoring.EvalExample,
    formatter: data.TaskFormatter,
    tokenizer: PreTrainedTokenizerBase,
) -> data.Example:
    """An evaluation row as a training example: its prompt and first reference as target.

    The end-of-sequence token is left out of the target: scoring never reads it, so an attack
    that raised its loss would be wasted.
    """
    target_ids = list(example.target_ids)
    if target_ids and target_ids[-1] == tokenizer.eos_token_id:
        target_ids.pop()
    return data.Example(
        prompt=formatter.prompt(example.fields, tokenizer),
        target=example.references[0],
        input_ids=example.prompt_ids + target_ids,
        prompt_length=len(example.prompt_ids),
        row=example.row,
        fields=example.fields,
    )


def perturbed_set(
    eval_set: scoring.EvalSet,
    augmenter: Augmenter,
    method: str,
    batch_size: int,
    shared: bool = False,
) -> tuple[scoring.EvalSet, int]:
    """A copy of `eval_set` with every input perturbed by `method`; and how many changed.

    With `shared`, each process of a launched run perturbs the rows it will score
    (`scoring.own_rows`), and the processes exchange them: no row is attacked twice, and each
    scores the very input it made (GPU kernels need not break near-ties alike everywhere).
    """
    examples = [as_example(e, augmenter.formatter, augmenter.tokenizer) for e in eval_set.examples]
    (field,) = augmenter.formatter.task.input_fields
    rows = own_rows(len(examples), shared)
    made = []
    # Batches bound the memory of the gradient attack, which runs a batch at a time.
    starts = range(0, len(rows), batch_size)
    quiet = shared and not process_state().is_main_process
    for start in tqdm(
        starts, desc=f"perturb ({method})", unit="batch", dynamic_ncols=True, disable=quiet
    ):
        indices = list(rows[start : start + batch_size])
        batch = [examples[index] for index in indices]
        for index, item in zip(
            indices, augmenter.perturb(0, indices, batch, [method] * len(batch)), strict=True
        ):
            prompt_ids = item.example.input_ids[: item.example.prompt_length]
            made.append((index, item.example.fields[field], prompt_ids, item.method is not None))
    if shared:
        made = gather_object(made)
    perturbed_examples = list(eval_set.examples)
    for index, text, prompt_ids, _ in made:
        perturbed_examples[index] = dataclasses.replace(
            eval_set.examples[index],
            input=text,
            prompt_ids=prompt_ids,
            prediction="",
            score=0.0,
            label_logprobs=None,
        )
    changed = sum(was_changed for *_, was_changed in made)
    return dataclasses.replace(eval_set, examples=perturbed_examples), changed


def measure(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: schema.Recipe,
    eval_set: scoring.EvalSet,
    clean: scoring.Scores,
    precision: str,
    shared: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one record per method and strength, the perturbed predictions) for one system.

    With `shared`, the processes of a launched run split the perturbing and the scoring of the
    rows (`perturbed_set`, `scoring.predict`).
    """
    settings = recipe.evaluation
    robustness = settings.robustness
    assert robustness is not None
    formatter = data.TaskFormatter(recipe.data, eval_set.labels, strict_labels=False)
    # Made once for every method and strength (the training split may be large).
    methods, candidates = robustness.methods, robustness.gradient_candidates
    tables = attack_tables(methods, candidates, model, tokenizer, formatter)
    records, predictions = [], []
    count = len(eval_set.examples)
    for method in robustness.methods:
        for strength in robustness.strengths:
            augment = schema.AugmentConfig(
                methods=[method],
                probability=1.0,
                budget=strength,
                neighbours=robustness.neighbours,
                gradient_candidates=robustness.gradient_candidates,
            )
            augmenter = Augmenter(
                augment, formatter, tokenizer, model, settings.seed, precision, tables
            )
            perturbed, changed = perturbed_set(
                eval_set, augmenter, method, settings.batch_size, shared
            )
            seconds = scoring.predict(
                model,
                tokenizer,
                recipe,
                perturbed,
                precision,
                f"score ({method} {strength})",
                shared,
            )
            scores = scoring.score(perturbed, recipe.data.task, settings)
            records.append(
                {
                    "method": method,
                    "strength": strength,
                    "changed": changed,
                    "metrics": {name: value.as_dict() for name, value in scores.intervals.items()},
                    "drop": scoring.compare(clean, scores, count, settings),
                    "seconds": seconds,
                }
            )
            predictions += [
                {
                    "method": method,
                    "strength": strength,
                    "row": example.row,
                    "input": example.input,
                    "reference": example.references[0],
                    "prediction": example.prediction,
                    "score": example.score,
                }
                for example in perturbed.examples
            ]
    return records, predictions
