"""Speed of gpt2_scratch against transformers' own GPT2LMHeadModel, measured in one process on the same weights.

    .venv/bin/python benchmarks/bench_model.py            # full run (~5 minutes on 2 CPU cores, and the
                                                          # compiled demo model's two compilations)
    .venv/bin/python benchmarks/bench_model.py --parts compile   # the demo model, eager vs --torch_compile
    .venv/bin/python benchmarks/bench_model.py --quick    # fewer steps, for a smoke check

Prints training-step tokens/s (fp32 and bf16 autocast) for a 6-layer/384-wide/8192-vocab/256-context model at
batch 16, the demo's model trained by the training scripts' own loop eager and with --torch_compile, KV-cache decode
tokens/s for the gpt2-small preset (batch 1, 200 new tokens), the ratios, and MFU against a
bf16 matmul peak measured in the same run. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable

import torch
from accelerate.state import AcceleratorState, GradientState
from transformers import GPT2LMHeadModel

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.convert import config_to_hf, from_hf
from gpt2_scratch.pretraining import RECIPES, build_parser, collate_blocks
from gpt2_scratch.training import ProgressBar, TrainingLoop, make_accelerator


def matmul_peak_flops(bf16: bool, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large nn.Linear matmul: under autocast this is the oneDNN kernel the models' Linears use."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        torch.nn.functional.linear(a, b)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write): the ceiling for memory-bound batch-1 decoding."""
    src = torch.empty(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - start)


