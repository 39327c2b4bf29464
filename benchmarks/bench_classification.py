"""Sentiment on `rotten_tomatoes` (test split): our GPT-2, pretrained and fine-tuned in 10 minutes each, against the
majority class and TF-IDF + logistic regression, all computed here on the same split.

    .venv/bin/python benchmarks/bench_classification.py     # ~17 minutes on 2 CPU cores

1. A 4,096-token BPE is trained on the classification train split.
2. Domain-adaptive pretraining: `training/pretrain.py --dataset_name rotten_tomatoes` (the train texts; validation texts
   are only scored; test texts never seen) with `REVIEWS_BASE` (6 x 192, context 128, AdamW: the base these numbers
   were measured with), steps fitted to `--pretrain_minutes`.
3. `training/finetune_classification.py` on that model: all layers, 2 epochs, best validation macro-F1 kept,
   hard-stopped by `--finetune_minutes`.
Tokenisation and data preparation are not counted in the budgets. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gpt2_scratch import GPT2ScratchConfig
from gpt2_scratch.cli import count_parameters
from gpt2_scratch.metrics import load_metric
from gpt2_scratch.pretraining import REVIEWS_BASE, recipe_arguments
from gpt2_scratch.sources import rotten_tomatoes
from gpt2_scratch.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def scores(predictions: list[int], labels: list[int]) -> tuple[float, float]:
    accuracy = load_metric("accuracy").compute(predictions=predictions, references=labels)["accuracy"]
    return accuracy, load_metric("f1").compute(predictions=predictions, references=labels, average="macro")["f1"]


def baselines(splits) -> list[tuple[str, float, float, float]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = splits["train"], splits["test"]
    majority = max(set(train["label"]), key=train["label"].count)
    rows = [("majority class", *scores([majority] * len(test), test["label"]), 0.0)]
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    features = vectorizer.fit_transform(train["text"])
    model = LogisticRegression(max_iter=2000, C=4.0).fit(features, train["label"])
    predictions = model.predict(vectorizer.transform(test["text"])).tolist()
    rows.append(("TF-IDF (1-2-grams) + logistic regression", *scores(predictions, test["label"]),
                 time.perf_counter() - start))
    return rows


def run(script: str, args: list[str]) -> None:
    command = [sys.executable, str(ROOT / "training" / script), *args]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def pretrain_review_model(out: Path, minutes: float) -> Path:
    """A 4,096-token BPE and a GPT-2 pretrained on the rotten_tomatoes train texts (`REVIEWS_BASE`), its steps
    fitted to `minutes` here."""
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer(rotten_tomatoes()["train"], 4096, show_progress=False).save_pretrained(tokenizer_dir)
    run("pretrain.py", ["--output_dir", str(out / "base"),
                        *recipe_arguments(REVIEWS_BASE, minutes, tokenizer_dir, dataset="rotten_tomatoes")])
    return out / "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain_minutes", type=float, default=10)
    parser.add_argument("--finetune_minutes", type=float, default=10)
    parser.add_argument("--finetune_epochs", type=float, default=2)
    parser.add_argument("--out", default="runs/bench_classification")
    args = parser.parse_args()
    out = Path(args.out)
    splits = rotten_tomatoes()
    rows = baselines(splits)
    pretrain_review_model(out, args.pretrain_minutes)
    run("finetune_classification.py", [
        "--model_name_or_path", str(out / "base"), "--output_dir", str(out / "classifier"), "--train_layers", "all",
        "--num_train_epochs", str(args.finetune_epochs), "--learning_rate", "3e-4", "--drop_rate", "0.1",
        "--warmup_steps", "50", "--max_train_minutes", str(args.finetune_minutes), "--seed", "1337"])
    report = json.loads((out / "classifier" / "metrics.json").read_text())
    pretrained = json.loads((out / "base" / "metrics.json").read_text())
    parameters = count_parameters(GPT2ScratchConfig.from_pretrained(out / "base"))
    rows.append((f"gpt2-scratch, {parameters / 1e6:.1f}M parameters ({pretrained['train_seconds'] / 60:.1f} min "
                 f"pretraining + {report['train_seconds'] / 60:.1f} min fine-tuning)", report["test"]["accuracy"],
                 report["test"]["f1"], pretrained["train_seconds"] + report["train_seconds"]))
    print(f"\nrotten_tomatoes test split ({len(splits['test'])} reviews)\n")
    print("| model | accuracy | macro-F1 | training time |")
    print("|---|---|---|---|")
    for name, accuracy, f1, seconds in rows:
        print(f"| {name} | {accuracy:.4f} | {f1:.4f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
