"""Task scoring: evaluation sets, predictions, per-example scores and metrics with intervals.

Classification predicts the most likely label (`inference.label_logprobs`); summarisation and
translation decode (`inference.generate`). Every headline metric carries a 95% bootstrap
interval, and two systems scored on the same rows get a paired difference.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy
import sacrebleu
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llama_tune import data, metrics
from llama_tune.inference import autocast_for, generate, label_logprobs, label_token_ids
from llama_tune.runtime import process_state
from llama_tune.schema import EvaluationConfig, Recipe
from llama_tune.uncertainty import Interval, Statistic, bootstrap, mean_of, paired_difference


@dataclass
class EvalExample:
    """One scored row: what went in, what was expected, what came out."""

    row: int
    input: str
    prompt_ids: list[int]
    references: list[str]
    prediction: str = ""
    score: float = 0.0
    """Per-example score: correctness (classification) or ROUGE-L / chrF (generation)."""
    label_logprobs: dict[str, float] | None = None
    fields: dict[str, str] = field(default_factory=dict)
    """The rendered row (input text, target, placeholders), for perturbing the input."""
    target_ids: list[int] = field(default_factory=list)
    """The first reference as target tokens (the loss a gradient attack raises)."""


@dataclass
class EvalSet:
    """The examples of the split being scored and what happened to its other rows."""

    origin: str
    examples: list[EvalExample]
    labels: list[str] | None
    rows_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    unknown_reference_labels: Counter[str] = field(default_factory=Counter)
    row_format: str | None = None
    """The format of the rows (instruction data), "fields" for a task's own."""
    stop_strings: list[str] = field(default_factory=list)
    """Where a generated answer ends besides the end-of-sequence token."""


def _references(values: dict[str, Any], target: str) -> list[str]:
    """The row's references: a non-empty `references` list column when present (AESLC)."""
    extra = values.get("references")
    if isinstance(extra, list):
        cleaned = [text.strip() for text in extra if isinstance(text, str) and text.strip()]
        if cleaned:
            return cleaned
    return [target]


def load_eval_set(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, split: str, limit: int | None
) -> EvalSet:
    """Read and render the split to score (`data.open_scored_split`); bad rows are counted,
    never silently dropped."""
    opened = data.open_scored_split(recipe.data, split, recipe.train.seed)
    if opened is None:
        raise data.DataError(f"data source {recipe.data.source} has no {split!r} split")
    origin, rows = opened
    labels = data.label_set(recipe.data)
    formatter = data.TaskFormatter(recipe.data, labels, strict_labels=False)
    eval_set = EvalSet(origin=origin, examples=[], labels=labels)
    # Scoring never stops on a bad row: every one is counted under its reason in the results.
    for rendered in data.rendered_rows(
        origin, rows, formatter, tokenizer, eval_set.skipped, strict=False
    ):
        target = rendered.fields[formatter.task.target_field]
        if labels is not None and target not in labels:
            eval_set.unknown_reference_labels[target] += 1
        assert rendered.row.values is not None
        eval_set.examples.append(
            EvalExample(
                row=rendered.row.number,
                input=rendered.fields[formatter.task.truncatable_field],
                prompt_ids=rendered.input_ids[: rendered.prompt_length],
                references=_references(rendered.row.values, target),
                fields=rendered.fields,
                target_ids=rendered.input_ids[rendered.prompt_length :],
            )
        )
        if limit is not None and len(eval_set.examples) >= limit:
            break
    eval_set.rows_read = len(eval_set.examples) + sum(eval_set.skipped.values())
    if labels is not None and eval_set.examples:
        _refuse_hidden_labels(eval_set)
    if formatter.row_format == "text":
        raise data.DataError(
            f"{origin}: plain-text rows have no answers to score; score a split of prompts and "
            "answers, or turn scoring off with data.splits.test: null"
        )
    multiline = formatter.task.name == "instruction" or _references_span_lines(
        eval_set.examples, rows, formatter
    )
    eval_set.stop_strings = formatter.stop_strings(tokenizer, multiline)
    eval_set.row_format = formatter.row_format
    return eval_set


