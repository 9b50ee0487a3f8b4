"""Evaluation reports: report.md and a self-contained report.html with PNG plots.

A run's report shows its loss curves, every metric of every system scored with its interval,
the tuned - base difference, and for classification the confusion matrix. `compare` puts the
results of several runs side by side in one table and one chart.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt

from llama_tune import validation
from llama_tune.adversarial import paired_drops
from llama_tune.errors import UserError
from llama_tune.jsonfiles import read_json, read_jsonl
from llama_tune.run_folder import EVALUATION, LM_EVAL, METRICS, REPORT_HTML, REPORT_MD, RESULTS


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _records(metrics_path: Path) -> list[dict[str, Any]]:
    if not metrics_path.is_file():
        return []
    return read_jsonl(metrics_path)


def loss_plot(metrics_path: Path) -> bytes | None:
    """Training and validation loss against the step, from metrics.jsonl."""
    records = _records(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    validation = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*train, strict=True), label="train loss")
    if validation:
        axes.plot(*zip(*validation, strict=True), "o-", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("target-token cross-entropy")
    axes.legend()
    axes.grid(alpha=0.3)
    return _png(figure)


def validation_metric_plot(metrics_path: Path, best_step: int | None) -> bytes | None:
    """Task metrics on the validation subset against the step (validation.metric_rows)."""
    records = [r for r in _records(metrics_path) if "eval_loss" in r]
    names = sorted({key for r in records for key in r} - {"step", "eval_loss"})
    if not names:
        return None
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name in names:
        points = [(r["step"], r[name]) for r in records if name in r]
        axes.plot(*zip(*points, strict=True), "o-", label=name.removeprefix("eval_"))
    if best_step is not None:
        axes.axvline(best_step, color="grey", linestyle="--", label=f"best (step {best_step})")
    axes.set_xlabel("step")
    axes.set_ylabel("validation score")
    axes.legend()
    axes.grid(alpha=0.3)
    return _png(figure)


def metric_plot(series: dict[str, dict[str, dict[str, float]]]) -> bytes:
    """Bars of each metric for each named system, with their 95% interval as error bars."""
    systems = list(series)
    names = sorted({name for metrics in series.values() for name in metrics})
    figure, axes = plt.subplots(figsize=(max(4, 1.6 * len(names) * len(systems) / 2 + 2), 3.5))
    width = 0.8 / max(len(systems), 1)
    for offset, system in enumerate(systems):
        values, below, above, positions = [], [], [], []
        for index, name in enumerate(names):
            interval = series[system].get(name)
            if interval is None:
                continue
            positions.append(index + offset * width)
            values.append(interval["value"])
            below.append(interval["value"] - interval["low"])
            above.append(interval["high"] - interval["value"])
        axes.bar(positions, values, width, yerr=[below, above], capsize=4, label=system)
    axes.set_xticks([index + width * (len(systems) - 1) / 2 for index in range(len(names))])
    axes.set_xticklabels(names)
    axes.set_ylabel("score (95% interval)")
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    return _png(figure)


def confusion_plot(labels: list[str], matrix: list[list[int]]) -> bytes:
    """The confusion matrix: rows are references, columns predictions."""
    size = max(3, 0.6 * len(labels) + 1.5)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels=labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("reference")
    for row, counts in enumerate(matrix):
        for column, count in enumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center")
    return _png(figure)


def headline_metric(metrics: dict[str, Any]) -> str:
    """The metric robustness tables and charts show: ROUGE-L for summaries, else the first."""
    return "rougeL" if "rougeL" in metrics else next(iter(metrics))


def robustness_plot(series: dict[str, dict[str, Any]], metric: str) -> bytes:
    """The metric against perturbation strength, one panel per method, one line per system.

    `series` maps a system's label to its result (clean `metrics` and `robustness` records);
    strength 0 is the clean score. Error bars are the 95% intervals.
    """
    methods = list(dict.fromkeys(r["method"] for s in series.values() for r in s["robustness"]))
    figure, panels = plt.subplots(
        1, len(methods), figsize=(3.6 * len(methods) + 1, 3.4), sharey=True, squeeze=False
    )
    for axes, method in zip(panels[0], methods, strict=True):
        for label, result in series.items():
            points = [(0.0, result["metrics"][metric])] + [
                (record["strength"], record["metrics"][metric])
                for record in result["robustness"]
                if record["method"] == method
            ]
            strengths = [strength for strength, _ in points]
            values = [interval["value"] for _, interval in points]
            below = [interval["value"] - interval["low"] for _, interval in points]
            above = [interval["high"] - interval["value"] for _, interval in points]
            axes.errorbar(
                strengths, values, yerr=[below, above], marker="o", capsize=3, label=label
            )
        axes.set_title(method)
        axes.set_xlabel("strength (fraction changed)")
        axes.grid(alpha=0.3)
    panels[0][0].set_ylabel(f"{metric} (95% interval)")
    panels[0][-1].legend(fontsize="small")
    return _png(figure)


def robustness_section(
    series: dict[str, dict[str, Any]],
    row_scores: dict[str, paired_drops.RowScores | None],
    settings: dict[str, Any],
) -> Section | None:
    """Clean and perturbed scores and the drop of every system with robustness records, and
    each system's drop against the first one's, paired on the rows both scored.

    `row_scores` holds each label's per-row scores (None where its files are missing);
    `settings` the evaluation settings whose bootstrap resamples and seed the intervals use.
    """
    series = {label: result for label, result in series.items() if result.get("robustness")}
    if not series:
        return None
    metric = headline_metric(next(iter(series.values()))["metrics"])
    reference = next(iter(series))
    reference_scores = row_scores.get(reference)
    table = [
        [
            "system",
            "method",
            "strength",
            "inputs changed",
            metric,
            "drop (clean - perturbed)",
            "drop - first system's drop, in "
            f"{paired_drops.row_score_name(series[reference]['metrics'])} (rows)",
        ]
    ]
    for label, result in series.items():
        table.append([label, "clean", "0", "", format_interval(result["metrics"][metric]), "", ""])
        scores = row_scores.get(label)
        for record in result["robustness"]:
            versus = ""
            if label != reference and scores is not None and reference_scores is not None:
                difference = paired_drops.drop_difference(
                    scores,
                    reference_scores,
                    record["method"],
                    record["strength"],
                    settings["bootstrap_resamples"],
                    settings["seed"],
                )
                if difference is not None:
                    interval, rows = difference
                    versus = f"{format_interval(interval.as_dict())} ({rows})"
            table.append(
                [
                    label,
                    record["method"],
                    f"{record['strength']:g}",
                    str(record["changed"]),
                    format_interval(record["metrics"][metric]),
                    format_interval(record["drop"][metric]),
                    versus,
                ]
            )
    text = (
        "The split scored again with perturbed inputs (references unchanged). char and word "
        "noise is the same for every system; gradient attacks each system itself. Drops are "
        "paired on the same examples; each value with its 95% bootstrap interval. The last "
        f"column compares each system's drop with {reference}'s, paired on the rows both scored, "
        "in the mean of a per-row score (correctness for classification, ROUGE-L for summaries, "
        "sentence chrF for translation, whose corpus BLEU and chrF have no per-row value): "
        "below 0, the system loses less under that perturbation; an interval that excludes 0 "
        "is a clear difference even where the two drops' intervals overlap."
    )
    return ("Robustness", text, table, robustness_plot(series, metric))


def format_interval(interval: dict[str, float]) -> str:
    """`value [low, high]` with four decimals, as tables and the CLI show intervals."""
    return f"{interval['value']:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]"


def _metric_table(rows: dict[str, dict[str, dict[str, float]]]) -> list[list[str]]:
    names = sorted({name for metrics in rows.values() for name in metrics})
    table = [["", *names]]
    for row_name, metrics in rows.items():
        cells = (format_interval(metrics[name]) if name in metrics else "" for name in names)
        table.append([row_name, *cells])
    return table


def _markdown_table(table: list[list[str]]) -> str:
    def row_line(row: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

    lines = [row_line(table[0]), "|" + "---|" * len(table[0])]
    lines += [row_line(row) for row in table[1:]]
    return "\n".join(lines)


def _html_table(table: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in table[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table[1:]
    )
    return f"<table><tr>{head}</tr>{body}</table>"


Section = tuple[str, str, list[list[str]] | None, bytes | None]
"""(heading, text, table rows with a header row first, PNG bytes)."""


def _write(out_dir: Path, title: str, sections: list[Section]) -> None:
    """report.md (PNGs beside it) and report.html (PNGs embedded, self-contained)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = [f"# {title}"]
    page = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}</style>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, text, table, image in sections:
        markdown.append(f"\n## {heading}\n")
        page.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            markdown.append(f"{text}\n")
            page.append(f"<p>{html.escape(text)}</p>")
        if table is not None:
            markdown.append(_markdown_table(table))
            page.append(_html_table(table))
        if image is not None:
            name = heading.lower().replace(" ", "_") + ".png"
            (out_dir / name).write_bytes(image)
            markdown.append(f"\n![{heading}]({name})")
            encoded = base64.b64encode(image).decode()
            page.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{encoded}'>")
    (out_dir / REPORT_MD).write_text("\n".join(markdown) + "\n")
    (out_dir / REPORT_HTML).write_text("\n".join(page) + "\n")


