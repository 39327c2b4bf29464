"""ROUGE-L F-measure: overlap of the longest common subsequence of words (Lin, 2004), averaged over pairs.

Words are lower-cased runs of letters and digits (punctuation is not a word), as `rouge_score`'s default tokenizer.
For one pair: P = LCS / len(prediction), R = LCS / len(reference), F = 2PR / (P + R); both empty counts as 1.
"""

import re

import datasets
import evaluate


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a, b):
    previous = [0] * (len(b) + 1)  # one row of the dynamic-programming table is enough
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction, reference):
    p, r = words(prediction), words(reference)
    if not p and not r:
        return 1.0
    common = lcs_length(p, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean ROUGE-L F-measure over prediction/reference pairs.",
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions, references: lists of strings of the same length.",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("ROUGE-L of an empty list is undefined")
        return {"rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(references)}