def unscorable(eval_set: EvalSet) -> str | None:
    """What is wrong with a split that left no row to score, None when it has rows: refused
    before any model loads (and, for an evaluation after training, before training)."""
    if eval_set.examples:
        return None
    skipped = data.skip_reasons(eval_set.skipped) or "none"
    return f"{eval_set.origin}: no usable rows to score (skipped: {skipped})"


def _references_span_lines(
    examples: list[EvalExample], unread: Iterator[data.RawRow], formatter: data.TaskFormatter
) -> bool:
    """Whether a reference of the split spans lines: of its every row, not only those scored,
    so that where generation stops does not depend on how many are (--limit, metric_rows)."""
    if any("\n" in reference for example in examples for reference in example.references):
        return True
    column = formatter.column(formatter.task.target_field)
    for row in unread:
        values = row.values or {}
        texts = [values.get(column), *(values.get("references") or [])]
        if any(isinstance(text, str) and "\n" in text.strip() for text in texts):
            return True
    return False


def _refuse_hidden_labels(eval_set: EvalSet) -> None:
    """Stop when none of the rows is labelled with a label the run knows: a split whose labels
    are hidden (GLUE's test splits write -1) has nothing to score against."""
    unknown = eval_set.unknown_reference_labels
    if sum(unknown.values()) < len(eval_set.examples):
        return
    found = ", ".join(f"{label!r} x{count}" for label, count in unknown.most_common(5))
    raise data.DataError(
        f"{eval_set.origin}: no row is labelled with one of the labels {eval_set.labels} "
        f"(found {found}); a split with hidden labels cannot be scored: score another split"
    )


def length_sorted_batches(examples: list[EvalExample], size: int) -> Iterator[list[EvalExample]]:
    # Similar lengths together: less padding, fewer distinct shapes.
    ordered = sorted(examples, key=lambda example: len(example.prompt_ids))
    for start in range(0, len(ordered), size):
        yield ordered[start : start + size]


def predict(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    eval_set: EvalSet,
    precision: str,
    progress: str | None = None,
    shared: bool = False,
    synced: bool = False,
) -> float:
    """Fill in every example's prediction; returns the seconds spent.

    `progress` names a progress bar over the rows (none when None: training's probe). With
    `shared`, the processes of a launched run split the rows, every N-th to each, so that each
    row is predicted once, then exchange their predictions: every process ends with all of them.
    Every process must then call it, with the same rows. `synced` (with `shared`): the model's
    weights are spread over the processes (FSDP, ZeRO-3), so every forward needs all of them:
    each process runs as many batches as the busiest, and generation goes on until every
    process's batch is done.
    """
    state = process_state() if shared else None
    split = state is not None and state.num_processes > 1
    examples = eval_set.examples
    rows = own_rows(len(examples), shared)
    own = [examples[row] for row in rows]
    size = recipe.evaluation.batch_size
    batches = list(length_sorted_batches(own, size))
    if split and synced and examples:
        # Process 0 holds the most rows; the others repeat a copy of a row to keep up, its
        # prediction going nowhere.
        busiest = math.ceil(math.ceil(len(examples) / state.num_processes) / size)
        batches += [[dataclasses.replace(examples[0])]] * (busiest - len(batches))
    model.eval()
    started = time.perf_counter()
    bar = tqdm(
        total=sum(len(batch) for batch in batches),
        desc=progress,
        unit="row",
        disable=progress is None or (state is not None and not state.is_main_process),
        dynamic_ncols=True,
    )
    with autocast_for(model, precision), bar:
        _predict_rows(model, tokenizer, recipe, batches, eval_set, bar, split and synced)
    if split:
        _exchange_predictions(examples, rows)
    return time.perf_counter() - started


