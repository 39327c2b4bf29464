"""Fine-tuning a GPT-2 as a text classifier: what `training/finetune_classification.py` runs.

labelled texts (named source, local files or Hub) → label names and ids → tokens, truncated to the context →
`GPT2ScratchForSequenceClassification` from a causal-LM folder, with some layers frozen or LoRA → `TrainingLoop`
(validation every epoch, best weights kept) → test metrics, a confusion matrix and a Hub-ready folder.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from peft import get_peft_model
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, set_seed

from .data import add_data_arguments, check_data_arguments, data_name, data_stem, load_hub_dataset, local_files_of
from .files import staged_output
from .hub import push_folder, render_model_card, save_confusion_matrix, save_loss_curve
from .loading import check_source, load_model, load_tokenizer
from .lora import add_lora_arguments, check_target_modules, lora_config, trainable_summary
from .metrics import load_metric
from .modeling_gpt2_scratch import GPT2ScratchForSequenceClassification
from .sources import LABELLED, stratified_split
from .tokenizer import with_stock_settings
from .training import (
    BEST_MODEL,
    ArgumentParser,
    TrainingLoop,
    add_training_arguments,
    check_training_arguments,
    describe_run,
    make_accelerator,
    public_arguments,
)

TRAIN_LAYERS = re.compile(r"^(head|last_block|all|last:(\d+))$")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Fine-tune a GPT-2 text classifier with Accelerate.")
    data = add_data_arguments(parser, "rotten_tomatoes", LABELLED,
                              ".csv/.json/.jsonl/.parquet files or folders of labelled rows; without validation/test "
                              "splits, a seeded stratified 80/10/10 split is made")
    data.add_argument("--text_column", default="text")
    data.add_argument("--label_column", default="label", help="string or integer labels, two or more classes")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", required=True,
                       help="a causal-LM folder saved by gpt2-scratch, a stock GPT-2 folder, or a Hub id such as "
                            "openai-community/gpt2 (OpenAI's weights, converted on load)")
    model.add_argument("--tokenizer", default=None,
                       help="a tokenizer folder or Hub id (default: the one of --model_name_or_path)")
    model.add_argument("--train_layers", default="last_block",
                       help="head | last_block (last block, final norm and head) | last:K | all")
    model.add_argument("--lora", action="store_true",
                       help="LoRA adapters on every block plus a trainable head (replaces --train_layers); the saved "
                            "model has the adapters merged in")
    model.add_argument("--class_weights", choices=["none", "balanced"], default="none",
                       help="balanced: weight each class's loss by n / (classes x its count), for imbalanced data")
    model.add_argument("--drop_rate", type=float, default=None, help="dropout while fine-tuning (default: the base's)")
    model.add_argument("--license", default="mit", help="licence recorded in the model card")
    add_lora_arguments(parser)
    add_training_arguments(parser)
    parser.set_defaults(eval_strategy="epoch", metric_for_best_model="f1", num_train_epochs=3.0,
                        learning_rate=5e-4, weight_decay=0.01, per_device_train_batch_size=16, logging_steps=20)
    return parser


def read_split(specs: list[str], where: str) -> Dataset:
    builder, files = local_files_of(specs, where)
    if builder == "text":
        raise ValueError(f"{where}: give .csv, .json, .jsonl or .parquet files of one kind (labelled rows), got "
                         f"{', '.join(specs)}")
    return load_dataset(builder, data_files=[str(f) for f in files], split="train")


def load_splits(args: argparse.Namespace) -> DatasetDict:
    """train (and validation, test if the data has them) with the raw text and label columns."""
    name = args.dataset_name
    if name in LABELLED:
        if args.dataset_config_name:
            raise ValueError(f"the named source {name} has no configurations; drop --dataset_config_name")
        splits = LABELLED[name]()
    elif name:
        splits = load_hub_dataset(name, f"a named source ({', '.join(LABELLED)}) or a local path",
                                  args.dataset_config_name)
        splits = DatasetDict({split: splits[split] for split in ("train", "validation", "test") if split in splits})
        if "train" not in splits:
            raise ValueError(f"Hub dataset {name} has no train split")
    else:
        splits = DatasetDict(train=read_split(args.train_file, "--train_file"))
    for split, specs in (("validation", args.validation_file), ("test", args.test_file)):
        if specs:
            splits[split] = read_split(specs, f"--{split}_file")
    return splits


def label_names(train: Dataset, where: str) -> list[str]:
    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = sorted(set(train["label"]), key=lambda v: (isinstance(v, str), v))
    if any(v is None for v in values):
        raise ValueError(f"{where}: some rows have no label")
    return [str(v) for v in values]


def prepare_labelled(splits: DatasetDict, args: argparse.Namespace) -> tuple[DatasetDict, list[str]]:
    """Columns renamed to text/label, checked, labels as ClassLabel ids, and split 80/10/10 where splits are missing."""
    where = data_name(args)
    checked = {}
    for name, split in splits.items():
        for column in (args.text_column, args.label_column):
            if column not in split.column_names:
                raise ValueError(f"{where} ({name} split): no column {column!r}; its columns are {split.column_names}"
                                 f" (choose with --text_column / --label_column)")
        split = split.select_columns([args.text_column, args.label_column])
        split = split.rename_columns({args.text_column: "text", args.label_column: "label"})
        empty = [i for i, text in enumerate(split["text"]) if not (isinstance(text, str) and text.strip())]
        if empty:
            raise ValueError(f"{where} ({name} split): {len(empty)} empty or missing texts, the first at row "
                             f"{empty[0]}; remove those rows")
        checked[name] = split
    names = label_names(checked["train"], where)
    if len(names) < 2:
        raise ValueError(f"{where}: the training rows have one class only ({names[0]!r}); a classifier needs two or "
                         "more labels")
    labels = ClassLabel(names=names)
    for name, split in checked.items():
        if not isinstance(split.features["label"], ClassLabel):
            unseen = sorted({str(v) for v in split["label"]} - set(names))
            if unseen:
                raise ValueError(f"{where} ({name} split): labels {unseen} never occur in the training rows "
                                 f"({names}); the model could not learn them")
            split = split.map(lambda row: {"label": labels.str2int(str(row["label"]))}).cast_column("label", labels)
        checked[name] = split
    splits = DatasetDict(checked)
    if "validation" not in splits:
        if "test" in splits:
            held = splits["train"].train_test_split(test_size=0.1, seed=args.seed, stratify_by_column="label")
            splits = DatasetDict(train=held["train"], validation=held["test"], test=splits["test"])
        else:
            splits = stratified_split(splits["train"], args.seed, where)
    return splits, names


def tokenize_labelled(splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int,
                      accelerator: Accelerator) -> DatasetDict:
    """Token ids of each text, cut after `max_length` tokens; how many were cut is reported per split."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # One token more than fits tells which texts were cut, without tokenising whole long texts.
        ids = tokenizer(batch["text"], add_special_tokens=False, truncation=True,
                        max_length=max_length + 1)["input_ids"]
        return {"input_ids": [i[:max_length] for i in ids],
                "attention_mask": [[1] * min(len(i), max_length) for i in ids],
                "truncated": [len(i) > max_length for i in ids]}

    tokenized = splits.map(tokenize, batched=True, remove_columns=["text"])
    for name, split in tokenized.items():
        cut = sum(split["truncated"])
        if cut:
            accelerator.print(f"{name}: {cut} of {len(split)} texts were longer than the context and were truncated "
                              f"to {max_length} tokens")
    return tokenized.remove_columns("truncated")


