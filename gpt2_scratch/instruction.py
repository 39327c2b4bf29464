"""LoRA instruction tuning: what `training/finetune_instruction_lora.py` runs.

records {instruction, input, output} (JSON/JSONL files, Hub, `chatterbot`, or generated verifiable `tasks`) → the
Alpaca prompt + response + eos, prompt tokens masked out of the loss → PEFT LoRA on a causal-LM folder →
`TrainingLoop` → greedy answers on the test split, exact match and ROUGE-L per task → an adapter folder (and with
`--merge` a full model folder) that load like any Hub model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset, DatasetDict, concatenate_datasets
from peft import PeftModel, get_peft_model
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, set_seed

from .data import add_data_arguments, check_data_arguments, data_name, data_stem, load_hub_dataset
from .files import staged_output
from .hub import push_folder, render_model_card, save_loss_curve
from .loading import check_source, load_model, load_tokenizer
from .lora import add_lora_arguments, check_target_modules, lora_config, trainable_summary
from .metrics import load_metric
from .modeling_gpt2_scratch import GPT2ScratchForCausalLM
from .sources import SPLIT_SEED, fetch
from .tasks import FAMILIES, SENTIMENT, make_tasks
from .tokenizer import with_stock_settings
from .training import (
    ArgumentParser,
    TrainingLoop,
    add_training_arguments,
    check_training_arguments,
    describe_run,
    make_accelerator,
    public_arguments,
)

# The Alpaca prompt (Taori et al., 2023), with and without an input; the response follows "### Response:\n".
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
COLUMNS = ("instruction", "input", "output")


def format_prompt(instruction: str, input: str = "") -> str:
    """The text the model continues; training, evaluation, generation and `gpt2-scratch chat` all use this."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Instruction-tune a GPT-2 with PEFT LoRA and Accelerate.")
    data = add_data_arguments(parser, "tasks", ["tasks (generated verifiable tasks)", "chatterbot"],
                              "Alpaca-style .json/.jsonl records; files and Hub data without a test split hold out a "
                              "seeded 10%% of the instructions")
    data.add_argument("--instruction_column", default="instruction")
    data.add_argument("--input_column", default="input", help="optional in the data")
    data.add_argument("--output_column", default="output")
    data.add_argument("--tasks", nargs="+", default=list(FAMILIES),
                      help=f"task families for --dataset_name tasks: {', '.join([*FAMILIES, SENTIMENT])}")
    data.add_argument("--task_train_size", type=int, default=2000, help="training instances per task family")
    data.add_argument("--task_test_size", type=int, default=50, help="held-out instances per task family")
    data.add_argument("--task_weights", nargs="+", default=[], metavar="FAMILY=W",
                      help="W x --task_train_size training instances for FAMILY (e.g. add=4: more of the steps go to "
                           "a family that is learned slowly)")
    data.add_argument("--no_mask_prompt", dest="mask_prompt", action="store_false",
                      help="also learn to predict the prompt tokens (default: loss on the response and eos only)")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", required=True,
                       help="a causal-LM folder saved by gpt2-scratch, a stock GPT-2 folder, or a Hub id such as "
                            "openai-community/gpt2 (OpenAI's weights, converted on load)")
    model.add_argument("--tokenizer", default=None,
                       help="a tokenizer folder or Hub id (default: the one of --model_name_or_path)")
    model.add_argument("--merge", action="store_true", help="also write the merged full model to OUTPUT_DIR/merged")
    model.add_argument("--max_new_tokens", type=int, default=64, help="longest generated response in evaluation")
    model.add_argument("--max_eval_examples", type=int, default=None, help="evaluate on the first N test records")
    model.add_argument("--base_model_id", default=None,
                       help="Hub id of the base model for the card's base_model metadata (default: its local path)")
    model.add_argument("--license", default="mit", help="licence recorded in the model card")
    add_lora_arguments(parser, r=16, embeddings=True)
    add_training_arguments(parser)
    parser.set_defaults(learning_rate=2e-3, weight_decay=0.0, per_device_train_batch_size=16, num_train_epochs=1.0,
                        warmup_steps=20, logging_steps=20)
    return parser


