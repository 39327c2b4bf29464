"""F1: per class the harmonic mean of precision and recall, 2·tp / (2·tp + fp + fn).

average="macro" (default) is the unweighted mean over the classes seen in predictions or references, so a rare class
counts as much as a common one; "binary" is the F1 of `pos_label` alone.
"""

import datasets
import evaluate


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="2 tp / (2 tp + fp + fn), per class, then averaged.",
            citation="",
            inputs_description="predictions, references: integer labels; average: 'macro' or 'binary'; pos_label.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", pos_label=1):
        classes = [pos_label] if average == "binary" else sorted(set(predictions) | set(references))
        scores = []
        for c in classes:
            tp = sum(p == c and r == c for p, r in zip(predictions, references))
            wrong = sum((p == c) != (r == c) for p, r in zip(predictions, references))  # fp + fn
            scores.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
        return {"f1": sum(scores) / len(scores)}
