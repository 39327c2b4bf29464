"""Quality per minute: validation nats per character on `shakespeare` after training loops limited to 1 and 10 min.

    .venv/bin/python benchmarks/bench_pretrain.py                 # both budgets (~14 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_pretrain.py --minutes 1     # one budget
    .venv/bin/python benchmarks/bench_pretrain.py --minutes 2 4 --recipe 1   # how one recipe scales with time
    .venv/bin/python benchmarks/bench_pretrain.py --score runs/demo          # fit vs generalisation, no training
    .venv/bin/python benchmarks/bench_pretrain.py --eval_cost 10   # what the demo's evaluations cost, no training

Each run is `training/pretrain.py` with the recipe for its budget (`gpt2_scratch.pretraining.RECIPES`), or the
one `--recipe` names:
`--max_train_minutes` with `--schedule_on_clock` (the cosine decay ends with the budget), warmup and the faster of
fp32 and bf16 autocast chosen by timing the model's steps on this machine (`recipe_arguments`). The tokenizer is
trained before, and the data tokenised (then cached) before the loop starts: neither counts against the budget.
The whole validation split is scored; shakespeare is ASCII, so nats per character = bits per byte × ln 2.
`--score` trains nothing: it scores trained folders on text they trained on (the training split's last 10%, as
long as the validation split) and on the validation split, both in float32, to tell fitting from generalising.
`--eval_cost MINUTES` trains nothing either: it times one pass over the validation split of that recipe's model
against its training steps, alternated in one process, in the precision the recipe picks here.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import AutoTokenizer

from gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.data import token_byte_lengths
from gpt2_scratch.pretraining import (
    RECIPES,
    build_config,
    build_parser,
    language_model_evaluator,
    recipe_arguments,
    step_seconds,
)
from gpt2_scratch.sources import load_shakespeare
from gpt2_scratch.token_store import dataset_tokens
from gpt2_scratch.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def score(folder: Path, texts: dict[str, str]) -> dict[str, float]:
    """Nats per character of a trained folder on each of `texts`."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = GPT2ScratchForCausalLM.from_pretrained(folder).eval()
    scores = {}
    for name, text in texts.items():
        tokens = dataset_tokens(Dataset.from_dict({"text": [text]}), tokenizer, name)
        evaluate = language_model_evaluator(tokens, token_byte_lengths(tokenizer), model.config.context_length, 32,
                                            Accelerator(cpu=True))
        with torch.no_grad():
            scores[name] = evaluate(model)["eval/bits_per_byte"] * math.log(2)
    return scores


def recipe_tokenizer(vocab: int, out: Path, train_text) -> Path:
    """The recipes' BPE, trained once on the training split and kept in `out`."""
    tokenizer_dir = out / f"tokenizer-{vocab}"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer(train_text, vocab, show_progress=False).save_pretrained(tokenizer_dir)
    return tokenizer_dir


def evaluation_cost(minutes: int, out: Path, repeats: int = 3) -> None:
    """Seconds of one validation pass of a recipe's model, in its training steps: what each evaluation during training
    costs a run whose clock runs through it (`make demo` evaluates 4 times in its 10 minutes)."""
    splits = load_shakespeare()
    tokenizer_dir = recipe_tokenizer(RECIPES[minutes].vocab_size, out, splits["train"])
    args = build_parser().parse_args(["--output_dir", "unused",
                                      *recipe_arguments(RECIPES[minutes], minutes, tokenizer_dir)])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = build_config(args, tokenizer)
    validation = dataset_tokens(splits["validation"], tokenizer, "the validation split")
    evaluate = language_model_evaluator(validation, token_byte_lengths(tokenizer), config.context_length,
                                        args.per_device_train_batch_size, Accelerator(cpu=True))
    model = GPT2ScratchForCausalLM(config).eval()
    steps, passes = [], []
    for _ in range(repeats):  # alternated, so a slow spell of a shared machine slows both
        steps.append(step_seconds(config, args))
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            evaluate(model)
        passes.append(time.perf_counter() - start)
    ratios = sorted(p / s for p, s in zip(passes, steps))
    step, one = statistics.median(steps), statistics.median(passes)
    print(f"one validation pass ({len(validation):,} tokens, {args.mixed_precision}): {one:.1f} s = "
          f"{statistics.median(ratios):.0f} training steps of {step * 1000:.0f} ms (per repeat: "
          f"{', '.join(f'{r:.0f}' for r in ratios)}); at this speed a {minutes}-minute budget holds "
          f"{minutes * 60 / step:.0f} steps, and 4 passes take {100 * 4 * one / (minutes * 60):.1f}% of it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="*", default=[1, 10], help="training budgets")
    parser.add_argument("--recipe", type=int, choices=sorted(RECIPES), default=None,
                        help="train every budget with this budget's recipe (default: each budget's own)")
    parser.add_argument("--out", default="runs/bench_pretrain")
    parser.add_argument("--score", type=Path, nargs="+", default=None, metavar="FOLDER",
                        help="train nothing: score these trained folders on seen text and on validation")
    parser.add_argument("--eval_cost", type=int, choices=sorted(RECIPES), default=None, metavar="MINUTES",
                        help="train nothing: time a validation pass of this recipe's model in its training steps")
    args = parser.parse_args()
    if args.eval_cost:
        evaluation_cost(args.eval_cost, Path(args.out))
        return
    if args.score:
        for folder in args.score:
            if not (folder / "config.json").is_file():
                parser.error(f"--score {folder}: not a trained model folder (no config.json)")
        splits = load_shakespeare()
        validation = splits["validation"]["text"][0]
        texts = {"seen": splits["train"]["text"][0][-len(validation):], "validation": validation}
        print("| model | nats/char on text it trained on | on validation | gap |\n|---|---|---|---|")
        for folder in args.score:
            scores = score(folder, texts)
            print(f"| {folder} | {scores['seen']:.4f} | {scores['validation']:.4f} | "
                  f"{scores['validation'] - scores['seen']:.4f} |", flush=True)
        return
    for minutes in args.minutes:
        if minutes <= 0 or (args.recipe is None and minutes not in RECIPES):
            parser.error(f"--minutes {minutes:g}: there is a recipe for {', '.join(map(str, RECIPES))} minutes; "
                         "give a positive budget, and --recipe to train another budget with one of them")
    train_text = load_shakespeare()["train"]
    rows = []
    for minutes in args.minutes:
        recipe_minutes = args.recipe or int(minutes)
        recipe = RECIPES[recipe_minutes]
        tokenizer_dir = recipe_tokenizer(recipe.vocab_size, Path(args.out), train_text)
        out = Path(args.out) / (f"{minutes:g}min" + (f"-recipe{args.recipe}" if args.recipe else ""))
        command = [sys.executable, str(ROOT / "training" / "pretrain.py"), "--output_dir", str(out),
                   *recipe_arguments(recipe, minutes, tokenizer_dir)]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, env=None)
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append((minutes, recipe_minutes, metrics["steps"], metrics["train_seconds"],
                     metrics["bits_per_byte"]))
    print("\n| training budget | recipe | steps | trained for | validation bits/byte | validation nats/char |")
    print("|---|---|---|---|---|---|")
    for minutes, recipe_minutes, steps, seconds, bpb in rows:
        print(f"| {minutes:g} min | {recipe_minutes} min | {steps} | {seconds:.0f} s | {bpb:.4f} | "
              f"{bpb * math.log(2):.4f} |")


if __name__ == "__main__":
    main()