def train_tokens_per_s(model: torch.nn.Module, batch: torch.Tensor, bf16: bool, steps: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, oneDNN kernel selection
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch.numel() * steps / (time.perf_counter() - start)


def loop_run(model: torch.nn.Module, arguments: list[str], blocks: list[dict], warmup: int, steps: int,
             inspect: Callable[[TrainingLoop], None] | None = None) -> tuple[float, list[float]]:
    """`model` trained by the training scripts' loop, built from training/pretrain.py `arguments` as the script builds
    it, on `blocks` of token ids: tokens/s (`loop_tokens_per_s`) and the loss of every step. `inspect` sees the loop
    before it is closed."""
    with tempfile.TemporaryDirectory() as out:
        args = build_parser().parse_args(["--output_dir", out, "--max_steps", str(warmup + steps), "--logging_steps",
                                          "1", "--warmup_steps", "0", *arguments])
        loop = TrainingLoop(make_accelerator(args), args, model, blocks, collate_blocks, lambda unused: {})
        tokens = args.per_device_train_batch_size * args.gradient_accumulation_steps * len(blocks[0]["input_ids"])
        tps = loop_tokens_per_s(loop, tokens, warmup, steps)
        if inspect:
            inspect(loop)
        losses = [h["train/loss"] for h in loop.progress.history if "train/loss" in h]
        loop.close()
    AcceleratorState._reset_state(reset_partial_state=True)  # the next run may take another precision
    GradientState._reset_state()
    return tps, losses


def loop_tokens_per_s(loop: TrainingLoop, tokens_per_step: int, warmup: int, steps: int) -> float:
    """Tokens/s of the training scripts' own step, `TrainingLoop.train` (batches from its loader, forward, backward,
    clipping, optimizer and scheduler steps, the per-step clock), timed after `warmup` steps (compilation,
    allocator, kernel choice). The timed steps may not recompile: a compiled step that did would be measuring
    something else, so that fails."""
    bar = ProgressBar(None, None, loop.progress, enabled=False)

    def synchronize() -> None:
        if loop.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    loop.total_steps = warmup
    loop.train(bar)
    synchronize()
    loop.total_steps = warmup + steps
    start = time.perf_counter()
    with torch.compiler.set_stance("fail_on_recompile"):
        loop.train(bar)
    synchronize()
    return tokens_per_step * steps / (time.perf_counter() - start)


def decode_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> float:
    model.eval()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                  pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / (time.perf_counter() - start)


def train_flops_per_token(config: GPT2ScratchConfig) -> float:
    """6·N for the matmul weights (forward 2N, backward 4N) plus attention's score and mix matmuls (PaLM, app. B)."""
    matmul_params = config.n_layers * 12 * config.emb_dim**2 + config.vocab_size * config.emb_dim
    return 6 * matmul_params + 12 * config.n_layers * config.emb_dim * config.context_length


def stock_model(config: GPT2ScratchConfig, attn: str) -> GPT2LMHeadModel:
    hf_config = config_to_hf(config)
    hf_config._attn_implementation = attn
    return GPT2LMHeadModel(hf_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens")
    parser.add_argument("--precisions", default="fp32,bf16", help="training precisions to measure (comma-separated)")
    parser.add_argument("--parts", default="train,compile,decode", help="which parts to run (comma-separated)")
    args = parser.parse_args()
    parts, precisions = args.parts.split(","), args.precisions.split(",")
    steps = {"fp32": 2, "bf16": 1} if args.quick else {"fp32": 5, "bf16": 2}
    new_tokens = 40 if args.quick else 200
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peaks = {"bf16": matmul_peak_flops(bf16=True), "fp32": matmul_peak_flops(bf16=False)}
    peak = max(peaks.values())
    print(f"measured matmul peak: bf16 autocast {peaks['bf16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s;"
          f" MFU below is against the higher, {peak / 1e9:.0f} GFLOP/s\n")

    if "train" in parts:
        train_table(precisions, steps, peak)
    if "compile" in parts:
        compile_table(precisions, 5 if args.quick else 20, peak)
    if "decode" in parts:
        decode_table(new_tokens)


def train_table(precisions: list[str], steps: dict[str, int], peak: float) -> None:
    config = GPT2ScratchConfig(vocab_size=8192, context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.0)
    batch = torch.randint(0, config.vocab_size, (16, config.context_length))
    reference = stock_model(config, "sdpa")
    models = {
        "transformers eager": stock_model(config, "eager"),
        "transformers sdpa": reference,
        "gpt2_scratch eager": from_hf(reference),
        "gpt2_scratch sdpa": from_hf(reference),
    }
    models["transformers eager"].load_state_dict(reference.state_dict())
    models["gpt2_scratch eager"].config._attn_implementation = "eager"
    flops = train_flops_per_token(config)
    print("training step, 6 layers x 384 wide, vocab 8192, context 256, batch 16 (tokens/s, MFU)")
    results = {}
    for precision in precisions:
        for name, model in models.items():
            tps = train_tokens_per_s(model, batch, precision == "bf16", steps[precision])
            results[name, precision] = tps
            print(f"  {precision}  {name:20s} {tps:9.0f} tok/s   MFU {tps * flops / peak:6.1%}")
        best = max(results[n, precision] for n in models if n.startswith("transformers"))
        ours = max(results[n, precision] for n in models if n.startswith("gpt2_scratch"))
        print(f"  {precision}  gpt2_scratch / transformers' best: {ours / best:.2f}x\n")


def compile_table(precisions: list[str], steps: int, peak: float, warmup: int = 3) -> None:
    """The demo's model (`make demo`: the 10-minute recipe's shape, batch and optimizer) trained by the scripts' loop,
    eager and with --torch_compile, from the same weights on the same batches."""
    recipe = RECIPES[10]
    config = GPT2ScratchConfig.from_preset("cpu-10m", vocab_size=recipe.vocab_size, drop_rate=0.0, **recipe.model)
    torch.manual_seed(0)
    blocks = [{"input_ids": torch.randint(0, config.vocab_size, (config.context_length,))}
              for _ in range(recipe.batch_size * (warmup + steps))]
    arguments = ["--per_device_train_batch_size", str(recipe.batch_size), "--learning_rate", str(recipe.learning_rate),
                 "--optimizer", recipe.optimizer, "--muon_learning_rate", str(recipe.muon_learning_rate),
                 "--muon_ns_steps", str(recipe.muon_ns_steps)]
    flops = train_flops_per_token(config)
    print(f"training step in the scripts' loop, the demo's model ({config.n_layers} layers x {config.emb_dim} wide, "
          f"vocab {config.vocab_size}, context {config.context_length}, batch {recipe.batch_size}, "
          f"{recipe.optimizer}), eager and --torch_compile (tokens/s, MFU; {steps} steps after {warmup})")
    for precision in precisions:
        results = {}
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            model = GPT2ScratchForCausalLM(config)
            flags = ["--mixed_precision", "bf16" if precision == "bf16" else "no"] + (
                ["--torch_compile"] if mode == "compiled" else [])
            results[mode], losses = loop_run(model, arguments + flags, blocks, warmup, steps)
            print(f"  {precision}  {mode:9s} {results[mode]:9.0f} tok/s   MFU {results[mode] * flops / peak:6.1%}   "
                  f"first loss {losses[0]:.5f}", flush=True)
        print(f"  {precision}  compiled / eager: {results['compiled'] / results['eager']:.2f}x\n")


def decode_table(new_tokens: int) -> None:
    small = GPT2ScratchConfig.from_preset("gpt2-small", qkv_bias=True)
    reference = stock_model(small, "sdpa")
    ours = from_hf(reference)
    prompt = torch.randint(0, small.vocab_size, (1, 16))
    print(f"decode, gpt2-small, batch 1, {new_tokens} new tokens, greedy, fp32 (tokens/s)")
    decode = {
        "gpt2_scratch generate (KV cache)": decode_tokens_per_s(ours, prompt, new_tokens, True),
        "gpt2_scratch generate (no cache)": decode_tokens_per_s(ours, prompt, new_tokens, False),
        "transformers generate (KV cache)": decode_tokens_per_s(reference, prompt, new_tokens, True),
    }
    for name, tps in decode.items():
        print(f"  {name:34s} {tps:7.1f} tok/s")
    cached = decode["gpt2_scratch generate (KV cache)"]
    weight_bytes = ours.num_parameters() * 4
    print(f"  each cached step streams all {weight_bytes / 2**20:.0f} MiB of fp32 weights: "
          f"{cached * weight_bytes / 1e9:.1f} GB/s achieved vs {copy_bandwidth() / 1e9:.1f} GB/s copy bandwidth")
    print(f"  vs transformers: {cached / decode['transformers generate (KV cache)']:.2f}x   "
          f"vs our no-cache path: {cached / decode['gpt2_scratch generate (no cache)']:.2f}x")


if __name__ == "__main__":
    main()
