"""Recall: of the texts of a class, the fraction predicted as it (tp / (tp + fn)).

average="macro" (default) is the unweighted mean over the classes seen in predictions or references; "binary" is the
recall of `pos_label` alone. A class with no reference texts has recall 0 (as scikit-learn's zero_division=0).
"""

import datasets
import evaluate


class Recall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="tp / (tp + fn), per class, then averaged.",
            citation="",
            inputs_description="predictions, references: integer labels; average: 'macro' or 'binary'; pos_label.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", pos_label=1):
        classes = [pos_label] if average == "binary" else sorted(set(predictions) | set(references))
        scores = []
        for c in classes:
            actual = [p for p, r in zip(predictions, references) if r == c]
            scores.append(sum(p == c for p in actual) / len(actual) if actual else 0.0)
        return {"recall": sum(scores) / len(scores)}
