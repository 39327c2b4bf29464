"""How pretraining's data preparation grows with the corpus: the token store (gpt2_scratch/token_store.py).

For each size (default 10 MB, 100 MB and 1 GB) a corpus is built from the `shakespeare` source (its paragraphs
shuffled, repeated until the size is reached, seed 0), then `training/pretrain.py` runs one optimizer step on it with
OpenAI's GPT-2 BPE: cold (no token store yet: it tokenises), then, once every store is built, cached (the store of the
cold run; the sizes take turns, --cached_rounds times). Printed for each: seconds from start to exit of each run
(imports, tokenising or opening the store, the model, one step, a one-batch evaluation, saving: the time to a first
training step and little more), the run's peak RSS (os.wait4), the store's size on disk, and tokenising MB/s in the
cold run against `tokenizers`' own `encode_batch` on the same pieces and cores (timed alone, in this process, over the
first --reference_mb MB). Then evaluation against training tokens per second on the run's model and batch, with the
evaluator of gpt2_scratch.pretraining and with the one it replaced (the full logits' float32 copy, then the
cross-entropy).

    python benchmarks/bench_data.py --sizes 10MB,100MB,1GB --out /tmp/bench_data

Targets (issue 36): peak RSS on 1 GB within 256 MB of 10 MB's, cold and cached; cached start on 1 GB within 10 s of
10 MB's; tokenising >= 0.8x encode_batch; evaluation >= 2x training tokens/s.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import AutoTokenizer

from gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.data import token_byte_lengths
from gpt2_scratch.pretraining import build_config, build_parser, language_model_evaluator, step_seconds
from gpt2_scratch.sources import shakespeare_text
from gpt2_scratch.token_store import BATCH_CHARS, cut_pieces, file_chunks
from gpt2_scratch.tokenizer import load_gpt2_tokenizer

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9}
RUN = ["--preset", "cpu-1m", "--max_steps", "1", "--per_device_train_batch_size", "8", "--max_eval_samples", "8",
       "--logging_steps", "1", "--seed", "0"]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(KB|MB|GB)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: give sizes like 10MB or 1GB")
    return int(float(match[1]) * UNITS[match[2]])


def build_corpus(size: int, path: Path) -> Path:
    """`size` bytes of shakespeare's paragraphs, shuffled anew (seed 0) at every repetition."""
    if path.is_file() and path.stat().st_size >= size:
        return path
    paragraphs = [p + "\n\n" for p in shakespeare_text().split("\n\n") if p.strip()]
    rng, written = random.Random(0), 0
    partial = path.with_suffix(".partial")
    with open(partial, "w", encoding="utf-8") as out:
        while written < size:
            rng.shuffle(paragraphs)
            for paragraph in paragraphs:
                written += out.write(paragraph)
                if written >= size:
                    break
    partial.replace(path)
    return path


def timed_run(corpus: Path, tokenizer_dir: Path, cache: Path, out: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of one `training/pretrain.py` run in a process of its own."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "GPT2_SCRATCH_CACHE": str(cache), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "training" / "pretrain.py"), "--train_file", str(corpus), "--tokenizer",
               str(tokenizer_dir), "--output_dir", str(out), *RUN]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"pretrain.py failed ({process.returncode}):\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def encode_batch_rate(corpus: Path, tokenizer_dir: Path, limit: int) -> float:
    """MB/s of `tokenizers`' encode_batch alone on the store's pieces and batches of the first `limit` bytes (a
    fresh tokenizer, so its word cache starts as cold as the run's)."""
    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    seconds, done, batch, size = 0.0, 0, [], 0

    def encode() -> float:
        start = time.perf_counter()
        backend.encode_batch(batch, add_special_tokens=False)
        return time.perf_counter() - start

    for piece in cut_pieces(file_chunks([corpus])):
        batch.append(piece.text)
        size += len(piece.text)
        if size >= BATCH_CHARS:
            seconds += encode()
            done += sum(len(text.encode("utf-8")) for text in batch)
            batch, size = [], 0
            if done >= limit:
                break
    if batch and done < limit:
        seconds += encode()
        done += sum(len(text.encode("utf-8")) for text in batch)
    return done / 1e6 / seconds


def full_logits_loss(model: torch.nn.Module, tokens: np.ndarray, block: int, batch: int, batches: int) -> float:
    """Seconds of the evaluator this project had before: the whole logits, copied to float32, then the loss."""
    rows = torch.from_numpy(tokens[: batches * batch * block].astype(np.int64)).view(batches, batch, block)
    start = time.perf_counter()
    with torch.no_grad():
        for ids in rows:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return time.perf_counter() - start