def _size_and_speed(systems: dict[str, Any]) -> Section:
    """Parameters and scoring speed of each system; the student's speed-up over its teacher."""
    table = [["system", "parameters", "examples/s", "seconds"]]
    for name, result in systems.items():
        speed = result["examples_per_s"]
        table.append(
            [
                name,
                f"{result['parameters'] / 1e6:.1f} M",
                f"{speed:.1f}" if speed else "",
                f"{result['seconds']:.1f}",
            ]
        )
    text = "Scoring speed on this split, measured in this evaluation."
    student, teacher = systems.get("student"), systems.get("teacher")
    if student and teacher and student["examples_per_s"] and teacher["examples_per_s"]:
        text += (
            f" The student scores {student['examples_per_s'] / teacher['examples_per_s']:.2f}x"
            f" as fast as the teacher, with {student['parameters'] / teacher['parameters']:.0%}"
            " of its parameters."
        )
    return ("Size and speed", text, table, None)


SAMPLE_ANSWERS = 5
"""Rows whose generated answers a generation task's report shows beside the references."""
SAMPLE_CHARACTERS = 300
"""Longest text shown in one cell of the sample answers."""


def _excerpt(text: str) -> str:
    one_line = " / ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return one_line if len(one_line) <= SAMPLE_CHARACTERS else one_line[:SAMPLE_CHARACTERS] + "..."