def read_records(path: Path) -> list[dict]:
    """Records of a .json (a list) or .jsonl file; a malformed line is reported with its file and line number."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno})") \
                        from error
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    return records


def records_to_dataset(records: list[dict], where: str, args: argparse.Namespace) -> Dataset:
    """instruction/input/output columns from the configured names, checked record by record."""
    rows: dict[str, list[str]] = {name: [] for name in COLUMNS}
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ValueError(f"{where}, record {number}: expected an object with instruction/output, got {record!r}")
        for name in ("instruction", "output"):
            column = getattr(args, f"{name}_column")
            if column not in record:
                raise ValueError(f"{where}, record {number}: no {column!r} field (its fields: {sorted(record)}); "
                                 f"choose the column with --{name}_column")
            if not isinstance(record[column], str) or not record[column].strip():
                raise ValueError(f"{where}, record {number}: empty {column!r}; every record needs a non-empty "
                                 f"{name} (an empty output would teach the model to answer nothing)")
        rows["instruction"].append(record[args.instruction_column])
        rows["input"].append(record.get(args.input_column) or "")
        rows["output"].append(record[args.output_column])
    if not rows["output"]:
        raise ValueError(f"{where}: no records")
    return Dataset.from_dict(rows)


def load_files(specs: list[str], args: argparse.Namespace) -> Dataset:
    parts = []
    for spec in specs:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no such file (give Alpaca-style .json or .jsonl files, 'tasks', "
                                    "'chatterbot' or a Hub dataset)")
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{spec}: use .json or .jsonl records with instruction/input/output fields")
        parts.append(records_to_dataset(read_records(path), str(path), args))
    return concatenate_datasets(parts)


def chatterbot_pairs() -> Dataset:
    """Each consecutive (prompt, reply) of every English conversation, each distinct pair once, sorted by file."""
    import yaml

    seen, rows = set(), {name: [] for name in COLUMNS}
    for file in sorted(fetch("chatterbot").glob("*.yml")):
        for conversation in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(turn).strip() for turn in conversation]
            for prompt, reply in itertools.pairwise(turns):
                if prompt and reply and (prompt, reply) not in seen:
                    seen.add((prompt, reply))
                    rows["instruction"].append(prompt)
                    rows["input"].append("")
                    rows["output"].append(reply)
    return Dataset.from_dict(rows)


def held_out_by_instruction(records: Dataset, seed: int) -> DatasetDict:
    """A seeded 10% of the distinct instructions are the test split, so no test instruction is trained on."""
    instructions = sorted(set(records["instruction"]))
    if len(instructions) < 2:
        raise ValueError(f"need at least 2 distinct instructions to hold out a test split, got {len(instructions)}")
    test = set(random.Random(seed).sample(instructions, max(1, len(instructions) // 10)))
    return DatasetDict(train=records.filter(lambda r: r["instruction"] not in test),
                       test=records.filter(lambda r: r["instruction"] in test))


def parse_task_weights(specs: list[str]) -> dict[str, float]:
    weights = {}
    for spec in specs:
        family, _, weight = spec.partition("=")
        try:
            weights[family] = float(weight)
        except ValueError:
            raise ValueError(f"--task_weights {spec}: expected FAMILY=NUMBER, e.g. add=4") from None
    return weights


def load_instructions(args: argparse.Namespace) -> DatasetDict:
    """train and test splits (and validation, from --validation_file) with instruction, input, output and task
    columns."""
    name = args.dataset_name
    if args.task_weights and name != "tasks":
        raise ValueError(f"--task_weights weighs the generated task families; it does nothing for {data_name(args)}")
    if name in ("tasks", "chatterbot") and args.dataset_config_name:
        raise ValueError(f"the named source {name} has no configurations; drop --dataset_config_name")
    if name == "tasks":
        if args.task_train_size < 1 or args.task_test_size < 1:
            raise ValueError("--task_train_size and --task_test_size must be at least 1")
        splits = make_tasks(args.tasks, args.task_train_size, args.task_test_size, args.seed,
                            parse_task_weights(args.task_weights))
    elif name == "chatterbot":
        splits = held_out_by_instruction(chatterbot_pairs(), SPLIT_SEED)
    elif args.train_file:
        records = load_files(args.train_file, args)
        splits = DatasetDict(train=records) if args.test_file else held_out_by_instruction(records, args.seed)
    else:
        hub = load_hub_dataset(name, "'tasks', 'chatterbot' or a local file", args.dataset_config_name)
        records = {split: records_to_dataset(list(rows), f"{name} ({split} split)", args) for split, rows in
                   hub.items()}
        splits = DatasetDict(train=records["train"], test=records["test"]) if "test" in records \
            else held_out_by_instruction(records["train"], args.seed)
    for split in ("validation", "test"):
        files = getattr(args, f"{split}_file")
        if files:
            splits[split] = load_files(files, args)
    task = data_name(args)
    return DatasetDict({split: rows if "task" in rows.column_names else rows.add_column("task", [task] * len(rows))
                        for split, rows in splits.items()})


def encode(example: dict, tokenizer: PreTrainedTokenizerBase, mask_prompt: bool) -> dict:
    """Prompt and response tokenised apart (as at generation time, when only the prompt exists), the response
    closed by eos so the model learns to stop; -100 labels are ignored by the loss."""
    prompt = tokenizer(format_prompt(example["instruction"], example["input"]), add_special_tokens=False)["input_ids"]
    response = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = ([-100] * len(prompt) if mask_prompt else prompt) + response
    return {"input_ids": prompt + response, "attention_mask": [1] * (len(prompt) + len(response)),
            "labels": labels, "prompt_length": len(prompt)}


def tokenize_instructions(split: Dataset, tokenizer: PreTrainedTokenizerBase, context_length: int, mask_prompt: bool,
                          name: str, accelerator: Accelerator) -> Dataset:
    """Encoded records; those longer than the context are skipped (cutting would remove the answer), and counted."""
    encoded = split.map(lambda row: encode(row, tokenizer, mask_prompt))
    fits = encoded.filter(lambda row: len(row["input_ids"]) <= context_length)
    skipped = len(encoded) - len(fits)
    if skipped:
        accelerator.print(f"{name}: skipped {skipped} of {len(encoded)} records longer than the context of "
                          f"{context_length} tokens (prompt + response + eos)")
    if len(fits) == 0:
        raise ValueError(f"{name}: every record is longer than the model's context of {context_length} tokens")
    return fits


@torch.no_grad()
def generate_responses(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                       max_new_tokens: int, context_length: int, batch_size: int) -> list[str]:
    """Greedy continuations, batched among prompts of equal length so that no padding changes any number."""
    responses: list[str] = [""] * len(prompts)
    by_length = defaultdict(list)
    for index, ids in enumerate(prompts):
        by_length[len(ids)].append(index)
    for length, indices in sorted(by_length.items()):
        budget = min(max_new_tokens, context_length - length)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)
            for i, row in zip(chunk, out[:, length:].tolist()):
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                responses[i] = tokenizer.decode(row)  # as generated: exact match normalises whitespace itself
    return responses


def evaluate_generation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test: Dataset, args,
                        accelerator: Accelerator) -> tuple[dict, list[dict]]:
    """Exact match and ROUGE-L overall and per task, and one record per test example (all processes share)."""
    mine = test.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    prompts = [row["input_ids"][: row["prompt_length"]] for row in mine]
    responses = generate_responses(model, tokenizer, prompts, args.max_new_tokens, model.config.context_length,
                                   args.per_device_eval_batch_size or args.per_device_train_batch_size)
    mine_rows = [{"task": row["task"], "instruction": row["instruction"], "input": row["input"],
                  "reference": row["output"], "response": response} for row, response in zip(mine, responses)]
    rows = gather_object(mine_rows)
    exact, rouge = load_metric("exact_match"), load_metric("rouge_l")
    groups = {"overall": rows, **{task: [r for r in rows if r["task"] == task]
                                  for task in sorted({r["task"] for r in rows})}}
    metrics = {}
    for name, group in groups.items():
        predictions, references = [r["response"] for r in group], [r["reference"] for r in group]
        metrics[name] = {"examples": len(group),
                         **exact.compute(predictions=predictions, references=references),
                         **rouge.compute(predictions=predictions, references=references)}
    return metrics, rows


def shared_prefix_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's loss on a batch whose records open with the same masked tokens (the Alpaca preamble is ~60% of a
    short record): those run once, their keys and values are repeated for every record, and the rest of each record
    attends to them from the cache. Same loss and gradients as `model(**batch).loss`, with far less compute."""
    ids, labels = batch["input_ids"], batch["labels"]
    common = (ids == ids[:1]).all(0) & (batch["attention_mask"] == 1).all(0)
    scored = (labels != -100).any(0)
    # The prefix's logits are not kept, so the tokens they predict (up to the one after it) must all be unscored.
    first_scored = int(scored.nonzero()[0]) if scored.any() else ids.shape[1]
    shared = min(int(common.int().cumprod(0).sum()), first_scored - 1, ids.shape[1] - 1)
    if shared < 2:
        return model(**batch).loss
    cache = model(input_ids=ids[:1, :shared], use_cache=True).cache
    for layer in cache.layers:
        layer.batch_repeat_interleave(ids.shape[0])
    return model(input_ids=ids[:, shared:], attention_mask=batch["attention_mask"], labels=labels[:, shared:],
                 cache=cache, use_cache=True).loss


