"""CPU decode speed: gpt2_scratch against transformers' GPT2LMHeadModel and CTranslate2, in one process.

    .venv/bin/python benchmarks/bench_generate.py                      # 200 new tokens, batch 1 and 8 (~15 minutes)
    .venv/bin/python benchmarks/bench_generate.py --new_tokens 32 --no_compile   # a quick look
    .venv/bin/python benchmarks/bench_generate.py --layouts ...     # first: F.linear vs x @ W_t, fp32 and bf16

The gpt2-small shape with random weights (the same weights everywhere), greedy, every sequence forced to the same
length. Measured: ours fp32 (the readable modules alone, and through the decode layout generate() builds) and bf16;
transformers fp32 and bf16 with the dynamic cache, and with a static cache + torch.compile; CTranslate2 fp32 and int8
on the folder `gpt2-scratch convert --to-hf` writes; a read-bandwidth ceiling (every weight is read once per step).
Prints tokens/s, ratios and % of that ceiling, the decode layout's memory, and a matmul bf16/fp32 throughput ratio.
Not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models
from transformers import CompileConfig, GPT2LMHeadModel, PreTrainedTokenizerFast

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.convert import config_to_hf, convert_directory, from_hf


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs: on a shared machine the others measure the neighbours."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(megabytes: int = 1024) -> float:
    """Bytes/s a reduction streams from memory: decoding one token must read every weight once, so this bounds it."""
    data = torch.ones(megabytes * 2**20 // 4)
    data.sum()
    return data.numel() * 4 / best_seconds(data.sum, 5)


def matmul_flops(dtype: torch.dtype, size: int = 1024) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    F.linear(a, b)
    return 2 * size**3 / best_seconds(lambda: F.linear(a, b), 3)


def layout_table(repeats: int) -> None:
    """Why the decode layout transposes: one step's matmuls (12 gpt2-small blocks and the tied head, 475 MiB in
    fp32), streamed in nn.Linear's (out × in) layout through F.linear and in Conv1D's (in × out) through x @ W."""
    shapes = [(3 * 768, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
    weights = [torch.randn(out_features, in_features) * 0.02 for out_features, in_features in shapes]
    print("one decode step's matmuls, weights read from memory (ms per step, best of repeats)")
    for batch in (1, 8):
        x = torch.randn(batch, 3072)
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            out_in = [w.to(dtype) for w in weights]
            in_out = [w.t().contiguous() for w in out_in]
            xs = x.to(dtype)
            linear = best_seconds(lambda xs=xs, ws=out_in: [F.linear(xs[:, :w.shape[1]], w) for w in ws], repeats)
            matmul = best_seconds(lambda xs=xs, ws=in_out: [xs[:, :w.shape[0]] @ w for w in ws], repeats)
            name = "fp32" if dtype == torch.float32 else "bf16"
            cells.append(f"{name}: F.linear(x, W) {linear * 1e3:6.1f}, x @ W_t {matmul * 1e3:6.1f}")
        print(f"  batch {batch}:  " + ";  ".join(cells))
    print()


def word_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer covering the vocabulary (CTranslate2 reads the vocabulary, and its bos/eos/unk tokens, which must
    all be set, from the folder): no GPT-2 tokenizer ships offline, and decode speed does not depend on the strings.
    Like GPT-2's, its one special token, the last id, is bos, eos and unk at once."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    last = f"t{vocab_size - 1}"
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=last))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=last, bos_token=last, eos_token=last)


class Bench:
    def __init__(self, prompt_tokens: int, new_tokens: int, repeats: int) -> None:
        self.prompt_tokens, self.new_tokens, self.repeats = prompt_tokens, new_tokens, repeats
        self.tokens: dict[tuple[str, int], torch.Tensor] = {}

    def generate(self, name: str, model: torch.nn.Module, prompt: torch.Tensor, **kwargs) -> float:
        """Tokens/s of greedy generate(), after a short warm-up (allocator, kernel choice, compilation)."""
        kwargs = dict(do_sample=False, pad_token_id=0, **kwargs)
        n = self.new_tokens
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)
            seconds = best_seconds(
                lambda: self.tokens.__setitem__(
                    (name, prompt.shape[0]), model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
                ),
                self.repeats,
            )
        assert self.tokens[name, prompt.shape[0]].shape[1] == prompt.shape[1] + n
        return prompt.shape[0] * n / seconds

    def ctranslate2(self, name: str, generator, prompt: torch.Tensor) -> float:
        start_tokens = [[f"t{i}" for i in row] for row in prompt.tolist()]
        n = self.new_tokens
        kwargs = dict(sampling_topk=1, include_prompt_in_result=False, max_batch_size=prompt.shape[0])
        generator.generate_batch(start_tokens, max_length=4, min_length=4, **kwargs)
        results = []
        seconds = best_seconds(
            lambda: results.append(generator.generate_batch(start_tokens, max_length=n, min_length=n, **kwargs)),
            self.repeats,
        )
        ids = torch.tensor([r.sequences_ids[0] for r in results[-1]])
        self.tokens[name, prompt.shape[0]] = torch.cat([prompt, ids], dim=1)
        return prompt.shape[0] * n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--prompt_tokens", type=int, default=16)
    parser.add_argument("--batch_sizes", default="1,8", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per entry; the fastest is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no_compile", action="store_true", help="skip the static cache + torch.compile rows")
    parser.add_argument("--no_ctranslate2", action="store_true")
    parser.add_argument("--layouts", action="store_true", help="first compare matmul weight layouts")
    args = parser.parse_args()
    for name in ("new_tokens", "prompt_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    small = GPT2ScratchConfig.from_preset("gpt2-small", qkv_bias=True)
    reference = GPT2LMHeadModel(config_to_hf(small)).eval()
    ours = from_hf(reference)
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    params = ours.num_parameters()
    bandwidth = read_bandwidth()
    flops = {dtype: matmul_flops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"torch {torch.__version__}, {args.threads} threads; gpt2-small shape, random weights, {params / 1e6:.0f}M "
          f"parameters; {args.prompt_tokens}-token prompts, {args.new_tokens} new greedy tokens")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> ceiling {bandwidth / (4 * params):.1f} steps/s in fp32, "
          f"{bandwidth / (2 * params):.1f} in bf16, ~{bandwidth / params:.1f} in int8")
    print(f"matmul throughput (1024^3, F.linear): fp32 {flops[torch.float32] / 1e9:.0f} GFLOP/s, bf16 "
          f"{flops[torch.bfloat16] / 1e9:.0f} GFLOP/s (bf16/fp32 {flops[torch.bfloat16] / flops[torch.float32]:.2f}x)")
    if args.layouts:
        layout_table(args.repeats)
    layout = ours.decode_layout()
    print(f"decode layout memory: fp32 {layout.nbytes() / 2**20:.0f} MiB, bf16 "
          f"{ours_bf16.decode_layout().nbytes() / 2**20:.0f} MiB (beside {params * 4 / 2**20:.0f} MiB of fp32 "
          "weights; built by generate(), freed with fast_decoding=False)\n")

    generators = {} if args.no_ctranslate2 else ctranslate2_generators(ours, small.vocab_size, args.threads)
    bench = Bench(args.prompt_tokens, args.new_tokens, args.repeats)

    # (row, precision, what generates, generate() arguments); fast_decoding switches our decode layout on or off.
    rows: list[tuple[str, str, object, dict]] = [
        ("ours fp32 (readable modules only)", "fp32", ours, dict(fast_decoding=False)),
        ("ours fp32 (decode layout)", "fp32", ours, dict(fast_decoding=True)),
        ("ours bf16 (decode layout)", "bf16", ours_bf16, dict(fast_decoding=True)),
        ("transformers fp32", "fp32", reference, {}),
        ("transformers bf16", "bf16", reference_bf16, {}),
    ]
    if not args.no_compile:
        # One static-cache size for the warm-up and the timed run: the compiled step is not recompiled between them.
        static = dict(cache_implementation="static", compile_config=cpu_compile_config(),
                      max_cache_len=args.prompt_tokens + args.new_tokens)
        rows += [
            ("ours fp32 static + compile", "fp32", ours, dict(fast_decoding=True, **static)),
            ("transformers fp32 static + compile", "fp32", reference, static),
            ("transformers bf16 static + compile", "bf16", reference_bf16, static),
        ]
    rows += [(name, name.split()[-1], generator, {}) for name, generator in generators.items()]

    for batch in map(int, args.batch_sizes.split(",")):
        prompt = torch.randint(0, small.vocab_size, (batch, args.prompt_tokens))
        print(f"batch {batch}: tokens/s (all sequences), and each step's weight reads as % of the bandwidth ceiling")
        results = {}
        for name, dtype, runner, kwargs in rows:
            if isinstance(runner, GPT2ScratchForCausalLM):
                runner.fast_decoding = kwargs["fast_decoding"]
                kwargs = {k: v for k, v in kwargs.items() if k != "fast_decoding"}
            if isinstance(runner, torch.nn.Module):
                results[name] = bench.generate(name, runner, prompt, **kwargs)
            else:
                results[name] = bench.ctranslate2(name, runner, prompt)
            step_bytes = params * {"fp32": 4, "bf16": 2, "int8": 1}[dtype]
            ceiling = results[name] / batch * step_bytes / bandwidth
            print(f"  {name:38s} {results[name]:8.1f} tok/s  {ceiling:6.1%} of the {dtype} ceiling", flush=True)
        report_ratios(results, bench, batch)


def cpu_compile_config() -> CompileConfig:
    """transformers' compiled generation, which it enables only on accelerators unless told to compile anywhere."""
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    return config


