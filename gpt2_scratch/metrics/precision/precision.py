"""Precision: of the texts predicted as a class, the fraction that belong to it (tp / (tp + fp)).

average="macro" (default) is the unweighted mean over the classes seen in predictions or references; "binary" is the
precision of `pos_label` alone. A class never predicted has precision 0 (as scikit-learn's zero_division=0).
"""

import datasets
import evaluate


class Precision(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="tp / (tp + fp), per class, then averaged.",
            citation="",
            inputs_description="predictions, references: integer labels; average: 'macro' or 'binary'; pos_label.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="macro", pos_label=1):
        classes = [pos_label] if average == "binary" else sorted(set(predictions) | set(references))
        scores = []
        for c in classes:
            predicted = [r for p, r in zip(predictions, references) if p == c]
            scores.append(sum(r == c for r in predicted) / len(predicted) if predicted else 0.0)
        return {"precision": sum(scores) / len(scores)}