def validation_loss(validation: Dataset, collate, batch_size: int, accelerator: Accelerator):
    mine = validation.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for start in range(0, len(mine), batch_size):
            rows = mine.select(range(start, min(start + batch_size, len(mine))))
            batch = collate([{k: row[k] for k in ("input_ids", "attention_mask", "labels")} for row in rows])
            batch = batch.to(accelerator.device)
            scored = (batch["labels"][:, 1:] != -100).sum()
            total += model(**batch, use_cache=False).loss.double().cpu() * scored.cpu()
            count += scored.cpu()
        total, count = (accelerator.reduce(t.to(accelerator.device), "sum").item() for t in (total, count))
        return {"eval/loss": total / max(count, 1)}

    return evaluate


def save_outputs(out: Path, model: PeftModel, tokenizer: PreTrainedTokenizerBase, args, result, report: dict,
                 rows: list[dict]) -> None:
    """The adapter folder (with tokenizer, card, predictions, metrics) and with --merge a full model in merged/."""
    source = Path(args.model_name_or_path)
    base = str(source.resolve()) if source.exists() else args.model_name_or_path  # a folder, or a Hub id as given
    overall = report["overall"]
    with staged_output(out) as staging:
        model.peft_config["default"].base_model_name_or_path = base
        model.save_pretrained(staging)
        tokenizer = with_stock_settings(tokenizer, model.config.context_length)
        tokenizer.save_pretrained(staging)
        with open(staging / "eval_predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        (staging / "metrics.json").write_text(json.dumps(
            {"test": report, "steps": result.progress.step, "train_seconds": result.seconds,
             "validation": {k.split("/")[-1]: v for k, v in result.metrics.items()}}, indent=2))
        save_loss_curve(result.progress.history, staging / "loss_curve.png")
        card = render_model_card(
            "lora_adapter.md", repo_id=args.hub_model_id or f"gpt2-scratch-lora-{data_stem(args)}",
            dataset=data_name(args), metrics={"exact_match": overall["exact_match"], "rouge_l": overall["rouge_l"]},
            pipeline_tag="text-generation", license=args.license, training_config=public_arguments(args),
            split="test", base_model=args.base_model_id or base, report=report,
            lora=f"r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout}, target modules "
                 f"{', '.join(args.target_modules)}" + (", token embeddings trained" if args.train_embeddings else ""),
            training_summary=describe_run(args, result, "one record (prompt + response)"),
            trainable=trainable_summary(model),
        )
        card.data.base_model = args.base_model_id or base
        card.data.library_name = "peft"
        card.save(staging / "README.md")
        if args.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(staging / "merged")
            tokenizer.save_pretrained(staging / "merged")