def ctranslate2_generators(ours: GPT2ScratchForCausalLM, vocab_size: int, threads: int) -> dict:
    """Export as a user would (`gpt2-scratch convert --to-hf`), then CTranslate2's own converter, fp32 and int8."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    folder = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    ours.save_pretrained(folder / "ours")
    word_level_tokenizer(vocab_size).save_pretrained(folder / "ours")
    convert_directory(folder / "ours", folder / "stock", to_stock=True)
    generators = {}
    for compute_type in ("float32", "int8"):
        out = folder / f"ct2_{compute_type}"
        TransformersConverter(str(folder / "stock")).convert(str(out), quantization=compute_type)
        label = "fp32" if compute_type == "float32" else "int8"
        generators[f"CTranslate2 {label}"] = ctranslate2.Generator(
            str(out), device="cpu", compute_type=compute_type, intra_threads=threads
        )
    return generators


def report_ratios(results: dict[str, float], bench: Bench, batch: int) -> None:
    ours = results["ours fp32 (decode layout)"]
    lines = [  # (label, numerator, denominator)
        ("ours fp32 / transformers fp32", ours, results["transformers fp32"]),
        ("ours fp32 / CTranslate2 fp32 (target >= 1.0)", ours, results.get("CTranslate2 fp32")),
        ("ours bf16 / ours fp32 (target >= 1.5)", results["ours bf16 (decode layout)"], ours),
        ("decode layout / readable modules (fp32)", ours, results["ours fp32 (readable modules only)"]),
        ("ours fp32 / CTranslate2 int8", ours, results.get("CTranslate2 int8")),
    ]
    for label, a, b in lines:
        if b:
            print(f"  {label:46s} {a / b:5.2f}x")
    plain = bench.tokens["ours fp32 (readable modules only)", batch]
    same = [name for (name, size), tokens in bench.tokens.items()
            if size == batch and "fp32" in name and "readable" not in name and torch.equal(tokens, plain)]
    print(f"  fp32 greedy tokens identical to ours (readable modules): {', '.join(same) or 'none'}\n")


if __name__ == "__main__":
    main()
