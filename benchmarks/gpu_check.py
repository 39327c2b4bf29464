"""GPU check (needs CUDA; about 3-5 minutes): bf16 training speed and MFU, and compiled static-cache decoding, for
gpt2_scratch against transformers' GPT2LMHeadModel on the same weights, in one process.

    .venv/bin/python benchmarks/gpu_check.py            # training at batch 8 x 1024, decoding at batch 1 and 8
    .venv/bin/python benchmarks/gpu_check.py --quick    # fewer steps and tokens

Prints: a bf16 matmul peak measured in the same run; training-step tokens/s and MFU against that peak (bf16 autocast,
fused AdamW, sdpa); decode tokens/s with the dynamic cache and with transformers' compiled path (static cache +
torch.compile, CUDA graphs), whether the greedy tokens agree, and the ratios. Without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def cuda_seconds(run) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bf16_matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    a @ b

    def run() -> None:
        for _ in range(repeats):
            a @ b

    return 2 * size**3 * repeats / cuda_seconds(run)


def train_tokens_per_s(model: torch.nn.Module, batch: torch.Tensor, steps: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, cuBLAS heuristics
        step()
    return batch.numel() * steps / cuda_seconds(lambda: [step() for _ in range(steps)])


def decode_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, **kwargs) -> tuple:
    model.eval()
    kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    with torch.no_grad():
        model.generate(prompt, **kwargs)  # warm-up; compiles the decode step on the compiled path
        out = []
        seconds = cuda_seconds(lambda: out.append(model.generate(prompt, **kwargs)))
    return prompt.shape[0] * new_tokens / seconds, out[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer training steps and new tokens")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False here; nothing was measured. "
              "Run it on a machine with a GPU (CPU decode speed: benchmarks/bench_generate.py).", file=sys.stderr)
        return 2
    # Imported only once a GPU is known to be there: without one the answer comes before transformers loads.
    from bench_model import train_flops_per_token
    from transformers import CompileConfig, GPT2LMHeadModel

    from gpt2_scratch import GPT2ScratchConfig
    from gpt2_scratch.convert import config_to_hf, from_hf

    steps, new_tokens = (5, 50) if args.quick else (20, 200)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = bf16_matmul_peak()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; measured bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s (MFU below is against it)\n")

    config = GPT2ScratchConfig.from_preset("gpt2-small", qkv_bias=True, drop_rate=0.0)
    reference = GPT2LMHeadModel(config_to_hf(config))
    ours, reference = from_hf(reference).cuda(), reference.cuda()
    batch = torch.randint(0, config.vocab_size, (8, config.context_length), device="cuda")
    flops = train_flops_per_token(config)
    print(f"training step, gpt2-small, batch {tuple(batch.shape)}, bf16 autocast, fused AdamW")
    train = {name: train_tokens_per_s(model, batch, steps) for name, model in
             (("gpt2_scratch", ours), ("transformers", reference))}
    for name, tps in train.items():
        print(f"  {name:14s} {tps:10.0f} tok/s   MFU {tps * flops / peak:6.1%}")
    print(f"  gpt2_scratch / transformers: {train['gpt2_scratch'] / train['transformers']:.2f}x\n")

    ours, reference = ours.to(torch.bfloat16).eval(), reference.to(torch.bfloat16).eval()
    compiled = dict(cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
    for size in (1, 8):
        prompt = torch.randint(0, config.vocab_size, (size, 16), device="cuda")
        print(f"decode, bf16, batch {size}, {new_tokens} new greedy tokens (tokens/s, all sequences)")
        results, tokens = {}, {}
        for name, model in (("gpt2_scratch", ours), ("transformers", reference)):
            for path, kwargs in (("dynamic cache", {}), ("static cache + compile", compiled)):
                results[name, path], tokens[name, path] = decode_tokens_per_s(model, prompt, new_tokens, **kwargs)
                print(f"  {name:14s} {path:24s} {results[name, path]:8.1f} tok/s", flush=True)
        for path in ("dynamic cache", "static cache + compile"):
            same = torch.equal(tokens["gpt2_scratch", path], tokens["transformers", path])
            ratio = results["gpt2_scratch", path] / results["transformers", path]
            print(f"  {path}: gpt2_scratch / transformers {ratio:.2f}x, same greedy tokens: {same}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
