"""CPU decode speed: gpt2_scratch against transformers' GPT2LMHeadModel and CTranslate2, taking turns.

    .venv/bin/python benchmarks/bench_generate.py                      # 200 new tokens, batch 1 and 8 (~15 minutes)
    .venv/bin/python benchmarks/bench_generate.py --new_tokens 32 --no_compile   # a quick look
    .venv/bin/python benchmarks/bench_generate.py --layouts ...     # first: F.linear vs x @ W_t, fp32 and bf16

The gpt2-small shape with random weights (the same weights everywhere), greedy, every sequence forced to the same
length. Measured: ours fp32 (the readable modules alone, and through the decode layout generate() builds) and bf16;
transformers fp32 and bf16 with the dynamic cache; ours and transformers, fp32 and bf16, with a static cache +
torch.compile; CTranslate2 fp32 and int8 on the folder `gpt2-scratch convert --to-hf` writes, each in a worker
process of its own; a read-bandwidth ceiling (every weight is read once per step).
Prints tokens/s, ratios and % of that ceiling, the rate of a plain bf16 read, the decode layout's memory, a matmul
bf16/fp32 throughput ratio, and from these the most bf16 can gain over fp32 at each batch size (attainable_bf16_ratio).
Not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models
from torch import nn
from transformers import CompileConfig, DynamicCache, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.cache_utils import DynamicLayer

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.convert import config_to_hf, convert_directory, from_hf
from gpt2_scratch.decoding_gpt2_scratch import DecodeLayout, DecodeMatmul


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs: on a shared machine the others measure the neighbours."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> dict[torch.dtype, float]:
    """Bytes/s a reduction streams from memory, fp32 and bf16 taking turns: decoding one token must read every weight
    once, so this bounds it. In bf16 the reduction also widens every element as it reads, as PyTorch's bf16 matmuls
    do."""
    data = [torch.ones(megabytes * 2**20 // dtype.itemsize, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
    best = [float("inf")] * len(data)
    for _ in range(repeats + 1):  # the first round also warms up
        for i, tensor in enumerate(data):
            start = time.perf_counter()
            tensor.sum()
            best[i] = min(best[i], time.perf_counter() - start)
    return {tensor.dtype: megabytes * 2**20 / seconds for tensor, seconds in zip(data, best)}


def matmul_flops(dtype: torch.dtype, size: int = 1024) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    F.linear(a, b)
    return 2 * size**3 / best_seconds(lambda: F.linear(a, b), 3)


def attainable_bf16_ratio(batch: int, weights: int, bandwidth: float, flops: dict[torch.dtype, float]) -> str:
    """The most a bf16 step's matmuls can gain over fp32's on this CPU, each as fast as the hardware allows: each
    dtype's floor is the longer of reading its weights once (bytes at the plain fp32 read's rate) and its multiply-adds
    at the square matmul's rate. bf16 may multiply at fp32's rate (widened, as a CPU without bf16 instructions does):
    where the multiply-adds take longer than reading bf16's weights, halving the bytes gains less than 2x."""
    floors = {}
    for dtype in (torch.float32, torch.bfloat16):
        floors[dtype] = (weights * dtype.itemsize / bandwidth,
                         2 * batch * weights / max(flops[dtype], flops[torch.float32]))
    ratio = max(floors[torch.float32]) / max(floors[torch.bfloat16])
    shown = "; ".join(f"{name} max({read * 1e3:.1f} ms reading, {compute * 1e3:.1f} ms multiplying)"
                      for name, (read, compute) in zip(("fp32", "bf16"), floors.values()))
    return f"at most {ratio:.2f}x bf16 / fp32 for a {batch}-row step's matmuls on this CPU: {shown}"