def own_rows(count: int, shared: bool) -> range:
    """The rows of `count` this process predicts: every N-th of a launched run's N processes
    when `shared`, else all."""
    if not shared:
        return range(count)
    state = process_state()
    return range(state.process_index, count, state.num_processes)


def _predict_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    batches: list[list[EvalExample]],
    eval_set: EvalSet,
    bar: tqdm,
    synced: bool,
) -> None:
    """Predict the examples of `batches`, some or all of `eval_set`'s; `synced`: generation
    runs until every process's batch is done."""
    settings = recipe.evaluation
    labels = eval_set.labels
    if labels is not None:
        label_ids = label_token_ids(tokenizer, labels, recipe.data.chat.template is not None)
        lengths = torch.tensor([len(ids) for ids in label_ids], dtype=torch.float)
        for batch in batches:
            scores = label_logprobs(
                model, [e.prompt_ids for e in batch], label_ids, tokenizer.pad_token_id
            ).cpu()
            ranked = scores / lengths if settings.length_normalise else scores
            for example, row_scores, ranking in zip(batch, scores, ranked, strict=True):
                example.prediction = labels[int(ranking.argmax())]
                example.label_logprobs = dict(zip(labels, row_scores.tolist(), strict=True))
            bar.update(len(batch))
        return
    for batch in batches:
        prompts = [e.prompt_ids for e in batch]
        texts = generate(model, tokenizer, prompts, settings, eval_set.stop_strings, synced)
        for example, text in zip(batch, texts, strict=True):
            example.prediction = text
        bar.update(len(batch))


def _exchange_predictions(examples: list[EvalExample], rows: range) -> None:
    """Give every process the predictions of every row, each made by one process (this one
    made `rows`)."""
    mine = [(row, examples[row].prediction, examples[row].label_logprobs) for row in rows]
    for row, prediction, logprobs in gather_object(mine):
        examples[row].prediction = prediction
        examples[row].label_logprobs = logprobs


# ------------------------------------------------------------------------------------- metrics


@dataclass
class Scores:
    """Headline metrics with intervals, the statistics behind them, and details."""

    intervals: dict[str, Interval]
    statistics: dict[str, Statistic]
    details: dict[str, Any]


def _macro_f1(references: numpy.ndarray, predictions: numpy.ndarray, count: int) -> Statistic:
    def statistic(indices: numpy.ndarray) -> float:
        truth, guess = references[indices], predictions[indices]
        f1 = []
        for label in range(count):
            true_positive = numpy.sum((truth == label) & (guess == label))
            denominator = numpy.sum(truth == label) + numpy.sum(guess == label)
            f1.append(2 * true_positive / denominator if denominator else 0.0)
        return float(numpy.mean(f1))

    return statistic


def classification_scores(eval_set: EvalSet) -> Scores:
    """Accuracy and macro-F1 with intervals, per-class scores and the confusion matrix."""
    assert eval_set.labels is not None
    examples = eval_set.examples
    predictions = [example.prediction for example in examples]
    references = [example.references[0] for example in examples]
    details = metrics.load("classification").compute(
        predictions=predictions, references=references, labels=eval_set.labels
    )
    correct = [float(p == r) for p, r in zip(predictions, references, strict=True)]
    for example, value in zip(examples, correct, strict=True):
        example.score = value
    # Unknown reference labels get index -1: never predicted, so always counted wrong.
    index = {label: i for i, label in enumerate(eval_set.labels)}
    truth = numpy.array([index.get(label, -1) for label in references])
    guess = numpy.array([index[label] for label in predictions])
    statistics = {
        "accuracy": mean_of(correct),
        "macro_f1": _macro_f1(truth, guess, len(eval_set.labels)),
    }
    return Scores(intervals={}, statistics=statistics, details=details)


