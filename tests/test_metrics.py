"""The shipped metric modules against values known by hand, `rouge_score` and scikit-learn: through `evaluate` as
the scripts load them, and as the modules' classes (which is how `make mutation` sees their code run)."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer
from sklearn import metrics as sklearn

from gpt2_scratch.metrics import load_metric
from gpt2_scratch.metrics.accuracy.accuracy import Accuracy
from gpt2_scratch.metrics.exact_match.exact_match import ExactMatch, normalise
from gpt2_scratch.metrics.f1.f1 import F1
from gpt2_scratch.metrics.precision.precision import Precision
from gpt2_scratch.metrics.recall.recall import Recall
from gpt2_scratch.metrics.rouge_l.rouge_l import RougeL, lcs_length, rouge_l, words


def test_exact_match_normalises_whitespace_case_and_a_final_full_stop():
    assert normalise("  The  cat\n sat. ", ignore_case=True, ignore_final_period=True) == "the cat sat"
    assert normalise("The cat sat .", ignore_case=False, ignore_final_period=True) == "The cat sat"
    assert normalise("The cat sat.", ignore_case=False, ignore_final_period=False) == "The cat sat."
    assert normalise("3.5", ignore_case=True, ignore_final_period=True) == "3.5"  # only a final stop goes
    predictions = ["Paris.", "paris", " 42 ", "Cats", "dog"]
    references = ["paris", "Paris", "42", "cats.", "dogs"]
    for metric in (load_metric("exact_match"), ExactMatch()):
        assert metric.compute(predictions=predictions, references=references) == {"exact_match": 4 / 5}
        assert metric.compute(predictions=predictions, references=references, ignore_case=False) == {
            "exact_match": 1 / 5}
        assert metric.compute(predictions=predictions, references=references, ignore_final_period=False) == {
            "exact_match": 2 / 5}
        assert metric.compute(predictions=["a"], references=["b"]) == {"exact_match": 0.0}
        with pytest.raises(ValueError, match="^exact match of an empty list is undefined$"):
            metric.compute(predictions=[], references=[])


def test_lcs_length_of_known_pairs():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (BCBA)
    assert lcs_length(list("AGGTAB"), list("GXTXAYB")) == 4  # GTAB
    assert lcs_length([], list("abc")) == lcs_length(list("abc"), []) == 0
    assert lcs_length(list("abc"), list("abc")) == 3 and lcs_length(list("abc"), list("cba")) == 1
    assert lcs_length(list("aab"), list("ab")) == 2 and lcs_length(list("ab"), list("aab")) == 2


def test_rouge_l_of_hand_computed_pairs():
    assert words("Hello, World! It's 42.") == ["hello", "world", "it", "s", "42"]
    # LCS "the cat on the mat": 5 of 6 words each way.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "b d": P 2/4, R 2/3, F = 2PR/(P+R) = 4/7.
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)
    assert rouge_l("b d e", "a b c d") == pytest.approx(4 / 7)
    assert rouge_l("Hello, world!", "hello world") == 1.0 and rouge_l("", "") == 1.0 and rouge_l("...", "") == 1.0
    assert rouge_l("", "some words") == 0.0 and rouge_l("cat", "dog") == 0.0
    for metric in (load_metric("rouge_l"), RougeL()):
        assert metric.compute(predictions=["a b c d", "x"], references=["b d e", "x"]) == {
            "rouge_l": pytest.approx((4 / 7 + 1) / 2)}
        with pytest.raises(ValueError, match="^ROUGE-L of an empty list is undefined$"):
            metric.compute(predictions=[], references=[])


PAIRS = [
    ("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the fox"),
    ("police killed the gunman", "the gunman police killed"),
    ("add 12 and 30 gives 42", "42"),
    ("Sort the words: apple, box, cat.", "apple, box, cat"),
    ("one two three four five", "five four three two one"),
    ("the the the", "the cat the"),
]


def test_rouge_l_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for prediction, reference in PAIRS:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)
    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    mean = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS) / len(PAIRS)
    assert load_metric("rouge_l").compute(predictions=predictions, references=references)["rouge_l"] == \
        pytest.approx(mean, abs=1e-12)


def test_classification_metrics_equal_scikit_learns():
    rng = random.Random(0)
    cases = [([0, 1, 1, 2, 0, 2], [0, 1, 0, 2, 2, 1]), ([1, 1, 1, 0], [1, 0, 0, 0]), ([0, 0, 0], [1, 1, 1]),
             ([2, 2, 0], [2, 1, 0])]  # class 1 never predicted: precision 0 for it (zero_division=0)
    cases += [([rng.randrange(4) for _ in range(30)], [rng.randrange(4) for _ in range(30)]) for _ in range(5)]
    for predictions, references in cases:
        assert Accuracy().compute(predictions=predictions, references=references) == {
            "accuracy": pytest.approx(sklearn.accuracy_score(references, predictions))}
        for name, metric, score in (("precision", Precision(), sklearn.precision_score),
                                    ("recall", Recall(), sklearn.recall_score), ("f1", F1(), sklearn.f1_score)):
            labels = sorted(set(predictions) | set(references))
            expected = score(references, predictions, average="macro", labels=labels, zero_division=0)
            assert metric.compute(predictions=predictions, references=references)[name] == pytest.approx(expected)
            [expected] = score(references, predictions, average=None, labels=[1], zero_division=0)
            assert metric.compute(predictions=predictions, references=references, average="binary")[name] == \
                pytest.approx(expected)  # the positive class is 1 unless given
            for positive in (1, 2):
                [expected] = score(references, predictions, average=None, labels=[positive], zero_division=0)
                assert metric.compute(predictions=predictions, references=references, average="binary",
                                      pos_label=positive)[name] == pytest.approx(expected), (name, positive)
    with pytest.raises(ValueError, match="^accuracy of an empty list is undefined$"):
        Accuracy().compute(predictions=[], references=[])


def test_an_unknown_metric_names_the_shipped_ones():
    with pytest.raises(ValueError) as error:
        load_metric("bleu")
    assert str(error.value) == ("unknown metric 'bleu'; shipped metrics: accuracy, exact_match, f1, precision, recall, "
                                "rouge_l")
