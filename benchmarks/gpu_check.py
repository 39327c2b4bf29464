"""GPU check (needs CUDA; about 3-5 minutes): bf16 training speed and MFU, and compiled static-cache decoding, for
gpt2_scratch against transformers' GPT2LMHeadModel on the same weights, in one process.

    .venv/bin/python benchmarks/gpu_check.py            # training at batch 8 x 1024, decoding at batch 1 and 8
    .venv/bin/python benchmarks/gpu_check.py --quick    # fewer steps and tokens

Prints: a bf16 matmul peak measured in the same run; training-step tokens/s and MFU against that peak (bf16 autocast,
fused AdamW, sdpa); decode tokens/s with the dynamic cache and with transformers' compiled path (static cache +
torch.compile, CUDA graphs) and the ratios; in fp32, for how many tokens each path's greedy output agrees with ours
on the dynamic cache. Without CUDA it says so and exits 2.
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


def decode_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int = 3,
                        **kwargs) -> tuple:
    """The best of `repeats` timed generate() calls (a small model's decode step is bound by the host's launches, and
    they vary from call to call), and the new tokens."""
    model.eval()
    kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    with torch.no_grad():
        model.generate(prompt, **kwargs)  # warm-up; compiles the decode step on the compiled path
        out = []
        seconds = min(cuda_seconds(lambda: out.append(model.generate(prompt, **kwargs))) for _ in range(repeats))
    return prompt.shape[0] * new_tokens / seconds, out[0][:, prompt.shape[1]:]


def agreeing_tokens(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many new tokens two greedy runs share before any row first differs."""
    differs = (a != b).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else a.shape[1]


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

    def same_weights() -> tuple[torch.nn.Module, torch.nn.Module]:
        """gpt2_scratch and transformers' GPT-2 on the same weights, seeded (training takes them apart)."""
        torch.manual_seed(0)
        reference = GPT2LMHeadModel(config_to_hf(config))
        return from_hf(reference).cuda(), reference.cuda()

    ours, reference = same_weights()
    batch = torch.randint(0, config.vocab_size, (8, config.context_length), device="cuda")
    flops = train_flops_per_token(config)
    print(f"training step, gpt2-small, batch {tuple(batch.shape)}, bf16 autocast, fused AdamW")
    train = {name: train_tokens_per_s(model, batch, steps) for name, model in
             (("gpt2_scratch", ours), ("transformers", reference))}
    for name, tps in train.items():
        print(f"  {name:14s} {tps:10.0f} tok/s   MFU {tps * flops / peak:6.1%}")
    print(f"  gpt2_scratch / transformers: {train['gpt2_scratch'] / train['transformers']:.2f}x\n")

    ours, reference = (model.to(torch.bfloat16) for model in same_weights())
    compiled = dict(cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
    for size in (1, 8):
        prompt = torch.randint(0, config.vocab_size, (size, 16), device="cuda")
        print(f"decode, bf16, batch {size}, {new_tokens} new greedy tokens (tokens/s, all sequences)")
        results = {}
        for name, model in (("gpt2_scratch", ours), ("transformers", reference)):
            for path, kwargs in (("dynamic cache", {}), ("static cache + compile", compiled)):
                results[name, path] = decode_tokens_per_s(model, prompt, new_tokens, **kwargs)[0]
                print(f"  {name:14s} {path:24s} {results[name, path]:8.1f} tok/s", flush=True)
        for path in ("dynamic cache", "static cache + compile"):
            ratio = results["gpt2_scratch", path] / results["transformers", path]
            print(f"  {path}: gpt2_scratch / transformers {ratio:.2f}x")
        print()

    # Tokens are held to each other in fp32 with TF32 off: in bf16 random weights leave near-ties in the logits,
    # which sums ordered differently (another kernel, another fusion) break either way.
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, reference = same_weights()
    prompt = torch.randint(0, config.vocab_size, (8, 16), device="cuda")
    print(f"greedy tokens, fp32 (TF32 off), batch 8, {new_tokens} new tokens: how many agree with gpt2_scratch's "
          "dynamic cache")
    _, plain = decode_tokens_per_s(ours, prompt, new_tokens)
    for name, model in (("gpt2_scratch", ours), ("transformers", reference)):
        for path, kwargs in (("dynamic cache", {}), ("static cache + compile", compiled)):
            if (name, path) != ("gpt2_scratch", "dynamic cache"):
                same = agreeing_tokens(plain, decode_tokens_per_s(model, prompt, new_tokens, **kwargs)[1])
                print(f"  {name:14s} {path:24s} {same}/{new_tokens}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