def run(args: argparse.Namespace) -> dict:
    check_training_arguments(args)
    check_data_arguments(args)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    check_source(args.model_name_or_path, "--model_name_or_path")
    tokenizer = load_tokenizer(args.tokenizer or args.model_name_or_path,
                               "--tokenizer" if args.tokenizer else "--model_name_or_path")
    if tokenizer.pad_token is None:  # batches pad with eos; the attention mask and -100 labels hide the padding
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(GPT2ScratchForCausalLM, args.model_name_or_path, "--model_name_or_path")
    check_target_modules(model, args.target_modules)
    context = model.config.context_length
    with accelerator.main_process_first():  # the main process downloads and maps; the others read the caches
        splits = load_instructions(args)
        held = splits["train"].train_test_split(test_size=min(0.05, 200 / len(splits["train"])), seed=args.seed) \
            if len(splits["train"]) >= 20 and "validation" not in splits else None
        train = held["train"] if held else splits["train"]
        validation = splits["validation"] if "validation" in splits else held["test"] if held else train
        encoded = {name: tokenize_instructions(split, tokenizer, context, args.mask_prompt, name, accelerator)
                   for name, split in (("train", train), ("validation", validation), ("test", splits["test"]))}
    test = encoded["test"].select(range(min(args.max_eval_examples or len(encoded["test"]), len(encoded["test"]))))
    model = get_peft_model(model, lora_config(args, "CAUSAL_LM", vocab_size=model.config.vocab_size))
    accelerator.print(f"records: train {len(encoded['train'])}, validation {len(encoded['validation'])}, "
                      f"test {len(test)}; {trainable_summary(model)}")
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    columns = ["input_ids", "attention_mask", "labels"]
    loop = TrainingLoop(accelerator, args, model, encoded["train"].select_columns(columns), collate,
                        validation_loss(encoded["validation"], collate, args.per_device_eval_batch_size
                                        or args.per_device_train_batch_size, accelerator), shared_prefix_loss)
    accelerator.init_trackers("runs", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))})
    result = loop.run()
    final = accelerator.unwrap_model(loop.model).eval()
    report, rows = evaluate_generation(final, tokenizer, test, args, accelerator)
    for name, values in report.items():
        accelerator.print(f"{name:>16}: exact match {values['exact_match']:.3f}, ROUGE-L {values['rouge_l']:.3f} "
                          f"({values['examples']} examples)")
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        save_outputs(out, final, tokenizer, args, result, report, rows)
        print(f"saved the adapter to {out}" + (f" and the merged model to {out / 'merged'}" if args.merge else ""))
        if args.push_to_hub:
            print(f"pushed to {push_folder(out, args.hub_model_id)}")
    loop.close()  # the process group: last
    return report