def sacrebleu_statistic(
    metric: Any, predictions: list[str], references: list[list[str]]
) -> Statistic:
    # sacrebleu's per-sentence sufficient statistics (the same ones its own paired bootstrap
    # uses): a resample's corpus score is computed from their sum, as on the whole corpus.
    width = max(len(refs) for refs in references)
    padded = [refs + [refs[0]] * (width - len(refs)) for refs in references]
    streams = [list(stream) for stream in zip(*padded, strict=True)]
    stats = numpy.array(metric._extract_corpus_statistics(predictions, streams), dtype=float)
    return lambda indices: float(
        metric._compute_score_from_stats(stats[indices].sum(axis=0).tolist()).score
    )


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def answer_scores(
    predictions: list[str], references: list[list[str]]
) -> tuple[Scores, list[float]]:
    """Instruction and chat answers: ROUGE-L, chrF, and the share of answers that equal a
    reference up to case and spacing; and each answer's ROUGE-L (its per-example score)."""
    per_example = metrics.load("rouge").compute(
        predictions=predictions, references=references, per_example=True
    )["per_example"]
    chrf = sacrebleu.metrics.CHRF()
    exact = [
        float(_normalised(prediction) in {_normalised(text) for text in example_references})
        for prediction, example_references in zip(predictions, references, strict=True)
    ]
    statistics = {
        "rougeL": mean_of(per_example["rougeL"]),
        "chrf": sacrebleu_statistic(chrf, predictions, references),
        "exact_match": mean_of(exact),
    }
    return Scores(intervals={}, statistics=statistics, details={}), per_example["rougeL"]


def generation_scores(eval_set: EvalSet, task: str) -> Scores:
    """ROUGE (summarisation), BLEU and chrF (translation), or ROUGE-L, chrF and exact match
    (instruction), with intervals."""
    predictions = [example.prediction for example in eval_set.examples]
    references = [example.references for example in eval_set.examples]
    if task == "instruction":
        scores, rouge_l = answer_scores(predictions, references)
        for example, value in zip(eval_set.examples, rouge_l, strict=True):
            example.score = value
        return scores
    if task == "summarisation":
        result = metrics.load("rouge").compute(
            predictions=predictions, references=references, per_example=True
        )
        per_example = result.pop("per_example")
        for example, value in zip(eval_set.examples, per_example["rougeL"], strict=True):
            example.score = value
        statistics = {name: mean_of(values) for name, values in per_example.items()}
        return Scores(intervals={}, statistics=statistics, details=result)
    result = metrics.load("bleu_chrf").compute(predictions=predictions, references=references)
    chrf = sacrebleu.metrics.CHRF()
    for example in eval_set.examples:
        example.score = chrf.sentence_score(example.prediction, example.references).score
    statistics = {
        "bleu": sacrebleu_statistic(sacrebleu.metrics.BLEU(), predictions, references),
        "chrf": sacrebleu_statistic(chrf, predictions, references),
    }
    return Scores(intervals={}, statistics=statistics, details=result)


def measure(eval_set: EvalSet, task: str) -> Scores:
    """The task's metrics on predicted examples, without intervals yet."""
    if eval_set.labels is not None:
        return classification_scores(eval_set)
    return generation_scores(eval_set, task)


def point_values(scores: Scores, count: int) -> dict[str, float]:
    """Each metric on all `count` examples: the point estimate, no resampling."""
    every = numpy.arange(count)
    return {name: statistic(every) for name, statistic in scores.statistics.items()}


def score(eval_set: EvalSet, task: str, settings: EvaluationConfig) -> Scores:
    """The task's metrics on predicted examples, each with its bootstrap interval."""
    scores = measure(eval_set, task)
    count = len(eval_set.examples)
    scores.intervals = {
        name: bootstrap(statistic, count, settings.bootstrap_resamples, settings.seed)
        for name, statistic in scores.statistics.items()
    }
    return scores


def compare(tuned: Scores, base: Scores, count: int, settings: EvaluationConfig) -> dict:
    """Paired bootstrap interval of tuned - base for every shared metric."""
    return {
        name: paired_difference(
            tuned.statistics[name],
            base.statistics[name],
            count,
            settings.bootstrap_resamples,
            settings.seed,
        ).as_dict()
        for name in tuned.statistics
    }
