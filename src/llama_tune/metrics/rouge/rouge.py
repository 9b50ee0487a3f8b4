"""ROUGE-1/2/L/Lsum F1 (rouge-score, Porter stemming), best over several references.

An offline `evaluate` metric module: load it with `evaluate.load(<this folder>)`.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE F1, the mean over examples of the best score over references.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions: strings; references: lists of strings",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, use_stemmer=True, per_example=False):
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        scores = {rouge_type: [] for rouge_type in ROUGE_TYPES}
        for prediction, example_references in zip(predictions, references, strict=True):
            best = scorer.score_multi(example_references, prediction)
            for rouge_type in ROUGE_TYPES:
                scores[rouge_type].append(best[rouge_type].fmeasure)
        result = {name: sum(values) / max(len(values), 1) for name, values in scores.items()}
        if per_example:
            result["per_example"] = scores
        return result
