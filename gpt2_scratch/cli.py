"""`gpt2-scratch` command line: convert checkpoints, generate text, chat, train tokenizers, list presets, and look
inside: how a text is tokenised, where each attention head looks, and a local page that shows it all (explore)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .configuration_gpt2_scratch import PRESETS, GPT2ScratchConfig
from .loading import load_adapter, load_for_generation, quiet_library_progress
from .tokenizer import token_pieces


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
        model = load_adapter(model, args.adapter)
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


def load_tokenizer(name_or_dir: str):
    """A tokenizer from a model or tokenizer folder, or OpenAI's GPT-2 BPE for "gpt2"."""
    if name_or_dir == "gpt2":
        from .tokenizer import load_gpt2_tokenizer

        return load_gpt2_tokenizer()
    from transformers import AutoTokenizer

    if not Path(name_or_dir).is_dir():
        raise UsageError(f"--model {name_or_dir}: no such folder (a model or tokenizer folder, or 'gpt2')")
    try:
        return AutoTokenizer.from_pretrained(name_or_dir)
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--model {name_or_dir}: no usable tokenizer in the folder ({error})") from error


COLOURS = [f"\033[48;5;{code}m\033[30m" for code in (153, 223, 194, 217, 189)]  # pale backgrounds, black text


def cmd_tokenize(args: argparse.Namespace) -> None:
    """One row per token: position, id, the vocabulary entry (byte-level: Ġ is a space, Ċ a newline) and its text."""
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer(args.text, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    pieces = token_pieces(tokenizer, ids)
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    if colour:  # the text itself, each token on its own background
        text = [piece if isinstance(piece, str) else repr(piece) for piece in pieces]
        print("".join(f"{COLOURS[i % len(COLOURS)]}{piece}\033[0m" for i, piece in enumerate(text)))
    width = max([len(str(max(ids, default=0))), 2])
    print(f"{'#':>4s}  {'id':>{width}s}  {'token':20s}  text")
    for position, (token_id, token, piece) in enumerate(zip(ids, tokens, pieces)):
        shown = repr(piece)
        if colour:
            shown = f"{COLOURS[position % len(COLOURS)]}{shown}\033[0m"
        print(f"{position:4d}  {token_id:{width}d}  {token:20s}  {shown}")
    print(f"{len(ids)} tokens for {len(args.text)} characters ({len(args.text.encode('utf-8'))} bytes)")


def attention_maps(model, tokenizer, text: str) -> tuple[list[str], torch.Tensor]:
    """Token labels and the attention weights of every layer and head, shape (layers, heads, queries, keys)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        raise UsageError("--text is empty; give at least one token of text")
    context = model.config.max_position_embeddings
    if ids.shape[1] > context:
        raise UsageError(f"--text is {ids.shape[1]} tokens long but the model's context is {context}; shorten it")
    model.set_attn_implementation("eager")  # the fused kernel never forms the weights
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    labels = [piece if isinstance(piece, str) else repr(piece) for piece in token_pieces(tokenizer, ids[0].tolist())]
    return labels, torch.stack([layer[0] for layer in attentions])


def cmd_attention(args: argparse.Namespace) -> None:
    from .files import staged_file
    from .hub import save_attention_heatmaps

    model, tokenizer = load_for_generation(args.model)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    for flag, value, count in (("--layer", args.layer, n_layers), ("--head", args.head, n_heads)):
        if value is not None and not 0 <= value < count:
            raise UsageError(f"{flag} {value}: the model has {count} ({flag[2:]}s 0..{count - 1})")
    out = Path(args.out)
    if not out.suffix:
        raise UsageError(f"--out {out}: give a file name with an image extension, e.g. attn.png")
    labels, weights = attention_maps(model, tokenizer, args.text)
    layers = range(n_layers) if args.layer is None else [args.layer]
    heads = range(n_heads) if args.head is None else [args.head]
    with staged_file(out) as staging:
        save_attention_heatmaps(weights, labels, list(layers), list(heads), staging)
    print(f"wrote {len(layers) * len(heads)} heatmap{'s' if len(layers) * len(heads) > 1 else ''} "
          f"({len(labels)} tokens) to {out}")


def cmd_explore(args: argparse.Namespace) -> None:
    """Check the port, load the model (one-line errors before any server starts), then serve the page until ^C."""
    import importlib.util
    import socket

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: give a port number from 1 to 65535")
    with socket.socket() as probe:
        try:
            probe.bind((args.host, args.port))
        except OSError as error:
            raise UsageError(f"--port {args.port} on {args.host}: cannot listen there ({error.strerror}); "
                             "choose another port with --port") from error
    if importlib.util.find_spec("gradio") is None:
        raise UsageError("explore needs gradio: pip install 'gpt2-scratch[explore]'")
    from .explore import build_app, launch, load_explorer

    explorer = load_explorer(args.model, args.adapter)
    app = build_app(explorer)
    try:
        url = launch(app, args.host, args.port)
    except OSError as error:
        raise UsageError(f"--port {args.port} on {args.host}: cannot listen there ({error}); "
                         "choose another port with --port") from error
    print(f"exploring {explorer.name} at {url} (Ctrl+C stops)", flush=True)
    app.block_thread()


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

    tokenize = commands.add_parser("tokenize", help="show how a text splits into tokens, with their ids")
    tokenize.add_argument("--model", required=True, metavar="DIR",
                          help="a model or tokenizer folder, or 'gpt2' for OpenAI's GPT-2 BPE")
    tokenize.add_argument("text")
    tokenize.set_defaults(run=cmd_tokenize)

    attention = commands.add_parser("attention", help="draw attention heatmaps of a text, with token labels")
    attention.add_argument("--model", required=True, metavar="DIR", help="folder with config, weights and tokenizer")
    attention.add_argument("--text", required=True)
    attention.add_argument("--layer", type=int, help="only this layer (from 0); default: every layer")
    attention.add_argument("--head", type=int, help="only this head (from 0); default: every head")
    attention.add_argument("--out", required=True, metavar="FILE", help="image file: .png, .svg or .pdf")
    attention.set_defaults(run=cmd_attention)

    explore = commands.add_parser("explore", help="a local web page showing tokens, next-token probabilities, "
                                  "attention, the logit lens and step-by-step decoding of a model")
    explore.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID",
                         help="a model folder (one this project trained also shows its loss curve) or a Hub id")
    explore.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder trained on --model (merged in)")
    explore.add_argument("--port", type=int, default=7860)
    explore.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1: this machine only)")
    explore.set_defaults(run=cmd_explore)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    quiet_library_progress()
    from .sources import SourceError

    try:
        run(args)
    except (UsageError, ValueError, FileNotFoundError, SourceError) as error:
        print(f"gpt2-scratch {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
