"""Pretraining a GPT-2 on a text corpus: what `training/pretrain.py` runs.

corpus (named source, local files or Hub) → tokenizer (saved, OpenAI's GPT-2 BPE, or trained on the train split)
→ token blocks → `TrainingLoop` → a folder with the model, tokenizer, model card, loss curve and metrics.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedType
from transformers import AutoTokenizer, PreTrainedTokenizerBase, set_seed

from .configuration_gpt2_scratch import PRESETS, GPT2ScratchConfig
from .data import (
    VALIDATION_FRACTION,
    TokenBlocks,
    add_data_arguments,
    check_data_arguments,
    data_name,
    data_stem,
    evaluation_windows,
    local_files_of,
    local_texts,
    looks_like_hub_id,
    streaming_blocks,
    token_byte_lengths,
    train_corpus,
)
from .files import staged_output
from .hub import push_folder, render_model_card, save_loss_curve
from .loading import check_source, load_model, load_tokenizer
from .modeling_gpt2_scratch import GPT2ScratchForCausalLM
from .sources import LOADERS
from .token_store import dataset_tokens, text_file_tokens, text_file_training_part
from .tokenizer import load_gpt2_tokenizer, train_tokenizer, with_stock_settings
from .training import (
    ArgumentParser,
    PaddedVocabulary,
    TrainingLoop,
    add_training_arguments,
    build_optimizers,
    check_memory,
    check_training_arguments,
    describe_run,
    make_accelerator,
    public_arguments,
)

FINAL_EVAL_SAMPLES = 1024  # validation windows scored by default when evaluating only at the end of the run
MODEL_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Pretrain a GPT-2 from scratch with Accelerate.")
    data = add_data_arguments(parser, "shakespeare", LOADERS, ".txt/.json/.jsonl/.csv/.parquet files or folders; "
                                                              "plain text's last ~10%% (by bytes) is held out")
    data.add_argument("--text_column", default="text")
    data.add_argument("--streaming", action="store_true",
                      help="tokenise and pack --train_file on the fly; needs --tokenizer and --max_steps")
    data.add_argument("--streaming_eval_blocks", type=int, default=16,
                      help="with --streaming: the first N blocks of the stream are the validation split")
    data.add_argument("--max_eval_samples", type=int, default=None,
                      help="score the first N windows of the validation (and test) split; default: a tenth of the "
                           "blocks trained between two evaluations with --eval_steps, else "
                           f"{FINAL_EVAL_SAMPLES}")
    data.add_argument("--tokenizer", default=None,
                      help="a saved tokenizer folder, a Hub id, or 'gpt2' for OpenAI's BPE; default: the one of "
                           "--model_name_or_path, or else train one on the train split")
    data.add_argument("--tokenizer_vocab_size", type=int, default=8192, help="size of a tokenizer trained here")
    data.add_argument("--tokenizer_isolate_spaces", action="store_true",
                      help="a tokenizer trained here makes every space its own token")
    data.add_argument("--tokenizer_split_digits", action="store_true",
                      help="a tokenizer trained here gives every digit its own token")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", "--init_from", dest="model_name_or_path", default=None,
                       help="continue pretraining this model instead of starting from random weights: a gpt2_scratch "
                            "folder, a stock GPT-2 folder, or a Hub id such as openai-community/gpt2 (OpenAI's "
                            "weights, converted on load); its shape and context length are kept")
    model.add_argument("--preset", default="cpu-10m", choices=list(PRESETS),
                       help="the model's shape (default: cpu-10m); each option below overrides one of its fields")
    for name in MODEL_FIELDS:
        model.add_argument(f"--{name}", type=float if name == "drop_rate" else int, default=None,
                           help="default: the tokenizer's size" if name == "vocab_size" else None)
    model.add_argument("--qkv_bias", action="store_true")
    model.add_argument("--pad_vocab_to_multiple_of", type=int, default=0,
                       help="train with the vocabulary padded to a multiple of N (64 on a GPU: 50,257 -> 50,304); "
                            "the padded tokens are never predicted, and the saved model has the real vocabulary")
    model.add_argument("--license", default="mit", help="licence recorded in the model card")
    model.add_argument("--prompt", default="ROMEO:", help="example prompt for the model card")
    add_training_arguments(parser)
    return parser


def get_tokenizer(args: argparse.Namespace, train_texts) -> PreTrainedTokenizerBase:
    if args.tokenizer == "gpt2":
        return load_gpt2_tokenizer()
    if args.tokenizer and not Path(args.tokenizer).exists() and looks_like_hub_id(args.tokenizer):
        return load_tokenizer(args.tokenizer, "--tokenizer")
    if args.model_name_or_path and not args.tokenizer:
        return load_tokenizer(args.model_name_or_path, "--model_name_or_path")
    if args.tokenizer:
        if not Path(args.tokenizer).is_dir():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such folder (save one with save_pretrained, "
                                    "or pass 'gpt2')")
        return AutoTokenizer.from_pretrained(args.tokenizer)
    if train_texts is None:
        raise ValueError("--streaming needs a ready tokenizer: pass --tokenizer DIR or --tokenizer gpt2")
    return train_tokenizer(train_texts, args.tokenizer_vocab_size, show_progress=False,
                           isolate_spaces=args.tokenizer_isolate_spaces, split_digits=args.tokenizer_split_digits)


def check_init_from(args: argparse.Namespace) -> None:
    """With --model_name_or_path the model's shape is the source's: refuse shape arguments, take its context."""
    if not args.model_name_or_path:
        return
    shaped = [f"--{name}" for name in MODEL_FIELDS if name != "drop_rate" and getattr(args, name) is not None]
    shaped += ["--qkv_bias"] if args.qkv_bias else []
    shaped += ["--preset"] if args.preset != build_parser().get_default("preset") else []
    if shaped:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path} brings its own shape: drop "
                         f"{', '.join(shaped)}")
    config = check_source(args.model_name_or_path, "--model_name_or_path")
    args.context_length = config.get("context_length") or config.get("n_positions")


def load_start(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> GPT2ScratchForCausalLM:
    """The model to train: a new one from the preset, or the weights of --model_name_or_path."""
    if not args.model_name_or_path:
        return GPT2ScratchForCausalLM(build_config(args, tokenizer))
    overrides = {} if args.drop_rate is None else {"drop_rate": args.drop_rate}
    model = load_model(GPT2ScratchForCausalLM, args.model_name_or_path, "--model_name_or_path", **overrides)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {args.model_name_or_path} has vocab_size "
                         f"{model.config.vocab_size}; use its own tokenizer")
    return model.train()


def build_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> GPT2ScratchConfig:
    overrides = {name: getattr(args, name) for name in MODEL_FIELDS if getattr(args, name) is not None}
    overrides.setdefault("vocab_size", len(tokenizer))
    if len(tokenizer) > overrides["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{overrides['vocab_size']}; raise --vocab_size or use a smaller tokenizer")
    return GPT2ScratchConfig.from_preset(args.preset, qkv_bias=args.qkv_bias, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, **overrides)


def corpus_tokens(args: argparse.Namespace) -> tuple[PreTrainedTokenizerBase, dict[str, np.ndarray]]:
    """The tokenizer, and the train, validation (and test) ids memory-mapped from their token stores (tokenised by
    the first run, read from disk by later runs and by the other processes). Plain-text training files stream into
    the store, never whole in memory; their last ~10% (by bytes, at a safe cut) is the validation split unless a
    --validation_file is given. Tabular files, named sources and Hub datasets go through `datasets` first."""
    builder, files = local_files_of(args.train_file, "--train_file") if args.train_file else (None, [])
    if builder == "text":
        tokenizer = get_tokenizer(args, text_file_training_part(
            files, 0.0 if args.validation_file else VALIDATION_FRACTION))
        store = text_file_tokens(files, tokenizer, VALIDATION_FRACTION)
        held_out = len(store.tokens) if store.held_out_start is None or args.validation_file \
            else store.held_out_start
        splits = {"train": store.tokens[:held_out], "validation": store.tokens[held_out:]}
    else:
        corpus = train_corpus(args)
        tokenizer = get_tokenizer(args, corpus["train"])
        splits = {split: dataset_tokens(rows, tokenizer, f"the {split} split of {data_name(args)}")
                  for split, rows in corpus.items()}
    for split in ("validation", "test"):
        if getattr(args, f"{split}_file"):
            splits[split] = file_tokens(args, split, tokenizer)
    return tokenizer, splits


def file_tokens(args: argparse.Namespace, split: str, tokenizer: PreTrainedTokenizerBase) -> np.ndarray | None:
    """The ids of --validation_file or --test_file (`split`), if given, from their token store."""
    specs, where = getattr(args, f"{split}_file"), f"--{split}_file"
    if not specs:
        return None
    builder, files = local_files_of(specs, where)
    if builder == "text":
        return text_file_tokens(files, tokenizer, VALIDATION_FRACTION).tokens
    return dataset_tokens(local_texts(specs, args.text_column, where)[1], tokenizer, where)


class BlockStream(torch.utils.data.IterableDataset):
    """Training blocks straight from the files, after the first `skip` blocks (the validation split)."""

    def __init__(self, make_blocks: Callable[[], Iterator[dict]], skip: int) -> None:
        self.make_blocks, self.skip = make_blocks, skip

    def __iter__(self) -> Iterator[dict]:
        for block in itertools.islice(self.make_blocks(), self.skip, None):
            yield {"input_ids": torch.tensor(block["input_ids"])}


def prepare_data(args, accelerator: Accelerator):
    """(tokenizer, training dataset, validation tokens, test tokens or None)."""
    if args.streaming:
        if not args.train_file:
            raise ValueError("--streaming reads local files: give them with --train_file")
        builder, files = local_files_of(args.train_file, "--train_file")
        tokenizer = get_tokenizer(args, None)
        block = args.context_length or PRESETS[args.preset]["context_length"]

        def make_blocks() -> Iterator[dict]:
            return streaming_blocks(files, builder, tokenizer, block, args.text_column)

        if args.validation_file:
            return (tokenizer, BlockStream(make_blocks, 0), file_tokens(args, "validation", tokenizer),
                    file_tokens(args, "test", tokenizer))
        eval_blocks = [b["input_ids"] for b in itertools.islice(make_blocks(), args.streaming_eval_blocks)]
        if len(eval_blocks) < args.streaming_eval_blocks:
            raise ValueError(f"{data_name(args)} holds fewer than {args.streaming_eval_blocks + 1} blocks of {block} "
                             "tokens: too little text to stream")
        return (tokenizer, BlockStream(make_blocks, args.streaming_eval_blocks), np.concatenate(eval_blocks),
                file_tokens(args, "test", tokenizer))
    with accelerator.main_process_first():  # the main process downloads and tokenises; the others read the stores
        tokenizer, splits = corpus_tokens(args)
    block = args.context_length or PRESETS[args.preset]["context_length"]
    blocks = TokenBlocks(splits["train"], block, f"the training split of {data_name(args)}")
    return tokenizer, blocks, splits["validation"], splits.get("test")


LOGIT_CHUNK = 1 << 22  # logits computed and scored at a time by the evaluator: 16 MB in float32


def summed_next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The summed loss of predicting each token of `ids` (batch x length) after the first. The head's
    logits are computed and scored LOGIT_CHUNK values at a time, in float32: the full (batch x length x vocabulary)
    logits, and a float32 copy of them, are never made (for GPT-2's vocabulary they are ~200 KB a token)."""
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].flatten()
    head = model.get_output_embeddings()
    rows = max(1, LOGIT_CHUNK // head.out_features)
    total = torch.zeros((), device=ids.device)
    for start in range(0, len(targets), rows):
        logits = head(hidden[start : start + rows]).float()
        total += F.cross_entropy(logits, targets[start : start + rows], reduction="sum")
    return total


def language_model_evaluator(
    tokens: np.ndarray, byte_lengths: np.ndarray, block_size: int, batch_size: int, accelerator: Accelerator,
    max_samples: int | None = None,
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Loss per token, perplexity and bits per byte over the first `max_samples` windows of the validation split
    (default: all of it), shared across processes. The function has `tokens`: how many tokens it scores."""
    windows = evaluation_windows(tokens, block_size, max_samples)
    mine = windows[accelerator.process_index :: accelerator.num_processes]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        nll = torch.zeros((), dtype=torch.float64)
        scored = torch.zeros((), dtype=torch.float64)
        scored_bytes = torch.zeros((), dtype=torch.float64)
        for _, group in itertools.groupby(mine, key=len):  # equal-length windows batch together
            group = list(group)
            for start in range(0, len(group), batch_size):
                rows = np.stack(group[start : start + batch_size]).astype(np.int64)
                ids = torch.from_numpy(rows).to(accelerator.device)
                nll += summed_next_token_loss(model, ids).cpu().double()
                scored += ids.shape[0] * (ids.shape[1] - 1)
                scored_bytes += float(byte_lengths[rows[:, 1:]].sum())
        nll, scored, scored_bytes = (accelerator.reduce(t.to(accelerator.device), "sum").item()
                                     for t in (nll, scored, scored_bytes))
        loss = nll / scored
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
                "eval/bits_per_byte": nll / math.log(2) / scored_bytes}

    evaluate.tokens = sum(len(window) - 1 for window in windows)
    return evaluate


def eval_samples(args: argparse.Namespace, processes: int) -> int:
    """--max_eval_samples, or its default: with --eval_steps, a tenth of the blocks trained between two evaluations
    (at least one batch), so that evaluating, at 2-3x the training's tokens per second, costs a few percent of the
    training time; evaluated only at the end, FINAL_EVAL_SAMPLES windows."""
    if args.max_eval_samples:
        return args.max_eval_samples
    if not args.eval_steps:
        return FINAL_EVAL_SAMPLES
    trained = args.eval_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    return max(args.per_device_eval_batch_size or args.per_device_train_batch_size, trained // 10)


def step_seconds(config: GPT2ScratchConfig, args: argparse.Namespace, trials: int = 12,
                 max_seconds: float = 5.0) -> float:
    """Seconds per optimizer step of this model on this machine, with the run's batch, optimizer and precision:
    how a recipe sizes its warmup and picks its precision. Up to `trials` timed steps, fewer (at least one) once
    `max_seconds` have passed: bf16 on a CPU without bf16 instructions takes ~6 s a step for the 10-minute recipe,
    and 13 of them were most of a short demo's time."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(config).train()
    optimizers = build_optimizers(model, args)
    batch = torch.randint(0, config.vocab_size, (args.per_device_train_batch_size, config.context_length))
    timings = []
    for _ in range(trials + 1):  # the first step pays for allocation and kernel selection
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)  # as the loop does, every step
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
        if len(timings) > 1 and sum(timings) > max_seconds:
            break
    return statistics.median(timings[1:])  # the median resists a shared machine's hiccups


@dataclass(frozen=True)
class Recipe:
    """A model (overrides of the cpu-10m preset), tokenizer size, batch size and optimiser settings."""

    model: dict
    vocab_size: int
    batch_size: int
    learning_rate: float
    optimizer: str = "adamw"
    muon_learning_rate: float = 0.02
    muon_ns_steps: int = 5
    mixed_precision: str = "fastest"  # "no", "bf16", or whichever of the two runs this model's steps faster here


# Recipes for shakespeare on a 2-core CPU, by training budget in minutes; `make demo` uses the 10-minute one.
# On this CPU small models with short contexts win. Muon reaches a lower loss per step than AdamW at ~1.5x the step
# time here, a net gain; 3 Newton-Schulz steps beat 5 per second. A 2048-token BPE beats 1024 (more characters per
# step) and 4096 (a costlier head). With bf16, larger batches pay: 32 beat 12-24 and 48-64 in one minute, 16 beat 6
# in ten (README).
RECIPES = {
    1: Recipe(dict(emb_dim=128, n_heads=4, n_layers=4, context_length=64), 2048, 32, 6e-3, "muon", 0.02, 3),
    10: Recipe(dict(emb_dim=128, n_heads=4, n_layers=6, context_length=128), 2048, 16, 6e-3, "muon", 0.02, 3),
}
# The models and optimisers of the pretrained bases that benchmarks/bench_classification.py (reviews) and
# bench_instruction.py (tasks) were measured with, kept so those benchmarks still train what they measured.
REVIEWS_BASE = Recipe(dict(emb_dim=192, n_heads=6, n_layers=6, context_length=128), 4096, 12, 2e-3,
                      mixed_precision="no")
TASKS_BASE = Recipe(dict(emb_dim=128, n_heads=4, n_layers=4, context_length=128), 2048, 12, 3e-3, mixed_precision="no")


def recipe_arguments(recipe: Recipe, minutes: float, tokenizer_dir: Path, dataset: str = "shakespeare",
                     evaluations: int = 0, step_time: Callable[[GPT2ScratchConfig, argparse.Namespace], float] | None
                     = None) -> list[str]:
    """training/pretrain.py arguments for a recipe: `minutes` of training whose cosine decay follows the clock (a
    step count fitted beforehand missed by up to 28% on these shared machines: runs cut before the decay's end, or
    ending early), warmup over the first ~5% of the steps timed here, and `evaluations` validation passes evenly
    spaced over those steps besides the final one (each costs training time: the clock runs through them).
    `step_time(config, args)` gives the seconds per step (default `step_seconds`, timing real steps)."""
    args = ["--dataset_name", dataset, "--tokenizer", str(tokenizer_dir), "--preset", "cpu-10m",
            "--per_device_train_batch_size", str(recipe.batch_size), "--learning_rate", str(recipe.learning_rate),
            "--optimizer", recipe.optimizer, "--weight_decay", "0.1", "--drop_rate", "0.0",
            "--max_train_minutes", str(minutes), "--logging_steps", "25", "--seed", "1337"]
    if recipe.optimizer == "muon":
        args += ["--muon_learning_rate", str(recipe.muon_learning_rate),
                 "--muon_ns_steps", str(recipe.muon_ns_steps)]
    for name, value in recipe.model.items():
        args += [f"--{name}", str(value)]
    parsed = build_parser().parse_args(["--output_dir", "unused", *args])
    config = build_config(parsed, AutoTokenizer.from_pretrained(tokenizer_dir))
    # bf16 autocast is ~1.3-1.7x faster per step on a CPU with AVX512-BF16 or AMX, ~4x slower on one with AVX2 only:
    # time both here rather than guess from the CPU's name.
    precisions = ["no", "bf16"] if recipe.mixed_precision == "fastest" else [recipe.mixed_precision]
    step_time = step_time or step_seconds
    timed = {p: step_time(config, argparse.Namespace(**{**vars(parsed), "mixed_precision": p})) for p in precisions}
    precision = min(timed, key=timed.get)
    print("timed steps: " + ", ".join(f"{p} {seconds * 1000:.0f} ms" for p, seconds in timed.items())
          + f"; training in {precision}", flush=True)
    steps = int(minutes * 60 / timed[precision])  # what the budget holds, as timed here
    warmup = max(steps // 20, 1)  # ~5% of them
    cadence = ["--eval_steps", str(max(steps // (evaluations + 1), 1))] if evaluations else []
    return [*args, "--mixed_precision", precision, "--schedule_on_clock", "--warmup_steps", str(warmup), *cadence]


def collate_blocks(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.stack([row["input_ids"] for row in rows])
    return {"input_ids": ids, "labels": ids}  # the model shifts labels itself


def save_output(out: Path, model: GPT2ScratchForCausalLM, tokenizer: PreTrainedTokenizerBase, args, result,
                covered: dict[str, int]) -> None:
    """Model, tokenizer, card, loss curve and metrics (with the tokens each score `covered`), written so the folder
    loads only when complete."""
    with staged_output(out) as staging:
        model.save_pretrained(staging)
        with_stock_settings(tokenizer, model.config.context_length).save_pretrained(staging)
        metrics = {k.replace("eval/", "").replace("/", "_"): v for k, v in result.metrics.items()}
        card = render_model_card(
            "causal_lm.md", repo_id=args.hub_model_id or f"gpt2-scratch-{data_stem(args)}",
            dataset=data_name(args), metrics=metrics, pipeline_tag="text-generation", license=args.license,
            training_config=public_arguments(args), parameters=f"{model.num_parameters():,}", prompt=args.prompt,
            origin=f"from {args.model_name_or_path}" if args.model_name_or_path else "from scratch",
            training_summary=describe_run(args, result, f"{model.config.context_length} tokens"),
        )
        card.save(staging / "README.md")
        save_loss_curve(result.progress.history, staging / "loss_curve.png")
        (staging / "metrics.json").write_text(json.dumps(
            {**metrics, **covered, "steps": result.progress.step, "train_seconds": result.seconds}, indent=2))


def run(args: argparse.Namespace) -> dict[str, float]:
    check_training_arguments(args)
    check_data_arguments(args)
    if args.streaming and args.max_steps <= 0:
        raise ValueError("--streaming has no epochs to count: give --max_steps")
    check_init_from(args)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    tokenizer, train_data, validation_tokens, test_tokens = prepare_data(args, accelerator)
    if not args.model_name_or_path:  # refused before it is built; a loaded model is checked by the loop
        check_memory(args, build_config(args, tokenizer), accelerator.device)
    model = load_start(args, tokenizer)
    config = model.config
    vocab_size, padding = config.vocab_size, None
    if args.pad_vocab_to_multiple_of:
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("--pad_vocab_to_multiple_of trims the padded rows before saving, which FSDP's sharded "
                             "embeddings do not allow: drop it with FSDP")
        padding = PaddedVocabulary(model, args.pad_vocab_to_multiple_of)
    eval_batch = args.per_device_eval_batch_size or args.per_device_train_batch_size
    samples = eval_samples(args, accelerator.num_processes)
    evaluate = language_model_evaluator(validation_tokens, token_byte_lengths(tokenizer), config.context_length,
                                        eval_batch, accelerator, samples)
    accelerator.print(f"evaluation: {evaluate.tokens:,} tokens of the {len(validation_tokens):,} in the validation "
                      f"split (--max_eval_samples {samples})")
    loop = TrainingLoop(accelerator, args, model, train_data, collate_blocks, evaluate)
    accelerator.init_trackers("runs", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str))})
    length = f"optimizer steps for {args.max_train_minutes:g} minutes" if args.schedule_on_clock \
        and args.max_steps <= 0 else f"{loop.total_steps} optimizer steps"
    accelerator.print(f"model: {model.num_parameters():,} parameters ({args.model_name_or_path or args.preset}, "
                      f"vocab {vocab_size}"
                      + (f" padded to {config.vocab_size}, " if config.vocab_size != vocab_size else ", ") +
                      f"context {config.context_length}); {length} on "
                      f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}")
    result = loop.run()
    if padding:
        padding.trim()
    covered = {"eval_tokens": evaluate.tokens}  # how many tokens each score covers, for metrics.json
    final = accelerator.unwrap_model(loop.model)
    if test_tokens is not None:  # scored once, by the weights that are saved
        score_test = language_model_evaluator(test_tokens, token_byte_lengths(tokenizer), config.context_length,
                                              eval_batch, accelerator, samples)
        with torch.no_grad():
            final.eval()
            result.metrics.update({k.replace("eval/", "test/"): v for k, v in score_test(final).items()})
        covered["test_tokens"] = score_test.tokens
        accelerator.print(f"test bits per byte {result.metrics['test/bits_per_byte']:.4f} over {score_test.tokens:,} "
                          "tokens")
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        save_output(out, final, tokenizer, args, result, covered)
        print(f"saved to {out}: validation bits per byte {result.metrics['eval/bits_per_byte']:.4f} over "
              f"{evaluate.tokens:,} tokens")
        if args.push_to_hub:
            print(f"pushed to {push_folder(out, args.hub_model_id)}")
    loop.close()  # the process group: last
    return result.metrics

