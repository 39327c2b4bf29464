"""Quality per minute: validation nats per character on `shakespeare` after training loops limited to 1 and 10 min.

    .venv/bin/python benchmarks/bench_pretrain.py                 # both budgets (~14 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_pretrain.py --minutes 1     # one budget
    .venv/bin/python benchmarks/bench_pretrain.py --minutes 2 4 --recipe 1   # how one recipe scales with time
    .venv/bin/python benchmarks/bench_pretrain.py --score runs/demo          # fit vs generalisation, no training

Each run is `training/pretrain.py` with the recipe for its budget (`gpt2_scratch.pretraining.RECIPES`), or the
one `--recipe` names:
`--max_train_minutes` with `--schedule_on_clock` (the cosine decay ends with the budget), warmup and the faster of
fp32 and bf16 autocast chosen by timing the model's steps on this machine (`recipe_arguments`). The tokenizer is
trained before, and the data tokenised (then cached) before the loop starts: neither counts against the budget.
The whole validation split is scored; shakespeare is ASCII, so nats per character = bits per byte × ln 2.
`--score` trains nothing: it scores trained folders on text they trained on (the training split's last 10%, as
long as the validation split) and on the validation split, both in float32, to tell fitting from generalising.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import AutoTokenizer

from gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.data import token_byte_lengths
from gpt2_scratch.pretraining import RECIPES, cached_tokens, language_model_evaluator, recipe_arguments
from gpt2_scratch.sources import load_shakespeare
from gpt2_scratch.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def score(folder: Path, texts: dict[str, str]) -> dict[str, float]:
    """Nats per character of a trained folder on each of `texts`."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = GPT2ScratchForCausalLM.from_pretrained(folder).eval()
    scores = {}
    for name, text in texts.items():
        tokens = cached_tokens(Dataset.from_dict({"text": [text]}), tokenizer)
        evaluate = language_model_evaluator(tokens, token_byte_lengths(tokenizer), model.config.context_length, 32,
                                            Accelerator(cpu=True))
        with torch.no_grad():
            scores[name] = evaluate(model)["eval/bits_per_byte"] * math.log(2)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="*", default=[1, 10], help="training budgets")
    parser.add_argument("--recipe", type=int, choices=sorted(RECIPES), default=None,
                        help="train every budget with this budget's recipe (default: each budget's own)")
    parser.add_argument("--out", default="runs/bench_pretrain")
    parser.add_argument("--score", type=Path, nargs="+", default=None, metavar="FOLDER",
                        help="train nothing: score these trained folders on seen text and on validation")
    args = parser.parse_args()
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
        vocab = recipe.vocab_size
        tokenizer_dir = Path(args.out) / f"tokenizer-{vocab}"
        if not (tokenizer_dir / "tokenizer.json").is_file():
            train_tokenizer(train_text, vocab, show_progress=False).save_pretrained(tokenizer_dir)
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