def load_base(args: argparse.Namespace, names: list[str], pad_token_id: int) -> GPT2ScratchForSequenceClassification:
    overrides = {} if args.drop_rate is None else {"drop_rate": args.drop_rate}
    return load_model(
        GPT2ScratchForSequenceClassification, args.model_name_or_path, "--model_name_or_path",
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        pad_token_id=pad_token_id, **overrides)


def select_trainable(model: GPT2ScratchForSequenceClassification, train_layers: str) -> None:
    """Freeze everything, then unfreeze the head and, per strategy, the final norm and the last K blocks."""
    match = TRAIN_LAYERS.match(train_layers)
    blocks = model.transformer.trf_blocks
    if not match or (match.group(2) and not 1 <= int(match.group(2)) <= len(blocks)):
        raise ValueError(f"--train_layers {train_layers}: use head, last_block, last:K with 1 <= K <= {len(blocks)}, "
                         "or all")
    named = {"head": 0, "last_block": 1, "all": len(blocks)}
    last = named[train_layers] if train_layers in named else int(match.group(2))
    model.requires_grad_(train_layers == "all")
    model.score.requires_grad_(True)
    if last:
        model.transformer.final_norm.requires_grad_(True)
        for block in blocks[len(blocks) - last :]:
            block.requires_grad_(True)


