"""transformers' example-script data arguments (--dataset_name, --dataset_config_name, --train_file,
--validation_file, --test_file) in the three training scripts, with --dataset kept as the older spelling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpt2_scratch import classification, instruction, pretraining
from gpt2_scratch.data import check_data_arguments, training_corpus

PARSERS = {"pretrain": pretraining.build_parser, "classification": classification.build_parser,
           "instruction": instruction.build_parser}
REQUIRED = {"pretrain": ["--output_dir", "out"],
            "classification": ["--output_dir", "out", "--model_name_or_path", "base"],
            "instruction": ["--output_dir", "out", "--model_name_or_path", "base"]}
DEFAULTS = {"pretrain": "shakespeare", "classification": "rotten_tomatoes", "instruction": "tasks"}


def parse(script: str, *args: str):
    parsed = PARSERS[script]().parse_args([*REQUIRED[script], *args])
    check_data_arguments(parsed)
    return parsed


@pytest.mark.parametrize("script", list(PARSERS))
def test_each_script_takes_the_conventional_names_and_the_older_one(script, tmp_path):
    files = parse(script, "--train_file", "a.csv", "b.csv", "--validation_file", "v.csv", "--test_file", "t.csv")
    assert (files.train_file, files.validation_file, files.test_file) == (["a.csv", "b.csv"], ["v.csv"], ["t.csv"])
    assert files.dataset_name is None
    hub = parse(script, "--dataset_name", "someone/data", "--dataset_config_name", "small")
    assert (hub.dataset_name, hub.dataset_config_name, hub.train_file) == ("someone/data", "small", None)
    assert parse(script).dataset_name == DEFAULTS[script]
    assert parse(script, "--dataset", "someone/data").dataset_name == "someone/data"
    (tmp_path / "rows.csv").write_text("text\nx\n")
    older = parse(script, "--dataset", str(tmp_path / "rows.csv"))
    assert older.train_file == [str(tmp_path / "rows.csv")] and older.dataset_name is None
    assert "dataset" not in vars(older) and "default_dataset" not in vars(older)  # not recorded in the model card


@pytest.mark.parametrize("args, message", [
    (["--dataset_name", "someone/data", "--train_file", "a.csv"], "are two sources of training data; give one"),
    (["--dataset", "someone/data", "--train_file", "a.csv"], "--dataset is the older spelling"),
    (["--train_file", "a.csv", "--dataset_config_name", "small"], "--dataset_config_name chooses a configuration"),
])
def test_conflicting_data_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse("pretrain", *args)


def dataset_repository(path: Path) -> Path:
    """A dataset laid out as on the Hub (a README whose metadata declares two configurations), cloned to `path`:
    `datasets.load_dataset(path, config)` reads it as it reads the Hub repository."""
    blocks = []
    for config in ("small", "large"):
        for split in ("train", "validation", "test"):
            rows = [{"text": f"{config} {split} text {i}", "label": i % 2, "instruction": f"{config} {split} {i}?",
                     "output": f"answer {i}"} for i in range(20)]
            (path / config).mkdir(parents=True, exist_ok=True)
            (path / config / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        files = "".join(f"  - split: {split}\n    path: {config}/{split}.jsonl\n"
                        for split in ("train", "validation", "test"))
        blocks.append(f"- config_name: {config}\n  data_files:\n{files}")
    (path / "README.md").write_text("---\nconfigs:\n" + "".join(blocks) + "---\n")
    return path


def test_dataset_config_name_chooses_the_configuration_in_every_script(tmp_path):
    repository = str(dataset_repository(tmp_path / "repo"))
    chosen = ["--dataset_name", repository, "--dataset_config_name", "large"]
    corpus = training_corpus(parse("pretrain", *chosen))
    assert corpus["train"]["text"][0] == "large train text 0" and corpus["validation"]["text"][0].startswith("large")
    splits = classification.load_splits(parse("classification", *chosen))
    assert {split: rows["text"][0] for split, rows in splits.items()} == {
        "train": "large train text 0", "validation": "large validation text 0", "test": "large test text 0"}
    records = instruction.load_instructions(parse("instruction", *chosen))
    assert records["train"]["instruction"][0] == "large train 0?"
    assert records["test"]["instruction"][0] == "large test 0?"
    assert training_corpus(parse("pretrain", "--dataset_name", repository, "--dataset_config_name", "small"))[
        "train"]["text"][0] == "small train text 0"


def test_validation_and_test_files_replace_the_held_out_part(tmp_path):
    texts = {split: f"{split} text, line one.\n{split} line two.\n" for split in ("train", "validation", "test")}
    for split, text in texts.items():
        (tmp_path / f"{split}.txt").write_text(text)
    corpus = training_corpus(parse("pretrain", *[arg for split in texts for arg in
                                                 (f"--{split}_file", str(tmp_path / f"{split}.txt"))]))
    assert {split: list(rows["text"]) for split, rows in corpus.items()} == {s: [t] for s, t in texts.items()}
    held_out = training_corpus(parse("pretrain", "--train_file", str(tmp_path / "train.txt")))
    assert held_out["train"]["text"][0] + held_out["validation"]["text"][0] == texts["train"]  # split 90/10
