"""training/finetune_classification.py end to end on tiny models: strategies, 2 processes, best weights, reloading
in a fresh process, bad input; the shipped metric modules; the rotten_tomatoes source."""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import (
    TWO_PROCESSES,
    assert_clear_failure,
    assert_ok,
    run_without_package,
    training_script,
)
from safetensors.torch import load_file
from transformers import AutoTokenizer

from gpt2_scratch.classification import (
    build_parser,
    classification_metrics,
    load_splits,
    predict,
    prepare_labelled,
    run,
)
from gpt2_scratch.metrics import load_metric
from gpt2_scratch.modeling_gpt2_scratch import GPT2ScratchForSequenceClassification

GOOD = ["good", "great", "fine", "lovely", "superb"]
BAD = ["bad", "awful", "dull", "poor", "boring"]
TRAIN = ["--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "2", "--seed", "3"]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def reviews(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(GOOD if positive else BAD)
        rows.append({"review": f"the play was {word} and the actors were {rng.choice(GOOD + BAD)} {i}",
                     "sentiment": "pos" if positive else "neg"})
    return rows


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", reviews(120))


def finetune(base: Path, data: Path, out: Path, *extra: str, launcher: list[str] | None = None):
    return training_script("finetune_classification.py", [
        "--model_name_or_path", str(base), "--train_file", str(data), "--text_column", "review",
        "--label_column", "sentiment", "--output_dir", str(out), *TRAIN, *extra], launcher)


def changed(base: Path, out: Path) -> set[str]:
    """Names of the transformer's tensors that fine-tuning changed."""
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    return {k for k in after if k in before and not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("strategy, expect_changed, expect_frozen", [
    (["--train_layers", "head"], set(), {"transformer.trf_blocks.1.att.W_query.weight"}),
    (["--train_layers", "last_block"], {"transformer.trf_blocks.1.ff.layers.0.weight", "transformer.final_norm.scale"},
     {"transformer.trf_blocks.0.att.W_query.weight", "transformer.tok_emb.weight"}),
    (["--train_layers", "last:2"], {"transformer.trf_blocks.0.att.W_query.weight"}, {"transformer.tok_emb.weight"}),
    (["--train_layers", "all"], {"transformer.tok_emb.weight", "transformer.trf_blocks.0.norm1.scale"}, set()),
    (["--lora", "--lora_r", "2"], {"transformer.trf_blocks.0.att.W_query.weight",
                                   "transformer.trf_blocks.1.ff.layers.2.weight"},
     {"transformer.tok_emb.weight", "transformer.trf_blocks.0.norm1.scale"}),
])
def test_each_strategy_trains_exactly_its_layers(base, labelled, tmp_path, strategy, expect_changed, expect_frozen):
    result = finetune(base, labelled, tmp_path, "--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "3",
                      *strategy)
    assert_ok(result)
    moved = changed(base, tmp_path)
    assert expect_changed <= moved and not (expect_frozen & moved), sorted(moved)
    if strategy[-1] == "head":
        assert moved == set()
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report) >= {"validation", "test"} and set(report["test"]) == {"loss", "accuracy", "precision",
                                                                           "recall", "f1"}
    for name in ("confusion_matrix.png", "loss_curve.png", "README.md", "tokenizer.json"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "best_model.pt").exists()
    assert "test split" in (tmp_path / "README.md").read_text()


def test_best_validation_weights_are_the_ones_saved_and_beat_the_majority_class(base, tmp_path):
    """15% of the training labels flipped, clean validation and test rows: the model learns the words first, then
    memorises the flipped rows, and its validation loss rises again after its best epoch. The saved model reproduces
    the best epoch's validation loss, not the last one's, and classifies the held-back test rows far better than
    the majority class."""
    rng = random.Random(4)
    train = [{**row, "sentiment": {"pos": "neg", "neg": "pos"}[row["sentiment"]]} if rng.random() < 0.15 else row
             for row in reviews(96, seed=1)]
    data = {name: write_csv(tmp_path / f"{name}.csv", rows)
            for name, rows in (("train", train), ("validation", reviews(16, seed=2)), ("test", reviews(16, seed=3)))}
    result = finetune(base, data["train"], tmp_path / "out", "--validation_file", str(data["validation"]),
                      "--test_file", str(data["test"]), "--num_train_epochs", "5", "--train_layers", "all",
                      "--metric_for_best_model", "loss", "--learning_rate", "1e-2")
    assert_ok(result)
    out = tmp_path / "out"
    report = json.loads((out / "metrics.json").read_text())
    losses = report["evaluations"]
    assert len(losses) == 5  # one per epoch
    best, last = min(losses, key=lambda h: h["eval/loss"]), losses[-1]
    assert best["step"] < last["step"] and last["eval/loss"] > best["eval/loss"] + 1e-3, losses  # best is not last
    assert report["best_step"] == best["step"] and report["validation"]["loss"] == pytest.approx(best["eval/loss"])
    # The saved model reproduces the kept validation loss: it holds the best weights, not the last ones.
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from gpt2_scratch.classification import tokenize_labelled

    args = argparse.Namespace(dataset_name=None, dataset_config_name=None, train_file=[str(data["train"])],
                              validation_file=[str(data["validation"])], test_file=[str(data["test"])],
                              text_column="review", label_column="sentiment", seed=3)
    splits, _ = prepare_labelled(load_splits(args), args)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenized = tokenize_labelled(splits, tokenizer, model.config.context_length, Accelerator(cpu=True))
    with torch.no_grad():
        metrics = classification_metrics(*predict(model, tokenized["validation"], DataCollatorWithPadding(tokenizer),
                                                  16, Accelerator(cpu=True)), "eval")
    assert metrics["eval/loss"] == pytest.approx(best["eval/loss"], abs=1e-5)
    # Learning: the held-back test rows (8 of each class) are classified far above the majority class's 50%.
    majority = max(splits["test"]["label"].count(label) for label in (0, 1)) / len(splits["test"])
    assert majority == 0.5 and report["test"]["accuracy"] >= majority + 0.3, report["test"]


def test_two_processes_with_accelerate_launch(base, labelled, tmp_path):
    result = finetune(base, labelled, tmp_path, "--max_steps", "4", "--save_steps", "2", "--lora",
                      launcher=TWO_PROCESSES)
    assert_ok(result)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["steps"] == 4
    assert (tmp_path / "checkpoint-4" / "random_states_1.pkl").is_file()


TEXTS = ["the play was good", "the play was dull and the actors were poor"]


def test_classifier_loads_in_a_fresh_process_with_pipeline(base, labelled, tmp_path):
    assert_ok(finetune(base, labelled, tmp_path, "--max_steps", "4"))
    result = run_without_package(
        f"""
        import json
        from transformers import AutoModelForSequenceClassification, pipeline
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert model.config.id2label == {{0: "neg", 1: "pos"}}, model.config.id2label
        classify = pipeline("text-classification", model={str(tmp_path)!r}, trust_remote_code=True, top_k=None)
        print("SCORES=" + json.dumps(classify({TEXTS!r})))
        """,
        cwd=tmp_path,
    )
    assert_ok(result)
    fresh = json.loads(result.stdout.split("SCORES=", 1)[1])
    # the same scores as the model in this process, for both labels of each text
    model = GPT2ScratchForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        for text, scores in zip(TEXTS, fresh):
            probabilities = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
            assert {s["label"]: s["score"] for s in scores} == {
                "neg": pytest.approx(probabilities[0].item(), abs=1e-6),
                "pos": pytest.approx(probabilities[1].item(), abs=1e-6)}, (text, scores)


def test_integer_labels_three_classes_and_given_splits(base, tmp_path):
    rows = [{"review": f"text {i} " + ["red", "green", "blue"][i % 3], "sentiment": i % 3} for i in range(60)]
    train = write_csv(tmp_path / "train.csv", rows[:40])
    validation = write_csv(tmp_path / "validation.csv", rows[40:50])
    test = write_csv(tmp_path / "test.csv", rows[50:])
    result = finetune(base, train, tmp_path / "out", "--max_steps", "2", "--validation_file", str(validation),
                      "--test_file", str(test), "--class_weights", "balanced")
    assert_ok(result)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1", "2": "2"}
    assert "rows: train 40, validation 10, test 10" in result.stdout


BAD_INPUT = {
    "unknown column": (lambda rows: rows, ["--label_column", "stars"], "no column 'stars'"),
    "one class": (lambda rows: [{**r, "sentiment": "pos"} for r in rows], [], "one class only ('pos')"),
    "empty text": (lambda rows: rows[:5] + [{**rows[5], "review": " "}] + rows[6:], [], "the first at row 5"),
    "bad strategy": (lambda rows: rows, ["--train_layers", "last:9"], "--train_layers last:9: use head"),
    "bad target": (lambda rows: rows, ["--lora", "--target_modules", "c_attn"], "--target_modules c_attn: no module"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_with_a_clear_message(base, tmp_path, case):
    edit, extra, message = BAD_INPUT[case]
    data = write_csv(tmp_path / "data.csv", edit(reviews(40)))
    with pytest.raises(ValueError, match=re.escape(message)):
        run(build_parser().parse_args(["--model_name_or_path", str(base), "--dataset", str(data), "--text_column",
                                       "review", "--label_column", "sentiment", "--output_dir", str(tmp_path / "out"),
                                       "--max_steps", "2", *extra]))
    assert not (tmp_path / "out" / "config.json").exists()


def test_validation_labels_unseen_in_training_exit_2_with_one_line(base, tmp_path):
    train = write_csv(tmp_path / "train.csv", reviews(20))
    validation = write_csv(tmp_path / "validation.csv", [{"review": "meh", "sentiment": "mixed"}])
    result = finetune(base, train, tmp_path / "out", "--max_steps", "2", "--validation_file", str(validation))
    assert_clear_failure(result, "labels ['mixed'] never occur in the training rows", tmp_path / "out")


def test_base_that_is_not_a_model_folder_is_refused(tmp_path, labelled):
    with pytest.raises(FileNotFoundError, match=re.escape("not a model folder (no config.json)")):
        run(build_parser().parse_args(["--model_name_or_path", str(tmp_path), "--dataset", str(labelled),
                                       "--output_dir", str(tmp_path / "out")]))


def test_metric_modules_against_hand_computed_values():
    predictions = [0, 1, 1, 2, 0, 2]
    references = [0, 1, 0, 2, 2, 1]
    # class 0: tp 1, fp 1, fn 1; class 1: tp 1, fp 1, fn 1; class 2: tp 1, fp 1, fn 1 → every per-class score 1/2.
    assert load_metric("accuracy").compute(predictions=predictions, references=references) == {"accuracy": 0.5}
    for name in ("precision", "recall", "f1"):
        assert load_metric(name).compute(predictions=predictions, references=references)[name] == pytest.approx(0.5)
    skewed_p, skewed_r = [1, 1, 1, 0], [1, 0, 0, 0]
    # positive: tp 1, fp 2, fn 0 → P 1/3, R 1, F1 1/2; negative: tp 1, fp 0, fn 2 → P 1, R 1/3, F1 1/2.
    assert load_metric("precision").compute(predictions=skewed_p, references=skewed_r, average="binary") == {
        "precision": pytest.approx(1 / 3)}
    assert load_metric("recall").compute(predictions=skewed_p, references=skewed_r)["recall"] == pytest.approx(2 / 3)
    assert load_metric("f1").compute(predictions=skewed_p, references=skewed_r)["f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        load_metric("bleu")


def test_rotten_tomatoes_source_is_a_clean_stratified_split():
    from gpt2_scratch.sources import rotten_tomatoes, rotten_tomatoes_text

    splits = rotten_tomatoes()
    sizes = {name: len(split) for name, split in splits.items()}
    assert sum(sizes.values()) == 12752 and sizes["train"] == 10201  # distinct fresh/rotten texts, 80/10/10
    texts = {name: set(split["text"]) for name, split in splits.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["validation"] & texts["test"])
    assert splits["train"].features["label"].names == ["negative", "positive"]
    for split in splits.values():
        assert sum(split["label"]) / len(split) == pytest.approx(0.578, abs=0.002)  # positive share kept
    corpus = rotten_tomatoes_text()  # domain-adaptive pretraining never sees a test text
    assert not (set(corpus["train"]["text"]) | set(corpus["validation"]["text"])) & texts["test"]


def test_an_unreachable_hub_dataset_is_one_clear_error(base, tmp_path):
    # HF_HUB_OFFLINE is set for tests: the Hub client fails as it would without a network.
    with pytest.raises(ValueError, match=re.escape("'someone/no-such-reviews' is not a named source (rotten_tomatoes) "
                                                   "or a local path, and loading it as a Hub dataset failed")):
        run(build_parser().parse_args(["--model_name_or_path", str(base), "--dataset", "someone/no-such-reviews",
                                       "--output_dir", str(tmp_path / "out")]))
