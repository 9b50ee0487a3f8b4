"""The model card (README.md) of a run published to the Hub.

Its YAML metadata is built with huggingface_hub's ModelCardData and EvalResult, so the Hub reads
it as it reads any card: the base model, library, pipeline, license, datasets, tags, and a
model-index entry per evaluated metric. The body says how the model was trained, shows tuned
against base results with their 95% intervals (and the robustness table when there is one),
how to load it, and what it cannot promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from llama_tune import models, schema
from llama_tune.report import format_interval, headline_metric

TASK_TYPES = {
    "classification": ("text-classification", "Text Classification"),
    "summarisation": ("summarization", "Summarization"),
    "translation": ("translation", "Translation"),
    "instruction": ("text-generation", "Text Generation"),
}
"""llama-tune task -> the Hub's task id and name for model-index entries."""


@dataclass
class Publication:
    """What the card describes: the run's recipe, summary and evaluation results."""

    repo_id: str
    recipe: schema.Recipe
    summary: dict[str, Any]
    results: list[dict[str, Any]]
    """results.json of each evaluated split."""
    merged: bool
    """Whether the repository holds merged weights rather than the adapter."""
    license: str | None
    """The base model's license, which the published weights inherit (None: unknown)."""
    harness_table: str | None = None
    """lm-evaluation-harness's table of the run's model, when `llama-tune lm-eval` ran."""


def _tags(recipe: schema.Recipe, merged: bool) -> list[str]:
    tags = ["llama-tune"]
    if recipe.adapter is not None:
        tags.append("qlora" if recipe.model.quantization == "4bit" else "lora")
    if merged:
        tags.append("merged")
    if recipe.distill is not None:
        tags.append("distillation")
    if recipe.adversarial is not None:
        tags.append("adversarial-training")
    return tags


def _dataset(recipe: schema.Recipe) -> str:
    """The training data's name: a Hub dataset's id, or a local folder's name."""
    source = recipe.data.source
    if isinstance(source, schema.HubSource):
        return source.hub
    return str(source).rstrip("/").rsplit("/", 1)[-1]


def eval_results(publication: Publication) -> list[EvalResult]:
    """One EvalResult per metric of the trained system on each evaluated split."""
    dataset = _dataset(publication.recipe)
    entries = []
    for results in publication.results:
        task_type, task_name = TASK_TYPES[results["task"]]
        trained = next(iter(results["systems"].values()), None)
        if trained is None:
            continue
        for metric, interval in trained["metrics"].items():
            entries.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split=results["data"]["split"],
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=round(interval["value"], 4),
                )
            )
    return entries


def card_data(publication: Publication) -> ModelCardData:
    """The card's metadata, as the Hub validates it."""
    recipe = publication.recipe
    base_name, _revision = models.portable_base(recipe.model)
    results = eval_results(publication)
    return ModelCardData(
        model_name=publication.repo_id.split("/")[-1],
        # The Hub takes a Hub id here; a local folder is named in the body only.
        base_model=None if Path(base_name).expanduser().is_dir() else base_name,
        library_name="transformers" if publication.merged or recipe.adapter is None else "peft",
        pipeline_tag="text-generation",
        license=publication.license,
        datasets=[_dataset(recipe)] if isinstance(recipe.data.source, schema.HubSource) else None,
        tags=_tags(recipe, publication.merged),
        eval_results=results or None,
    )


