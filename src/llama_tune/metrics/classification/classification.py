"""Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (scikit-learn).

An offline `evaluate` metric module: load it with `evaluate.load(<this folder>)`.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy, macro-F1, per-class scores and confusion matrix.",
            citation="scikit-learn: Pedregosa et al., JMLR 12, 2011.",
            inputs_description="predictions and references: label strings; labels: label order",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, labels=None):
        labels = list(labels) if labels else sorted(set(references) | set(predictions))
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predictions, labels=labels, zero_division=0
        )
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1.mean()),
            "per_class": {
                label: {
                    "precision": float(precision[i]),
                    "recall": float(recall[i]),
                    "f1": float(f1[i]),
                    "support": int(support[i]),
                }
                for i, label in enumerate(labels)
            },
            "labels": labels,
            "confusion_matrix": confusion_matrix(references, predictions, labels=labels).tolist(),
        }