def sample_answers(out_dir: Path, systems: list[str]) -> Section | None:
    """The first rows' input and reference beside each system's answer (generation tasks)."""
    answers = {}
    for index, name in enumerate(systems):
        path = out_dir / paired_drops.predictions_file(name, first=index == 0)
        if not path.is_file():
            return None
        answers[name] = read_jsonl(path)[:SAMPLE_ANSWERS]
    if not systems or not answers[systems[0]]:
        return None
    table = [["row", "input", "reference", *systems]]
    for position, first in enumerate(answers[systems[0]]):
        predictions = [_excerpt(answers[name][position]["prediction"]) for name in systems]
        table.append(
            [
                str(first["row"]),
                _excerpt(first["input"]),
                _excerpt(first["reference"]),
                *predictions,
            ]
        )
    text = f"The first {len(table) - 1} rows scored; line breaks shown as /, long texts cut."
    return ("Sample answers", text, table, None)


def write_run_report(out_dir: Path, results: dict[str, Any], run_dir: Path) -> None:
    """The report of one evaluation: data, metrics with intervals, loss curves, confusion."""
    systems = {name: result["metrics"] for name, result in results["systems"].items()}
    data = results["data"]
    summary = (
        f"Task {results['task']}, model {results['model']}, trained weights {results['weights']}; "
        f"{results['n']} examples of {data['origin']} scored, {data['rows_read']} read, "
        f"skipped: {data['skipped'] or 'none'}; reference labels outside the label set: "
        f"{data['unknown_reference_labels'] or 'none'}."
    )
    sections: list[Section] = [("Data", summary, None, None)]
    if systems:
        table = _metric_table(systems)
        for pair, difference in results.get("differences", {}).items():
            table += _metric_table({pair: difference})[1:]
        sections.append(
            ("Metrics", "Each value with its 95% bootstrap interval.", table, metric_plot(systems))
        )
    if systems:
        sections.append(_size_and_speed(results["systems"]))
    if results["task"] != "classification":
        samples = sample_answers(out_dir, list(results["systems"]))
        if samples is not None:
            sections.append(samples)
    row_scores = {
        name: paired_drops.load_row_scores(out_dir, name, first=index == 0)
        for index, name in enumerate(results["systems"])
    }
    robustness = robustness_section(results["systems"], row_scores, results["settings"])
    if robustness is not None:
        sections.append(robustness)
    curves = loss_plot(run_dir / METRICS)
    if curves is not None:
        sections.append(("Loss curves", "", None, curves))
    best = validation.best_record(run_dir)
    best_step = best["step"] if best else None
    during = validation_metric_plot(run_dir / METRICS, best_step)
    if during is not None:
        text = (
            f"Best adapter: step {best['step']}, {best['metric']} {best['value']:.4f}."
            if best
            else ""
        )
        sections.append(("Validation metrics during training", text, None, during))
    primary = next(iter(results["systems"].values()), None)
    if primary is not None and "confusion_matrix" in primary["details"]:
        details = primary["details"]
        plot = confusion_plot(details["labels"], details["confusion_matrix"])
        sections.append(
            ("Confusion matrix", f"{next(iter(systems))}: rows are references.", None, plot)
        )
    _write(out_dir, f"Evaluation of {run_dir.name} on {data['split']}", sections)