def _results_section(results: dict[str, Any]) -> list[str]:
    split, count = results["data"]["split"], results["n"]
    lines = [f"### {results['task']} on `{split}` ({count} examples)", ""]
    names = sorted({name for system in results["systems"].values() for name in system["metrics"]})
    lines += ["| system | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for system, result in results["systems"].items():
        cells = (format_interval(result["metrics"][name]) for name in names)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    for pair, difference in results.get("differences", {}).items():
        shown = ", ".join(f"{name} {format_interval(v)}" for name, v in difference.items())
        lines.append(f"\nPaired difference {pair}: {shown}.")
    return [*lines, "", *_robustness_table(results)]


def _robustness_table(results: dict[str, Any]) -> list[str]:
    """Each system's score under each perturbation and its drop from the clean score."""
    scored = {
        name: result for name, result in results["systems"].items() if result.get("robustness")
    }
    if not scored:
        return []
    metric = headline_metric(next(iter(scored.values()))["metrics"])
    lines = [
        f"Robustness ({metric} with perturbed inputs; drop = clean - perturbed, paired):",
        "",
        f"| system | method | strength | inputs changed | {metric} | drop |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in scored.items():
        for record in result["robustness"]:
            lines.append(
                f"| {name} | {record['method']} | {record['strength']:g} | {record['changed']} "
                f"| {format_interval(record['metrics'][metric])} "
                f"| {format_interval(record['drop'][metric])} |"
            )
    return [*lines, ""]


def _training_section(publication: Publication) -> list[str]:
    recipe, summary = publication.recipe, publication.summary
    base_name, revision = models.portable_base(recipe.model)
    adapter = recipe.adapter
    method = "full fine-tuning" if adapter is None else f"LoRA r={adapter.r}, alpha={adapter.alpha}"
    if adapter is not None and recipe.model.quantization == "4bit":
        method = "Q" + method + " on an NF4 base"
    weights = (summary.get("base_model") or {}).get("weights")
    lines = [
        "## Training",
        "",
        f"- Base model: `{base_name}`" + (f" at revision `{revision}`" if revision else ""),
        f"- Method: {method}; task `{recipe.data.task}` on `{_dataset(recipe)}`",
        f"- Steps: {summary.get('steps')}, batch {recipe.train.batch_size} x "
        f"{recipe.train.grad_accumulation} accumulation, learning rate {recipe.train.lr}, "
        f"precision {PRECISION_NAMES.get(summary.get('precision'), summary.get('precision'))}",
        f"- Time: {summary.get('train_seconds', 0):.0f} s on {summary.get('device')}",
    ]
    if weights:
        lines.append(f"- The base weights trained on were {weights}.")
    return [*lines, ""]


def _usage_section(publication: Publication) -> list[str]:
    repo_id = publication.repo_id
    base_name, _ = models.portable_base(publication.recipe.model)
    if publication.merged or publication.recipe.adapter is None:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        ]
    else:
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'base = AutoModelForCausalLM.from_pretrained("{base_name}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        ]
    return ["## How to load it", "", "```python", *code, "```", ""]


PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
"""Accelerate's mixed-precision names as a reader knows them."""

LIMITATIONS = (
    "## Limitations\n\n"
    "The results above hold for the evaluated split and prompt only, with the intervals shown "
    "(95%, bootstrap over examples); other data, prompts or decoding settings can score "
    "differently. The model inherits the biases and failure modes of its base model and of its "
    "training data, and was not evaluated for safety. `recipe.yaml` in this repository is the "
    "exact recipe it was trained with.\n"
)


def build(publication: Publication) -> ModelCard:
    """The whole card: metadata and body."""
    title = [f"# {publication.repo_id.split('/')[-1]}", ""]
    intro = [f"Trained with llama-tune from `{publication.recipe.model.name}`.", ""]
    body = [*title, *intro, *_training_section(publication), "## Results", ""]
    if not publication.results:
        body += ["Not evaluated: run `llama-tune evaluate RUN --base` before pushing.", ""]
    for results in publication.results:
        body += _results_section(results)
    if publication.harness_table is not None:
        body += ["### lm-evaluation-harness", "", publication.harness_table, ""]
    body += _usage_section(publication)
    metadata = card_data(publication).to_yaml()
    content = f"---\n{metadata}\n---\n\n" + "\n".join(body) + "\n" + LIMITATIONS
    return ModelCard(content)
