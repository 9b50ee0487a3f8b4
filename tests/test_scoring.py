"""Scoring: label likelihood, generation, metric modules against their libraries, intervals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from transformers import AutoModelForCausalLM

from conftest import TEST_DATA
from llama_tune import config, data, evaluation, inference, metrics, models, scoring, train


@pytest.mark.parametrize("labels_at_once", ["all", "one"])
def test_label_logprobs_equal_full_sequence_scoring(
    tiny_model_dir: Path, tokenizer, monkeypatch: pytest.MonkeyPatch, labels_at_once: str
) -> None:
    # One label at a time: each runs against its own copy of the prompts' cache.
    if labels_at_once == "one":
        monkeypatch.setattr(inference, "LABEL_ROW_TOKENS", 1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [
        tokenizer("Review: a great film.\nLabel:")["input_ids"],
        tokenizer("Review: dull and far, far too long for anyone.\nLabel:")["input_ids"],
    ]
    labels = ["positive", "very mixed feelings", "negative", "not sure"]
    label_ids = inference.label_token_ids(tokenizer, labels, False)
    assert max(len(ids) for ids in label_ids) > 1
    fast = inference.label_logprobs(model, prompts, label_ids, tokenizer.pad_token_id)
    for p, prompt in enumerate(prompts):
        for j, ids in enumerate(label_ids):
            sequence = torch.tensor([prompt + ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(sequence).logits[0].float(), dim=-1)
            expected = sum(logprobs[len(prompt) - 1 + k, token] for k, token in enumerate(ids))
            assert fast[p, j].item() == pytest.approx(expected.item(), abs=1e-4)


def test_classification_module_matches_scikit_learn() -> None:
    references = ["a", "b", "c", "a", "b", "a", "c", "c"]
    predictions = ["a", "b", "a", "a", "c", "b", "c", "c"]
    result = metrics.load("classification").compute(
        predictions=predictions, references=references, labels=["a", "b", "c"]
    )
    assert result["accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert result["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"))
    assert result["confusion_matrix"] == confusion_matrix(references, predictions).tolist()
    assert result["per_class"]["c"]["support"] == 3


def test_rouge_module_matches_rouge_score_with_multiple_references() -> None:
    predictions = ["meeting confirmed for tuesday", "budget report due"]
    references = [["meeting confirmation", "tuesday meeting confirmed"], ["quarterly budget"]]
    result = metrics.load("rouge").compute(predictions=predictions, references=references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = numpy.mean(
            [
                max(scorer.score(ref, pred)[name].fmeasure for ref in refs)
                for pred, refs in zip(predictions, references, strict=True)
            ]
        )
        assert result[name] == pytest.approx(expected)


def test_bleu_chrf_module_matches_sacrebleu() -> None:
    predictions = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee."]
    references = [["Ein Mann fährt ein Fahrrad."], ["Zwei Hunde spielen draußen im Schnee."]]
    result = metrics.load("bleu_chrf").compute(predictions=predictions, references=references)
    streams = [[refs[0] for refs in references]]
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, streams).score)
    assert result["bleu_signature"].startswith("nrefs:1|")
    # The bootstrap statistic on every example is the corpus score itself.
    statistic = scoring.sacrebleu_statistic(sacrebleu.metrics.BLEU(), predictions, references)
    assert statistic(numpy.arange(2)) == pytest.approx(result["bleu"])


def _two_row_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "two"
    folder.mkdir()
    rows = [
        {"text": "the film was a joy from start to end", "label": "positive"},
        {"text": "a tedious and lifeless mess of a movie", "label": "negative"},
    ]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (folder / "train.jsonl").write_text(text)
    (folder / "test.jsonl").write_text(text + '{"text": "odd one", "label": "neutral"}\n')
    return folder


def test_label_scoring_learns_two_overfit_examples(tiny_recipe, tmp_path: Path) -> None:
    path = tiny_recipe(max_steps=30, batch_size=2, lr=1e-2, warmup_steps=0)
    folder = _two_row_folder(tmp_path)
    recipe = config.load(path, [f"data.source={folder}", "data.max_train_rows=null"])
    result = train.run(recipe, path)
    results = evaluation.run(result.run_dir, [f"data.source={folder}"], split="test", base=True)
    tuned = results["systems"]["tuned"]
    assert results["n"] == 3
    assert results["data"]["unknown_reference_labels"] == {"neutral": 1}
    assert tuned["metrics"]["accuracy"]["value"] == pytest.approx(2 / 3)
    assert set(results["differences"]["tuned - base"]) == {"accuracy", "macro_f1"}
    out = Path(results["output_dir"])
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["prediction"] for line in lines[:2]] == ["positive", "negative"]
    assert (out / "predictions-base.jsonl").is_file()
    markdown = (out / "report.md").read_text()
    assert "| tuned - base |" in markdown
    assert "'neutral': 1" in markdown
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 3
    for image in ("metrics.png", "loss_curves.png", "confusion_matrix.png"):
        assert (out / image).read_bytes().startswith(b"\x89PNG")


def test_generation_scores_summaries_with_intervals(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "summaries.yaml"
    path.write_text(
        json.dumps(
            {
                "model": {"name": str(tiny_model_dir)},
                "data": {
                    "source": str(TEST_DATA / "summaries"),
                    "task": "summarisation",
                    "max_length": 256,
                },
                "evaluation": {"max_new_tokens": 6, "batch_size": 4, "bootstrap_resamples": 50},
                "output": {"dir": str(tmp_path / "summaries")},
            }
        )
    )
    results = evaluation.run(path, split="validation", limit=6)
    base = results["systems"]["base"]
    assert results["n"] == 6
    assert set(base["metrics"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    lines = (Path(results["output_dir"]) / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(first["references"]) == 3
    mean_rouge_l = numpy.mean([json.loads(line)["score"] for line in lines])
    assert base["metrics"]["rougeL"]["value"] == pytest.approx(mean_rouge_l)


def test_empty_split_and_bad_references_are_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "fine", "label": "positive"}\n')
    (folder / "validation.jsonl").write_text("")
    (folder / "test.jsonl").write_text(
        '{"text": "fine", "label": "positive"}\n{"text": "meh", "label": ""}\n{"label": "x"}\n'
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(
        json.dumps(
            {
                "model": {"name": str(tiny_model_dir)},
                "data": {"source": str(folder), "task": "classification"},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    with pytest.raises(evaluation.EvaluationError, match=r"validation\.jsonl: no usable rows"):
        evaluation.run(path, split="validation")
    scored = evaluation.run(path, split="test")
    assert scored["n"] == 1
    assert scored["data"]["skipped"] == {"empty_field:label": 1, "missing_field:text": 1}
    results = (tmp_path / "run" / "evaluation" / "test" / "results.json").read_text()
    # Rows that cannot be scored are refused, and the earlier results kept.
    (folder / "test.jsonl").write_text('{"text": "meh", "label": ""}\n')
    with pytest.raises(evaluation.EvaluationError, match=r"skipped: empty_field:label 1"):
        evaluation.run(path, split="test")
    # GLUE's test splits hide their labels as -1.
    (folder / "test.jsonl").write_text('{"text": "fine", "label": -1}\n' * 2)
    with pytest.raises(data.DataError, match=r"no row is labelled .* \(found '-1' x2\)"):
        evaluation.run(path, split="test")
    assert (tmp_path / "run" / "evaluation" / "test" / "results.json").read_text() == results


def test_answer_scores_rouge_l_chrf_and_exact_match() -> None:
    predictions = ["The  cat sat.", "a dog", "nothing alike"]
    references = [["the cat sat."], ["A dog ran", "a DOG"], ["zebra"]]
    scores, rouge_l = scoring.answer_scores(predictions, references)
    values = scoring.point_values(scores, 3)
    assert values["exact_match"] == pytest.approx(2 / 3)
    expected_rouge = metrics.load("rouge").compute(predictions=predictions, references=references)
    assert values["rougeL"] == pytest.approx(expected_rouge["rougeL"])
    assert sum(rouge_l) / 3 == pytest.approx(expected_rouge["rougeL"])
    streams = [["the cat sat.", "A dog ran", "zebra"], ["the cat sat.", "a DOG", "zebra"]]
    chrf = sacrebleu.metrics.CHRF().corpus_score(predictions, streams)
    assert values["chrf"] == pytest.approx(chrf.score)


def test_a_generated_answer_ends_at_its_first_stop_string() -> None:
    assert inference.cut_at_stops("\n\n Paris.\nQuestion: next", ["\n"]) == "Paris."
    assert inference.cut_at_stops(" Paris.<|eot_id|>\n<|start", ["<|eot_id|>"]) == "Paris."
    assert inference.cut_at_stops(" Two\nlines.<|eot_id|>", ["<|eot_id|>"]) == "Two\nlines."
    assert inference.cut_at_stops(" no stop at all ", []) == "no stop at all"


def test_the_built_in_model_answers_chat_rows_within_the_turn(
    tmp_path: Path, data_root: Path
) -> None:
    path = tmp_path / "chat.yaml"
    source = data_root / "instruction" / "alpaca_en_demo_messages"
    recipe = {
        "data": {"source": str(source), "task": "instruction"},
        "evaluation": {"max_new_tokens": 48, "batch_size": 4, "bootstrap_resamples": 50},
        "output": {"dir": str(tmp_path / "chat")},
    }
    path.write_text(json.dumps(recipe))
    results = evaluation.run(path, limit=4)
    assert set(results["systems"]["base"]["metrics"]) == {"rougeL", "chrf", "exact_match"}
    lines = (Path(results["output_dir"]) / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line)["prediction"] for line in lines]
    assert all(predictions)
    assert not any("<|im" in prediction for prediction in predictions)
    assert results["systems"]["base"]["metrics"]["rougeL"]["value"] > 0.05


def test_answers_that_span_lines_are_not_cut_at_their_first(
    tiny_model_dir: Path, tmp_path: Path, data_root: Path
) -> None:
    # Real alpaca answers (lists, code) as prompt/completion rows under a plain template.
    with (data_root / "instruction" / "alpaca_en_demo" / "train.jsonl").open() as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(40), strict=False)]
    pairs = [{"prompt": row["instruction"], "completion": row["output"]} for row in rows]
    assert any("\n" in pair["completion"] for pair in pairs)
    folder = tmp_path / "pairs"
    folder.mkdir()
    lines = "".join(json.dumps(pair) + "\n" for pair in pairs)
    (folder / "train.jsonl").write_text(lines)
    (folder / "test.jsonl").write_text(lines)
    recipe = config.parse(
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {"source": str(folder), "task": "instruction"},
        },
        "recipe",
    )
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    assert scoring.load_eval_set(recipe, tokenizer, "test", None).stop_strings == []
    # Summaries stop at the line's end, unless a reference spans lines.
    summaries = tmp_path / "summaries"
    shutil.copytree(TEST_DATA / "summaries", summaries)
    settings = {"model": {"name": str(tiny_model_dir)}}
    recipe = config.parse(
        settings | {"data": {"source": str(summaries), "task": "summarisation"}}, "r"
    )
    assert scoring.load_eval_set(recipe, tokenizer, "validation", None).stop_strings == ["\n"]
    *first, last = (summaries / "validation.jsonl").read_text().splitlines()
    row = json.loads(last)
    row["references"] = ["first line\nsecond line"]
    (summaries / "validation.jsonl").write_text("\n".join([*first, json.dumps(row)]) + "\n")
    # The split's every row counts, not only those scored.
    assert scoring.load_eval_set(recipe, tokenizer, "validation", 1).stop_strings == []


def test_the_rows_a_validation_fraction_holds_out_are_the_ones_scored(
    tiny_recipe, tmp_path: Path, tokenizer
) -> None:
    # A source with a training split alone: validation metrics during training, the scores
    # after it and `evaluate --split validation` all read the rows training held out.
    source = tmp_path / "train-only"
    source.mkdir()
    shutil.copy(TEST_DATA / "sentiment" / "train.jsonl", source / "train.jsonl")
    path = tiny_recipe(max_steps=2, validation={"every": 2, "metric_rows": 4})
    overrides = [
        f"data.source={source}",
        "data.splits.validation_fraction=0.25",
        "train.seed=3",
        "evaluation.split=validation",
        "evaluation.after_training=true",
    ]
    recipe = config.load(path, overrides)
    held_out = data.build(recipe.data, tokenizer, seed=3).validation
    assert held_out is not None
    scored = scoring.load_eval_set(recipe, tokenizer, "validation", None)
    assert "held out: 16 of 64 rows, seed 3" in scored.origin
    assert [e.row for e in scored.examples] == [e.row for e in held_out.examples]
    # Training checks at its start that the split to score after it exists.
    run_dir = train.run(recipe, path).run_dir
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in line for line in logged)
    results = evaluation.run(run_dir, [], limit=None, base=False)
    assert results["n"] == 16
