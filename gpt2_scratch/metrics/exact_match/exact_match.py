"""Exact match after normalisation: the fraction of responses equal to their reference.

Normalising forgives what a reader would not call a different answer: surrounding whitespace, runs of spaces, and
(unless `ignore_case=False`) letter case; a final full stop is dropped when `ignore_final_period` (default True).
"""

import re

import datasets
import evaluate


def normalise(text, ignore_case, ignore_final_period):
    text = re.sub(r"\s+", " ", text).strip()
    if ignore_final_period and text.endswith("."):
        text = text[:-1].rstrip()
    return text.lower() if ignore_case else text


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference after whitespace/case normalisation.",
            citation="",
            inputs_description="predictions, references: lists of strings of the same length.",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=True, ignore_final_period=True):
        if not references:
            raise ValueError("exact match of an empty list is undefined")
        hits = sum(normalise(p, ignore_case, ignore_final_period) == normalise(r, ignore_case, ignore_final_period)
                   for p, r in zip(predictions, references))
        return {"exact_match": hits / len(references)}
