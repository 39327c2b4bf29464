"""`gpt2-scratch` command line: convert checkpoints, generate text, chat, train tokenizers, list presets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .configuration_gpt2_scratch import PRESETS, GPT2ScratchConfig


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def count_parameters(config: GPT2ScratchConfig) -> int:
    """Unique parameters of the causal LM for `config` (tied embeddings counted once), built on the meta device so
    even gpt2-xl costs no memory."""
    from .modeling_gpt2_scratch import GPT2ScratchForCausalLM

    with torch.device("meta"):
        return GPT2ScratchForCausalLM(config).num_parameters()


def cmd_presets(args: argparse.Namespace) -> None:
    print(f"{'preset':12s} {'vocab':>6s} {'context':>7s} {'emb_dim':>7s} {'heads':>5s} {'layers':>6s} "
          f"{'params (qkv_bias False)':>24s} {'params (qkv_bias True)':>23s}")
    for name, fields in PRESETS.items():
        counts = [count_parameters(GPT2ScratchConfig.from_preset(name, qkv_bias=b)) for b in (False, True)]
        print(f"{name:12s} {fields['vocab_size']:6d} {fields['context_length']:7d} {fields['emb_dim']:7d} "
              f"{fields['n_heads']:5d} {fields['n_layers']:6d} {counts[0]:24,d} {counts[1]:23,d}")


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert_directory

    source, to_stock = (args.from_hf, False) if args.from_hf else (args.to_hf, True)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    convert_directory(source, out, to_stock=to_stock)
    kind = "stock transformers GPT2LMHeadModel" if to_stock else "gpt2_scratch GPT2ScratchForCausalLM"
    print(f"wrote {kind} to {out}")


def load_for_generation(source: str):
    """Model and tokenizer from a folder or a Hub id: a gpt2_scratch model, or a stock GPT-2 converted on load."""
    from .loading import check_source, load_model, load_tokenizer
    from .modeling_gpt2_scratch import GPT2ScratchForCausalLM

    where = "--model"
    check_source(source, where)
    tokenizer = load_tokenizer(source, where, remedy="save one into the model folder")
    return load_model(GPT2ScratchForCausalLM, source, where).eval(), tokenizer


def cmd_generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer, set_seed

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    model, tokenizer = load_for_generation(args.model)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    if prompt_len == 0:
        raise UsageError("--prompt is empty; give at least one token of text")
    context = model.config.max_position_embeddings
    if prompt_len + args.max_new_tokens > context:
        raise UsageError(
            f"prompt ({prompt_len} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's context of "
            f"{context} tokens; shorten the prompt or ask for at most {max(context - prompt_len, 0)} new tokens"
        )
    set_seed(args.seed)
    sampling = args.temperature > 0
    streamer = TextStreamer(tokenizer) if args.stream else None
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=sampling,
            temperature=args.temperature if sampling else None,
            top_k=args.top_k if sampling else None,
            top_p=args.top_p if sampling else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=streamer,
        )
    if not args.stream:  # the streamer has already printed prompt and completion
        print(tokenizer.decode(output[0], skip_special_tokens=True))


def cmd_chat(args: argparse.Namespace) -> None:
    """Read instructions line by line ("instruction" or "instruction || input"), answer each with the instruction
    template, printing tokens as they come; an empty line or end of input quits."""
    from transformers import TextStreamer, set_seed

    from .instruction import format_prompt

    model, tokenizer = load_for_generation(args.model)
    if args.adapter:
        from peft import PeftModel

        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise UsageError(f"--adapter {args.adapter}: not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, args.adapter).eval()
    context = model.config.max_position_embeddings
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    set_seed(args.seed)
    print("Type an instruction (add ' || ' and an input if it needs one); an empty line quits.", file=sys.stderr)
    while True:
        try:
            line = input("instruction> ")
        except EOFError:
            break
        if not line.strip():
            break
        instruction, _, text = line.partition(" || ")
        ids = tokenizer(format_prompt(instruction.strip(), text.strip()), return_tensors="pt")
        room = context - ids["input_ids"].shape[1]
        if room < 1:
            print(f"(too long: the prompt has {ids['input_ids'].shape[1]} tokens, the context {context})")
            continue
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=min(args.max_new_tokens, room), do_sample=args.temperature > 0,
                           temperature=args.temperature or None, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.eos_token_id, streamer=streamer)


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from .data import load_corpus
    from .tokenizer import train_and_report

    corpus = load_corpus(args.corpus)  # train = the first 90% of the text, validation = the rest
    report = train_and_report(corpus["train"], corpus["validation"]["text"], args.vocab_size, args.min_frequency,
                              args.out, args.isolate_spaces, args.split_digits)
    print(f"vocabulary: {report.vocab_size} tokens | validation: {report.bytes_per_token:.3f} bytes/token | "
          f"trained in {report.seconds:.1f} s | saved to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2-scratch", description="GPT-2 from scratch, Hugging Face compatible.")
    commands = parser.add_subparsers(dest="command", required=True)

    presets = commands.add_parser("presets", help="list model presets with their parameter counts")
    presets.set_defaults(run=cmd_presets)

    convert = commands.add_parser("convert", help="convert between stock GPT-2 and gpt2_scratch checkpoints")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="SRC",
                           help="stock GPT-2 (a folder, or a Hub id such as openai-community/gpt2) → gpt2_scratch "
                                "folder")
    direction.add_argument("--to-hf", metavar="SRC", help="gpt2_scratch folder → stock transformers GPT-2 folder")
    convert.add_argument("--out", required=True, metavar="DST", help="output folder")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it already has files")
    convert.set_defaults(run=cmd_convert)

    tokenizer = commands.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer")
    tokenizer.add_argument("--corpus", required=True, metavar="NAME_OR_PATH",
                           help="a named corpus (shakespeare), a text file, or a folder of *.txt files")
    tokenizer.add_argument("--vocab-size", type=int, required=True)
    tokenizer.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often")
    tokenizer.add_argument("--isolate-spaces", action="store_true",
                           help="every space its own token, so a word is one token wherever it stands")
    tokenizer.add_argument("--split-digits", action="store_true", help="one token per digit")
    tokenizer.add_argument("--out", required=True, metavar="DIR")
    tokenizer.set_defaults(run=cmd_train_tokenizer)

    generate = commands.add_parser("generate", help="generate text from a model folder or a Hub id")
    generate.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                          help="a folder with config, weights and tokenizer, or a Hub id (openai-community/gpt2, "
                               "gpt2-medium, ...: a stock GPT-2 runs in gpt2_scratch's blocks, converted on load)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=50)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy decoding")
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="answer instructions interactively (Alpaca template), streaming tokens")
    chat.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                      help="a causal-LM folder (or a merged model), or a Hub id")
    chat.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder trained on --model")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (the default)")
    chat.add_argument("--seed", type=int, default=0)
    chat.set_defaults(run=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    from .sources import SourceError

    try:
        run(args)
    except (UsageError, ValueError, FileNotFoundError, SourceError) as error:
        print(f"gpt2-scratch {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
