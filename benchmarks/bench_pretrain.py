"""Quality per minute: validation nats per character on `shakespeare` after training loops limited to 1 and 10 min.

    .venv/bin/python benchmarks/bench_pretrain.py                 # both budgets (~14 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_pretrain.py --minutes 1     # one budget
    .venv/bin/python benchmarks/bench_pretrain.py --minutes 2 4 --recipe 1   # how one recipe scales with time

Each run is `training/pretrain.py` with the recipe for its budget (`gpt2_scratch.pretraining.RECIPES`), or the
one `--recipe` names:
`--max_train_minutes` with `--schedule_on_clock` (the cosine decay ends with the budget), warmup and the faster of
fp32 and bf16 autocast chosen by timing the model's steps on this machine (`recipe_arguments`). The tokenizer is
trained before, and the data tokenised (then cached) before the loop starts: neither counts against the budget.
The whole validation split is scored; shakespeare is ASCII, so nats per character = bits per byte × ln 2.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from gpt2_scratch.pretraining import RECIPES, recipe_arguments
from gpt2_scratch.sources import load_shakespeare
from gpt2_scratch.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="*", default=[1, 10], help="training budgets")
    parser.add_argument("--recipe", type=int, choices=sorted(RECIPES), default=None,
                        help="train every budget with this budget's recipe (default: each budget's own)")
    parser.add_argument("--out", default="runs/bench_pretrain")
    args = parser.parse_args()
    for minutes in args.minutes:
        if minutes <= 0 or (args.recipe is None and minutes not in RECIPES):
            parser.error(f"--minutes {minutes:g}: there is a recipe for {', '.join(map(str, RECIPES))} minutes; "
                         "give a positive budget, and --recipe to train another budget with one of them")
    train_text = load_shakespeare()["train"]
    rows = []
    for minutes in args.minutes:
        recipe = RECIPES[args.recipe or int(minutes)]
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
        rows.append((minutes, args.recipe or int(minutes), metrics["steps"], metrics["train_seconds"],
                     metrics["bits_per_byte"]))
    print("\n| training budget | recipe | steps | trained for | validation bits/byte | validation nats/char |")
    print("|---|---|---|---|---|---|")
    for minutes, recipe_minutes, steps, seconds, bpb in rows:
        print(f"| {minutes:g} min | {recipe_minutes} min | {steps} | {seconds:.0f} s | {bpb:.4f} | "
              f"{bpb * math.log(2):.4f} |")


if __name__ == "__main__":
    main()