def layout_table(repeats: int) -> None:
    """Why the decode layout uses oneDNN, and where its kernel stops: one step's matmuls (12 gpt2-small blocks and
    the tied head, 475 MiB in fp32) through F.linear on nn.Linear's (out × in) weights, `x @ W` on (in × out) copies
    (transformers' Conv1D layout), and oneDNN's linear (the weights as they are; on the (in × out) copies, which it
    multiplies with its sgemm kernel; for several rows also prepacked for 8, as the decode layout multiplies them,
    and the compiled step's reductions, each row summed over the weights in one loop, in fp32 and bf16); bf16
    F.linear beside. Then, per weight shape, the GB/s each one-row product streams against a plain read of the
    same weights (`sum()`): oneDNN's linear on either layout and inductor's code for the same product written as a
    reduction, over the weight's rows in one block and in `DecodeMatmul.streams` blocks (the compiled step's, which
    inductor fuses into one loop over that many rows at a time); and for the weights in bf16 (GB/s of bf16 bytes):
    F.linear (PyTorch's bf16 matrix-vector product, the eager step's), inductor's reduction in the compiled step's
    blocks and a plain bf16 read."""
    shapes = [(3 * 768, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]
    weights = [torch.randn(out_features, in_features) * 0.02 for out_features, in_features in shapes]
    print("one decode step's matmuls, weights read from memory (ms per step, best of repeats)")
    for batch in (1, 8):
        cells = [f"{name} {seconds * 1e3:6.1f}" for name, seconds in step_matmul_seconds(weights, batch, repeats)]
        print(f"  batch {batch}:  " + ";  ".join(cells))
    print("one row, GB/s per weight shape (all 12 layers' weights of that shape, or the head)")
    # one compiled call for a shape's 12 weights, as the compiled step makes one call for all (a call costs ~50 us)
    one_block = torch.compile(lambda x, weights: [(weight * x).sum(1) for weight in weights], dynamic=False)
    reduction = torch.compile(lambda x, weights: [DecodeMatmul.blocked_product(x, w) for w in weights], dynamic=False)
    for shape in dict.fromkeys(shapes):
        group = [w for w in weights if w.shape == shape]
        transposed = [w.t().contiguous().t() for w in group]
        bf16 = [w.to(torch.bfloat16) for w in group]
        x, x_bf16 = torch.randn(1, shape[1]), torch.randn(1, shape[1], dtype=torch.bfloat16)
        one_block(x, group), reduction(x, group), reduction(x_bf16, bf16)
        runs = {
            "oneDNN linear": lambda g=group, x=x: [torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                                                   for w in g],
            "oneDNN, (in x out) copy": lambda g=transposed, x=x: [
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in g],
            "compiled reduction, 1 block": lambda g=group, x=x: one_block(x, g),
            f"{DecodeMatmul.streams} blocks": lambda g=group, x=x: reduction(x, g),
            "sum() (a plain read)": lambda g=group: [w.sum() for w in g],
        }
        runs_bf16 = {
            "F.linear": lambda g=bf16, x=x_bf16: [F.linear(x, w) for w in g],
            f"compiled reduction, {DecodeMatmul.streams} blocks": lambda g=bf16, x=x_bf16: reduction(x, g),
            "sum()": lambda g=bf16: [w.sum() for w in g],
        }
        gigabytes = sum(w.numel() * 4 for w in group) / 1e9
        cells = [f"{name} {gigabytes / best_seconds(run, repeats):5.1f}" for name, run in runs.items()]
        cells += [f"bf16 {name} {gigabytes / 2 / best_seconds(run, repeats):5.1f}" for name, run in runs_bf16.items()]
        print(f"  {shape[0]:>5} x {shape[1]:<4} ({gigabytes * 1e3:3.0f} MB):  " + ";  ".join(cells))
    print()


def step_matmul_seconds(weights: list[torch.Tensor], batch: int, repeats: int) -> list[tuple[str, float]]:
    xs = [torch.randn(batch, w.shape[1]) for w in weights]
    in_out = [w.t().contiguous() for w in weights]
    bf16 = [w.to(torch.bfloat16) for w in weights]
    linear = torch.ops.mkldnn._linear_pointwise
    runs = {
        "fp32 F.linear(x, W)": lambda: [F.linear(a, w) for a, w in zip(xs, weights)],
        "fp32 x @ W_t": lambda: [a @ w for a, w in zip(xs, in_out)],
        "fp32 oneDNN": lambda: [linear(a, w, None, "none", [], "") for a, w in zip(xs, weights)],
        "fp32 oneDNN on W_t": lambda: [linear(a, w.t(), None, "none", [], "") for a, w in zip(xs, in_out)],
        "bf16 F.linear(x, W)": lambda: [F.linear(a.to(torch.bfloat16), w) for a, w in zip(xs, bf16)],
    }
    if batch > 1:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights]
        runs["fp32 oneDNN prepacked"] = lambda: [linear(a, w, None, "none", [], "") for a, w in zip(xs, packed)]
        # the compiled step's products: each row summed over the weights themselves, in one compiled call
        rows = [a.unsqueeze(1) for a in xs]
        for dtype, tensors in (("fp32", weights), ("bf16", bf16)):
            matmuls = [DecodeMatmul([as_linear(w)], "reduction") for w in tensors]
            step = torch.compile(lambda inputs, m=matmuls: [matmul(x) for matmul, x in zip(m, inputs)], dynamic=False)
            inputs = [x.to(tensors[0].dtype) for x in rows]
            step(inputs)
            runs[f"{dtype} compiled reduction"] = lambda step=step, inputs=inputs: step(inputs)
    return [(name, best_seconds(run, repeats)) for name, run in runs.items()]