def predict(model: torch.nn.Module, dataset: Dataset, collate: DataCollatorWithPadding, batch_size: int,
            accelerator: Accelerator) -> tuple[list[int], list[int], float]:
    """Predicted and true labels of every row (all processes), and the summed cross-entropy."""
    mine = dataset.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    order = sorted(range(len(mine)), key=lambda i: len(mine[i]["input_ids"]))  # similar lengths pad less
    predictions, labels, loss = [], [], 0.0
    for start in range(0, len(order), batch_size):
        batch = collate([mine[i] for i in order[start : start + batch_size]]).to(accelerator.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        predictions += logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    gathered = gather_object([(predictions, labels, loss)])
    return ([p for g in gathered for p in g[0]], [y for g in gathered for y in g[1]], sum(g[2] for g in gathered))


def classification_metrics(predictions: list[int], labels: list[int], loss: float, prefix: str) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1, through the `evaluate` modules shipped in the package."""
    values = {"loss": loss / len(labels)}
    values.update(load_metric("accuracy").compute(predictions=predictions, references=labels))
    for name in ("precision", "recall", "f1"):
        values.update(load_metric(name).compute(predictions=predictions, references=labels, average="macro"))
    return {f"{prefix}/{name}": value for name, value in values.items()}


def confusion_matrix(predictions: list[int], labels: list[int], classes: int) -> list[list[int]]:
    matrix = [[0] * classes for _ in range(classes)]
    for predicted, true in zip(predictions, labels):
        matrix[true][predicted] += 1
    return matrix


def weighted_loss(weights: torch.Tensor):
    def compute_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], weight=weights.to(logits.device))

    return compute_loss


def balanced_weights(labels: list[int], classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(labels), minlength=classes).float()
    return len(labels) / (classes * counts.clamp(min=1))


def save_output(out: Path, model: GPT2ScratchForSequenceClassification, tokenizer: PreTrainedTokenizerBase,
                args: argparse.Namespace, result, report: dict, matrix: list[list[int]], names: list[str]) -> None:
    split = "test" if "test" in report else "validation"
    with staged_output(out) as staging:
        model.save_pretrained(staging)
        with_stock_settings(tokenizer, model.config.context_length).save_pretrained(staging)
        metrics = report[split]
        example = f"up to {model.config.context_length} tokens"
        strategy = f"LoRA r={args.lora_r} (merged) + head" if args.lora else f"--train_layers {args.train_layers}"
        card = render_model_card(
            "text_classification.md", repo_id=args.hub_model_id or f"gpt2-scratch-{data_stem(args)}",
            dataset=data_name(args), metrics=metrics, pipeline_tag="text-classification", license=args.license,
            training_config=public_arguments(args), split=split, labels=names, strategy=strategy,
            parameters=f"{model.num_parameters():,}", base=args.model_name_or_path,
            training_summary=describe_run(args, result, example), example=names[-1],
            best_metric=args.metric_for_best_model or "(last weights kept)",
        )
        card.save(staging / "README.md")
        save_loss_curve(result.progress.history, staging / "loss_curve.png")
        save_confusion_matrix(matrix, names, staging / "confusion_matrix.png", f"{data_name(args)}, {split} split")
        (staging / "metrics.json").write_text(json.dumps(report, indent=2))


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    check_training_arguments(args)
    check_data_arguments(args)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    check_source(args.model_name_or_path, "--model_name_or_path")
    with accelerator.main_process_first():  # the main process downloads and maps; the others read the caches
        splits, names = prepare_labelled(load_splits(args), args)
        tokenizer = load_tokenizer(args.tokenizer or args.model_name_or_path,
                                   "--tokenizer" if args.tokenizer else "--model_name_or_path")
    if tokenizer.pad_token is None:  # GPT-2 has none; the model reads the last real token, so padding is never seen
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base(args, names, tokenizer.pad_token_id)
    with accelerator.main_process_first():
        data = tokenize_labelled(splits, tokenizer, model.config.context_length, accelerator)
    if args.lora:
        check_target_modules(model, args.target_modules)
        model = get_peft_model(model, lora_config(args, "SEQ_CLS", modules_to_save=["score"]))
    else:
        select_trainable(model, args.train_layers)
    accelerator.print(f"{len(names)} classes {names}; rows: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))
    accelerator.print(trainable_summary(model))
    collate = DataCollatorWithPadding(tokenizer)
    eval_batch = args.per_device_eval_batch_size or args.per_device_train_batch_size

    def evaluate(unwrapped: torch.nn.Module) -> dict[str, float]:
        return classification_metrics(*predict(unwrapped, data["validation"], collate, eval_batch, accelerator),
                                      "eval")

    compute_loss = weighted_loss(balanced_weights(data["train"]["label"], len(names))) \
        if args.class_weights == "balanced" else None
    loop = TrainingLoop(accelerator, args, model, data["train"], collate, evaluate, compute_loss)
    accelerator.init_trackers("runs", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))})
    result = loop.run()
    final = accelerator.unwrap_model(loop.model).eval()
    report = {"validation": {k.split("/")[-1]: v for k, v in result.metrics.items()}, "steps": result.progress.step,
              "train_seconds": result.seconds, "best_step": result.progress.best_step,
              "evaluations": [h for h in result.progress.history if any(k.startswith("eval/") for k in h)]}
    predictions, labels = [], []
    if "test" in data:
        with torch.no_grad():
            predictions, labels, loss = predict(final, data["test"], collate, eval_batch, accelerator)
        report["test"] = {k.split("/")[-1]: v for k, v in classification_metrics(predictions, labels, loss,
                                                                                 "test").items()}
        accelerator.print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in report["test"].items()))
    else:
        with torch.no_grad():
            predictions, labels, _ = predict(final, data["validation"], collate, eval_batch, accelerator)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        merged = final.merge_and_unload() if args.lora else final
        save_output(out, merged, tokenizer, args, result, report, confusion_matrix(predictions, labels, len(names)),
                    names)
        (out / BEST_MODEL).unlink(missing_ok=True)  # kept only so that a resumed run knows its best weights
        print(f"saved to {out}")
        if args.push_to_hub:
            print(f"pushed to {push_folder(out, args.hub_model_id)}")
    loop.close()  # the process group: last
    return report