def evaluation_speed(tokens: np.ndarray, tokenizer_dir: Path, repeats: int = 3, batches: int = 4) -> None:
    """Evaluation tokens/s against training tokens/s on the benchmark runs' model and batch, alternated."""
    args = build_parser().parse_args(["--output_dir", "unused", "--tokenizer", str(tokenizer_dir), *RUN])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = build_config(args, tokenizer)
    batch, block = args.per_device_train_batch_size, config.context_length
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(config).eval()
    evaluate = language_model_evaluator(tokens, token_byte_lengths(tokenizer), block, batch, Accelerator(cpu=True),
                                        batches * batch)
    train, chunked, full = [], [], []
    for _ in range(repeats):
        step = step_seconds(config, args, trials=4)
        train.append(batch * block / step)
        start = time.perf_counter()
        with torch.no_grad():
            evaluate(model)
        chunked.append(evaluate.tokens / (time.perf_counter() - start))
        full.append(batches * batch * (block - 1) / full_logits_loss(model, tokens, block, batch, batches))
    train_rate, eval_rate, full_rate = (statistics.median(x) for x in (train, chunked, full))
    print(f"evaluation {eval_rate:,.0f} tokens/s vs training {train_rate:,.0f} tokens/s: {eval_rate / train_rate:.2f}x "
          f"(the evaluator it replaced, full float32 logits: {full_rate:,.0f} tokens/s, "
          f"{full_rate / train_rate:.2f}x); cpu-1m, vocab {config.vocab_size}, batch {batch} x {block}, median of "
          f"{repeats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help="comma-separated corpus sizes, e.g. 10MB,100MB")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_data"), help="corpora, stores and runs")
    parser.add_argument("--reference_mb", type=float, default=100.0,
                        help="encode_batch is timed on at most this many MB of each corpus")
    parser.add_argument("--cached_rounds", type=int, default=3, help="cached runs of each size, taking turns")
    options = parser.parse_args()
    sizes = [parse_size(s) for s in options.sizes.split(",")]
    options.out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = options.out / "gpt2-tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        load_gpt2_tokenizer().save_pretrained(tokenizer_dir)
    print(f"{os.cpu_count()} cores; runs: pretrain.py --train_file CORPUS --tokenizer {tokenizer_dir} "
          f"{' '.join(RUN)}", flush=True)
    first_tokens, stores = None, {}
    for size in sizes:
        name = next(f"{size // unit}{label}" for label, unit in reversed(UNITS.items()) if size % unit == 0)
        corpus = build_corpus(size, options.out / f"corpus-{name}.txt")
        cache = options.out / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        cold, cold_rss, output = timed_run(corpus, tokenizer_dir, cache, options.out / "run")
        tokenised = re.search(r"tokenised .*: ([\d,]+) tokens \((\w+)\) in ([\d.]+) s", output)
        store = sum(f.stat().st_size for f in (cache / "tokens").rglob("*") if f.is_file())
        tokens, dtype, seconds = int(tokenised[1].replace(",", "")), tokenised[2], float(tokenised[3])
        rate = corpus.stat().st_size / 1e6 / seconds
        reference = encode_batch_rate(corpus, tokenizer_dir, int(options.reference_mb * 1e6))
        print(f"{name}: cold run {cold:.1f} s, peak RSS {cold_rss:,.0f} MB; store {store / 1e6:,.1f} MB ({tokens:,} "
              f"{dtype} tokens); tokenising {rate:.2f} MB/s vs encode_batch {reference:.2f} MB/s = "
              f"{rate / reference:.2f}x", flush=True)
        stores[name] = corpus, cache, cold_rss
        if first_tokens is None:
            first_tokens = next(np.memmap(f, dtype=dtype, mode="r") for f in (cache / "tokens").rglob("tokens.bin"))
    # The cached runs take turns, size after size, so a machine that speeds up or slows down between sizes (seen:
    # 2x within ten minutes on a shared host) moves them all alike.
    cached = {name: [] for name in stores}
    for _ in range(options.cached_rounds):
        for name, (corpus, cache, _) in stores.items():
            seconds, rss, again = timed_run(corpus, tokenizer_dir, cache, options.out / "run")
            if "tokenising" in again:
                raise SystemExit(f"{name}: the cached run tokenised again")
            cached[name].append((seconds, rss))
    first = next(iter(stores))
    for name, runs in cached.items():
        seconds, rss = statistics.median(s for s, _ in runs), max(r for _, r in runs)
        line = (f"{name}: cached run median {seconds:.1f} s ({', '.join(f'{s:.1f}' for s, _ in runs)}), peak RSS "
                f"{rss:,.0f} MB")
        if name != first:
            base = statistics.median(s for s, _ in cached[first])
            line += (f"; against {first}: cold RSS {stores[name][2] - stores[first][2]:+,.0f} MB, cached RSS "
                     f"{rss - max(r for _, r in cached[first]):+,.0f} MB, cached start {seconds - base:+.1f} s")
        print(line, flush=True)
    evaluation_speed(first_tokens, tokenizer_dir)


if __name__ == "__main__":
    main()
