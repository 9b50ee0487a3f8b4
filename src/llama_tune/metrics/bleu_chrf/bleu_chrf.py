"""Corpus BLEU and chrF (sacrebleu) with several references per example, and their signatures.

An offline `evaluate` metric module: load it with `evaluate.load(<this folder>)`.
"""

import datasets
import evaluate
import sacrebleu


def reference_streams(references):
    """sacrebleu takes one stream per reference position. Shorter lists repeat their first
    reference, which changes neither clipped n-gram counts, nor the closest reference length,
    nor the best chrF over references."""
    width = max(len(example) for example in references)
    padded = [list(example) + [example[0]] * (width - len(example)) for example in references]
    return [list(stream) for stream in zip(*padded, strict=True)]


class BleuChrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu corpus BLEU (13a tokenisation) and chrF.",
            citation=(
                "Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018; "
                "Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015."
            ),
            inputs_description="predictions: strings; references: lists of strings",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, tokenize="13a"):
        streams = reference_streams(references)
        bleu = sacrebleu.metrics.BLEU(tokenize=tokenize)
        chrf = sacrebleu.metrics.CHRF()
        bleu_score = bleu.corpus_score(list(predictions), streams)
        chrf_score = chrf.corpus_score(list(predictions), streams)
        return {
            "bleu": bleu_score.score,
            "bleu_precisions": list(bleu_score.precisions),
            "bleu_brevity_penalty": bleu_score.bp,
            "bleu_signature": str(bleu.get_signature()),
            "chrf": chrf_score.score,
            "chrf_signature": str(chrf.get_signature()),
        }