def as_linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear without bias whose weight is `weight` itself (no copy)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def layout_matmul_seconds(model: GPT2ScratchForCausalLM, batch: int, repeats: int) -> float:
    """One decode step's matmuls through the model's decode layout alone, without the attention, norms and Python
    around them: a floor under the step's time set by the matmul kernel."""
    matmuls = model.decode_layout(batch).matmuls()
    inputs = [torch.randn(batch, 1, matmul.in_features) for matmul in matmuls]
    with torch.no_grad():
        return best_seconds(lambda: [matmul(x) for matmul, x in zip(matmuls, inputs)], repeats)


def vocabulary(vocab_size: int) -> list[str]:
    """Token strings by id: t0, t1, ..., and GPT-2's end-of-text token last."""
    return [f"t{i}" for i in range(vocab_size - 1)] + ["<|endoftext|>"]


def word_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer covering the vocabulary (CTranslate2 reads the vocabulary, and its bos/eos/unk tokens, which must
    all be set, from the folder): no GPT-2 tokenizer ships offline, and decode speed does not depend on the strings.
    Like GPT-2's, its one special token, the last id, is bos, eos and unk at once."""
    vocab = {token: i for i, token in enumerate(vocabulary(vocab_size))}
    last = "<|endoftext|>"
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=last))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=last, bos_token=last, eos_token=last)


Run = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt ids, new tokens) → prompt + generated ids


class ConcatenatingLayer(DynamicLayer):
    """transformers' DynamicLayer (a new tensor every step) under another name, which the decode layout leaves as it
    is instead of making it grow in place: the row that shows what GrowingLayer saves."""