def evaluation_results(run: Path, split: str | None) -> list[Path]:
    """The results.json files `llama-tune evaluate` wrote in the run folder `run`: every
    split's, or `split`'s alone; where there are none, a UserError says what the run has.
    lm-eval's results, in a format of their own, are not among them."""
    scored = {
        path.parent.name: path
        for path in sorted((run / EVALUATION).glob(f"*/{RESULTS}"))
        if path.parent.name != LM_EVAL
    }
    if not scored:
        raise UserError(f"{run} has no evaluation results; run llama-tune evaluate first")
    if split is None:
        return list(scored.values())
    if split not in scored:
        raise UserError(f"{run} has no results for split '{split}' (it has: {', '.join(scored)})")
    return [scored[split]]


def run_labels(run_dirs: list[Path]) -> dict[Path, str]:
    """Each run folder's name, or where runs share it the shortest end of its path that no
    other run's ends with (`a/run`, `b/run`): rows are keyed by it, so one run's rows would
    replace another's of the same name."""
    parts = {run_dir: run_dir.resolve().parts for run_dir in run_dirs}
    # The same run named twice (`run`, `./run`) is one run, not two to tell apart.
    distinct = set(parts.values())
    labels = {}
    for run_dir, own in parts.items():
        length = next(
            length
            for length in range(1, len(own) + 1)
            if sum(other[-length:] == own[-length:] for other in distinct) == 1
        )
        labels[run_dir] = str(Path(*own[-length:]))
    return labels


def compare_runs(results_paths: list[Path], out_dir: Path) -> dict[str, dict[str, Any]]:
    """One table and one chart of several evaluations' metrics; returns the rows shown."""
    rows: dict[str, dict[str, Any]] = {}
    systems: dict[str, dict[str, Any]] = {}
    row_scores: dict[str, paired_drops.RowScores | None] = {}
    settings: dict[str, Any] = {}
    # A run named twice (run, ./run) is one evaluation.
    results_paths = list({path.resolve(): path for path in results_paths}.values())
    # Results sit in RUN/evaluation/SPLIT/results.json.
    labels = run_labels([path.parents[2] for path in results_paths])
    for path in results_paths:
        results = read_json(path)
        if not isinstance(results, dict) or not {"systems", "settings"} <= results.keys():
            raise UserError(f"{path}: not results written by llama-tune evaluate (no systems)")
        # The folder name says the split, and "-best" for the best adapter of a run.
        run_name, scored = labels[path.parents[2]], path.parent.name
        # The first run's bootstrap settings serve every comparison with it.
        settings = settings or results["settings"]
        for index, (system, result) in enumerate(results["systems"].items()):
            label = f"{run_name} ({system}, {scored})"
            rows[label] = result["metrics"]
            systems[label] = result
            row_scores[label] = paired_drops.load_row_scores(path.parent, system, first=index == 0)
    text = f"{len(results_paths)} evaluation(s); each value with its 95% bootstrap interval."
    sections: list[Section] = [
        ("Metrics", text, _metric_table(rows), metric_plot(rows) if rows else None)
    ]
    robustness = robustness_section(systems, row_scores, settings)
    if robustness is not None:
        sections.append(robustness)
    _write(out_dir, "Comparison of runs", sections)
    return rows