def concatenating_cache_run(model: GPT2ScratchForCausalLM) -> Run:
    def run(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        cache = DynamicCache()
        cache.layer_class_to_replicate = ConcatenatingLayer
        return generate_run(model, cache=cache)(prompt, new_tokens)
    return run


def generate_run(model: torch.nn.Module, **kwargs) -> Run:
    """Greedy generate(). The model has no end-of-text token (see main), so every sequence runs the full length."""
    def run(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return run


def ctranslate2_run(connection: Connection, vocab_size: int) -> Run:
    """Greedy generate_batch() with no end token, so every sequence runs the full length, in the worker process at
    the other end of `connection` (see ctranslate2_worker)."""
    strings = vocabulary(vocab_size)

    def run(prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        connection.send(([[strings[i] for i in row] for row in prompt.tolist()], new_tokens))
        return torch.cat([prompt, torch.tensor(connection.recv())], dim=1)
    return run


def ctranslate2_worker(folder: str, compute_type: str, threads: int, connection: Connection) -> None:
    """CTranslate2 in a process of its own (a daemon: it ends with the benchmark), answering (start tokens, new
    tokens) requests. In the benchmark's own process its runs slowed the PyTorch runtimes timed after them, by up to
    ~40% (docs/speed.md)."""
    import ctranslate2

    generator = ctranslate2.Generator(folder, device="cpu", compute_type=compute_type, intra_threads=threads)
    while True:
        try:
            start_tokens, new_tokens = connection.recv()
        except EOFError:  # the benchmark has ended
            return
        results = generator.generate_batch(start_tokens, max_length=new_tokens, sampling_topk=1, end_token=[],
                                           include_prompt_in_result=False, max_batch_size=len(start_tokens))
        connection.send([result.sequences_ids[0] for result in results])


def tokens_per_second(runs: dict[str, Run], prompt: torch.Tensor, new_tokens: int, repeats: int
                      ) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, float]]:
    """Each runtime's best of `repeats` timed runs, after a short warm-up (allocator, kernel choice, compilation,
    the decode layout), and the warm-up's seconds. The runtimes take turns within each repeat, so a slower or busier
    stretch of the machine falls on all of them rather than on whichever ran then."""
    warmup = {}
    for name, run in runs.items():
        start = time.perf_counter()
        run(prompt, 4)
        warmup[name] = time.perf_counter() - start
    best, tokens = dict.fromkeys(runs, float("inf")), {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            tokens[name] = run(prompt, new_tokens)
            best[name] = min(best[name], time.perf_counter() - start)
            assert tokens[name].shape == (prompt.shape[0], prompt.shape[1] + new_tokens), name
    return {name: prompt.shape[0] * new_tokens / seconds for name, seconds in best.items()}, tokens, warmup


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
    parser.add_argument("--skip", default="", help="comma-separated parts of row names to leave out, e.g. "
                        "'transformers bf16' (~4 tok/s at batch 8 on a CPU without bf16 instructions)")
    args = parser.parse_args()
    for name in ("new_tokens", "prompt_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    # Every compiled row compiles the same code object (nn.Module's __call__), once per model and batch size: more
    # than dynamo's default of 8 recompiles, after which it would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)

    small = GPT2ScratchConfig.from_preset("gpt2-small", qkv_bias=True)
    reference = GPT2LMHeadModel(config_to_hf(small)).eval()
    ours = from_hf(reference)
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    params = ours.num_parameters()
    weights = sum(module.weight.numel() for module in ours.modules() if isinstance(module, nn.Linear))
    reads = read_bandwidth()
    bandwidth, bandwidth_bf16 = reads[torch.float32], reads[torch.bfloat16]
    flops = {dtype: matmul_flops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(f"torch {torch.__version__}, {args.threads} threads; gpt2-small shape, random weights, {params / 1e6:.0f}M "
          f"parameters; {args.prompt_tokens}-token prompts, {args.new_tokens} new greedy tokens")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> ceiling {bandwidth / (4 * params):.1f} steps/s in fp32, "
          f"{bandwidth / (2 * params):.1f} in bf16, ~{bandwidth / params:.1f} in int8")
    print(f"a plain bf16 read (sum(), widening each element as PyTorch's bf16 matmuls do) streams "
          f"{bandwidth_bf16 / 1e9:.1f} GB/s: {bandwidth_bf16 / (2 * params):.1f} bf16 steps/s, "
          f"{2 * bandwidth_bf16 / bandwidth:.2f}x the fp32 ceiling (the bf16 / fp32 target is 1.5x)")
    print(f"matmul throughput (1024^3, F.linear): fp32 {flops[torch.float32] / 1e9:.0f} GFLOP/s, bf16 "
          f"{flops[torch.bfloat16] / 1e9:.0f} GFLOP/s (bf16/fp32 {flops[torch.bfloat16] / flops[torch.float32]:.2f}x)")
    if args.layouts:
        layout_table(args.repeats)
    memory = {(name, rows): model.decode_layout(rows).nbytes() / 2**20
              for name, model in (("fp32", ours), ("bf16", ours_bf16)) for rows in (1, 8)}
    sizes = ", ".join(f"{name} {memory[name, 1]:.0f} / {memory[name, 8]:.0f}" for name in ("fp32", "bf16"))
    print(f"decode layout memory (MiB) for one row / several: {sizes} (beside {params * 4 / 2**20:.0f} MiB of fp32 "
          "weights; built by generate(), freed with fast_decoding=False)")
    kernels = {"vector": "oneDNN's linear", "linear": "F.linear (BLAS)", "transposed": "oneDNN on an (in x out) copy",
               "prepacked": "oneDNN's prepacked copy"}
    for name, model in (("fp32", ours), ("bf16", ours_bf16)):
        one_row = {}  # weight shape -> the kernel measured fastest for it
        for matmul in model.decode_layout(1).matmuls():
            one_row.setdefault(f"{matmul.in_features} -> {matmul.weight.shape[0]}", kernels[matmul.kind])
        print(f"one {name} row, the kernel measured fastest here per weight shape: "
              + "; ".join(f"{shape} {kernel}" for shape, kernel in one_row.items()))
    compiled = "BLAS" if ours.decode_layout(1).head.kind == "linear" else "inductor's reduction loop"
    several = ("oneDNN's prepacked copies (the eager layout's, kept beside the parameters)"
               if DecodeLayout.packs_several_rows() else
               f"for up to {DecodeMatmul.max_rows} rows, inductor's loop summing each row")
    print(f"a compiled one-row step calls {compiled} (bf16: inductor's reduction loop); a compiled step of several "
          f"rows multiplies by {several}\n")

    workers = {} if args.no_ctranslate2 else ctranslate2_workers(ours, small.vocab_size, args.threads)
    plain = copy.deepcopy(ours)
    plain.fast_decoding = False  # the readable modules alone
    for model in (ours, ours_bf16, plain, reference, reference_bf16):
        model.generation_config.eos_token_id = None  # every sequence runs the full length, as with CTranslate2's

    # name → (precision, how it generates)
    runs: dict[str, tuple[str, Run]] = {
        "ours fp32 (readable modules only)": ("fp32", generate_run(plain)),
        "ours fp32 (decode layout)": ("fp32", generate_run(ours)),
        "ours fp32 (decode layout, concatenating cache)": ("fp32", concatenating_cache_run(ours)),
        "ours bf16 (decode layout)": ("bf16", generate_run(ours_bf16)),
        "transformers fp32": ("fp32", generate_run(reference)),
        "transformers bf16": ("bf16", generate_run(reference_bf16)),
    }
    if not args.no_compile:
        # One static-cache size for the warm-up and the timed runs: the compiled step is not recompiled between them.
        static = dict(cache_implementation="static", compile_config=cpu_compile_config(),
                      max_cache_len=args.prompt_tokens + args.new_tokens)
        runs |= {
            "ours fp32 static + compile": ("fp32", generate_run(ours, **static)),
            "ours bf16 static + compile": ("bf16", generate_run(ours_bf16, **static)),
            "transformers fp32 static + compile": ("fp32", generate_run(reference, **static)),
            "transformers bf16 static + compile": ("bf16", generate_run(reference_bf16, **static)),
        }
    runs |= {name: (name.split()[-1], ctranslate2_run(connection, small.vocab_size))
             for name, connection in workers.items()}

    skipped = [part for part in args.skip.split(",") if part]
    runs = {name: run for name, run in runs.items() if not any(part in name for part in skipped)}
    for batch in map(int, args.batch_sizes.split(",")):
        prompt = torch.randint(0, small.vocab_size, (batch, args.prompt_tokens))
        results, tokens, warmup = tokens_per_second({name: run for name, (_, run) in runs.items()}, prompt,
                                                    args.new_tokens, args.repeats)
        print(f"batch {batch}: tokens/s (all sequences), and each step's weight reads as % of the bandwidth ceiling")
        for name, (dtype, _) in runs.items():
            step_bytes = params * {"fp32": 4, "bf16": 2, "int8": 1}[dtype]
            ceiling = results[name] / batch * step_bytes / bandwidth
            print(f"  {name:46s} {results[name]:8.1f} tok/s  {ceiling:6.1%} of the {dtype} ceiling", flush=True)
        report_ratios(results, tokens)
        compiled = [f"{name.removesuffix(' static + compile')} {seconds:.1f} s" for name, seconds in warmup.items()
                    if "compile" in name]
        if compiled:
            print("  first call, 4 tokens, compiling the step (inductor's on-disk cache may hold earlier runs' code): "
                  + ", ".join(compiled))
        print(f"  {attainable_bf16_ratio(batch, weights, bandwidth, flops)} (the target is 1.5x)")
        floor = layout_matmul_seconds(ours, batch, max(args.repeats, 3))
        line = f"  ours fp32, the decode layout's matmuls alone: {floor * 1e3:.1f} ms a step"
        if "CTranslate2 fp32" in results:
            line += f" (CTranslate2 fp32's whole step: {batch / results['CTranslate2 fp32'] * 1e3:.1f} ms)"
        print(line + "\n")


def cpu_compile_config() -> CompileConfig:
    """transformers' compiled generation, which it enables only on accelerators unless told to compile anywhere;
    inductor's C++ wrapper calls the step's kernels without a Python line each (48.4 against 46.9 tok/s, best of 7,
    at batch 1 on the Intel Xeon: docs/speed.md). torch.compile takes options or a mode, not both."""
    config = CompileConfig(fullgraph=True, mode=None, options={"cpp_wrapper": True})
    config._compile_all_devices = True
    return config


def ctranslate2_workers(ours: GPT2ScratchForCausalLM, vocab_size: int, threads: int) -> dict[str, Connection]:
    """Export as a user would (`gpt2-scratch convert --to-hf`), then CTranslate2's own converter, fp32 and int8,
    each served by a worker process (ctranslate2_worker); returns the connection to each."""
    from ctranslate2.converters import TransformersConverter

    folder = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    ours.save_pretrained(folder / "ours")
    word_level_tokenizer(vocab_size).save_pretrained(folder / "ours")
    convert_directory(folder / "ours", folder / "stock", to_stock=True)
    connections, spawn = {}, multiprocessing.get_context("spawn")
    for compute_type in ("float32", "int8"):
        out = folder / f"ct2_{compute_type}"
        TransformersConverter(str(folder / "stock")).convert(str(out), quantization=compute_type)
        label = "fp32" if compute_type == "float32" else "int8"
        ours_end, worker_end = spawn.Pipe()
        spawn.Process(
            target=ctranslate2_worker, args=(str(out), compute_type, threads, worker_end), daemon=True
        ).start()
        connections[f"CTranslate2 {label}"] = ours_end
    return connections


def report_ratios(results: dict[str, float], tokens: dict[str, torch.Tensor]) -> None:
    """The ratios the targets are about, for the rows that ran (see --skip)."""
    ours, compiled = results.get("ours fp32 (decode layout)"), results.get("ours fp32 static + compile")
    lines = [  # (label, numerator, denominator)
        ("ours fp32 / transformers fp32", ours, results.get("transformers fp32")),
        ("ours fp32 / CTranslate2 fp32 (target >= 1.0)", ours, results.get("CTranslate2 fp32")),
        ("ours bf16 / ours fp32 (target >= 1.5)", results.get("ours bf16 (decode layout)"), ours),
        ("compiled: ours fp32 / CTranslate2 fp32", compiled, results.get("CTranslate2 fp32")),
        ("compiled: ours fp32 / transformers fp32", compiled, results.get("transformers fp32 static + compile")),
        ("compiled: ours bf16 / ours fp32", results.get("ours bf16 static + compile"), compiled),
        ("decode layout / readable modules (fp32)", ours, results.get("ours fp32 (readable modules only)")),
        ("growing cache / concatenating (fp32)", ours, results.get("ours fp32 (decode layout, concatenating cache)")),
        ("ours fp32 / CTranslate2 int8", ours, results.get("CTranslate2 int8")),
    ]
    for label, a, b in lines:
        if a and b:
            print(f"  {label:46s} {a / b:5.2f}x")
    plain = tokens.get("ours fp32 (readable modules only)")
    if plain is not None:
        same = [name for name, ids in tokens.items()
                if "fp32" in name and "readable" not in name and torch.equal(ids, plain)]
        print(f"  fp32 greedy tokens identical to ours (readable modules): {', '.join(same) or 'none'}")


if __name__ == "__main__":
    main()
