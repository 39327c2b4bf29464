"""GPU check (needs CUDA; about 6-8 minutes on one H100 or H200, `--parts train,fsdp` about 3-4): training in the
training scripts' own loop, an FSDP pass, and decoding, gpt2_scratch beside transformers' GPT2LMHeadModel on the
same weights, in one process.

    .venv/bin/python benchmarks/gpu_check.py                      # train, fsdp and decode
    .venv/bin/python benchmarks/gpu_check.py --parts train,fsdp   # issue 38's training check alone
    .venv/bin/python benchmarks/gpu_check.py --quick              # fewer steps and tokens
    .venv/bin/python benchmarks/gpu_check.py --smoke              # any machine: the training part's code on a tiny
                                                                  # model, eager, one timed step (a test runs it)

train: gpt2-small at 16 x 1024 tokens, bf16 autocast, in `gpt2_scratch.training.TrainingLoop` built from
training/pretrain.py's arguments as the script builds it (on CUDA: TF32, fused AdamW, pinned-memory batches), eager
and with --torch_compile; ours with the vocabulary padded to a multiple of 64 (`PaddedVocabulary`, the script's
--pad_vocab_to_multiple_of) and only the flash SDPA kernel allowed; transformers' GPT2LMHeadModel (50,257 tokens,
its own SDPA choice) through the same loop, eager and compiled with the same settings. Prints a bf16 matmul peak
measured in the same run, each run's tokens/s, MFU against that peak, the loss of its first step (same weights, same
batches: eager and compiled agree within bf16 noise), the ratios and the issue's targets (compiled ours >= 40% MFU
and >= 1.2x compiled transformers). The timed steps fail rather than recompile, and each run's settings are printed.
fsdp: `accelerate launch --use_fsdp` (one process, the GPU it has) runs training/pretrain.py on a tiny model for 4
steps and says whether it trained, checkpointed and saved a folder that loads.
decode: bf16 decoding with the dynamic cache and with transformers' compiled path (static cache +
`torch.compile(fullgraph=True)`, CUDA graphs), batch 1 and 8; in fp32, for how many tokens each path's greedy output
agrees with ours on the dynamic cache.
Without CUDA (and without --smoke) it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cuda_seconds(run) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bf16_matmul_peak(device: torch.device, size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b

    def run() -> None:
        for _ in range(repeats):
            a @ b

    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return 2 * size**3 * repeats / (time.perf_counter() - start)
    return 2 * size**3 * repeats / cuda_seconds(run)


def flash_only(device: torch.device):
    """On CUDA only the flash SDPA kernel may run (an attention call it cannot take fails instead of falling back)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def describe(loop) -> str:
    """The settings a run really trained with, read off the prepared loop."""
    from accelerate.utils import is_compiled_module

    optimizer = loop.optimizers[0].optimizer
    return (f"compiled {is_compiled_module(loop.step_model)}, {loop.accelerator.mixed_precision} autocast, "
            f"fp32 matmul precision {torch.get_float32_matmul_precision()}, fused AdamW "
            f"{bool(optimizer.defaults.get('fused'))}, pinned batches {loop.loader.pin_memory}, "
            f"weights {next(loop.model.parameters()).dtype} on {next(loop.model.parameters()).device}")


def training_check(config, batch_size: int, warmup: int, steps: int, pad: int, modes: list[str],
                   device: torch.device) -> None:
    from bench_model import loop_run, train_flops_per_token
    from transformers import GPT2LMHeadModel

    from gpt2_scratch.convert import config_to_hf, from_hf
    from gpt2_scratch.training import PaddedVocabulary

    peak = bf16_matmul_peak(device, *((8192, 20) if device.type == "cuda" else (256, 2)))
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else device}, torch {torch.__version__}; measured "
          f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s (MFU below is against it)\n")
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(config_to_hf(config))  # the weights every run starts from
    blocks = [{"input_ids": torch.randint(0, config.vocab_size, (config.context_length,))}
              for _ in range(batch_size * (warmup + steps))]
    arguments = ["--per_device_train_batch_size", str(batch_size), "--mixed_precision", "bf16",
                 "--learning_rate", "1e-4"]
    flops = train_flops_per_token(config)  # the real vocabulary's: padded rows do no useful work
    print(f"training step in the scripts' loop (TrainingLoop), {config.n_layers} layers x {config.emb_dim} wide, vocab "
          f"{config.vocab_size}, batch {batch_size} x {config.context_length}, bf16 autocast; {steps} timed steps "
          f"after {warmup}")
    results, first_loss = {}, {}
    for name in ("gpt2_scratch", "transformers"):
        for mode in modes:
            model = from_hf(reference) if name == "gpt2_scratch" else copy.deepcopy(reference)
            padded = name == "gpt2_scratch" and pad
            if padded:
                PaddedVocabulary(model, pad)
            settings = []
            with flash_only(device) if name == "gpt2_scratch" else contextlib.nullcontext():
                tps, losses = loop_run(model, arguments + (["--torch_compile"] if mode == "compiled" else []), blocks,
                                       warmup, steps, inspect=lambda loop, seen=settings: seen.append(describe(loop)))
            results[name, mode], first_loss[name, mode] = tps, losses[0]
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  {name:13s} {mode:9s} {tps:10.0f} tok/s   MFU {tps * flops / peak:6.1%}   first loss "
                  f"{losses[0]:.4f}", flush=True)
            print(f"      ({settings[0]}" + (f"; vocabulary padded to a multiple of {pad}" if padded else "")
                  + ("; flash SDPA only" if name == "gpt2_scratch" and device.type == "cuda" else "") + ")")
    for mode in modes:
        ratio = results["gpt2_scratch", mode] / results["transformers", mode]
        print(f"  {mode}: gpt2_scratch / transformers {ratio:.2f}x")
    if "compiled" in modes:
        ours = results["gpt2_scratch", "compiled"]
        print(f"  gpt2_scratch compiled / eager {ours / results['gpt2_scratch', 'eager']:.2f}x; first-step loss, "
              f"compiled - eager: {first_loss['gpt2_scratch', 'compiled'] - first_loss['gpt2_scratch', 'eager']:+.4f}")
        ratio, mfu = ours / results["transformers", "compiled"], ours * flops / peak
        print(f"  targets: compiled MFU >= 40%: {mfu:.1%} ({'met' if mfu >= 0.4 else 'not met'}); >= 1.2x "
              f"transformers compiled: {ratio:.2f}x ({'met' if ratio >= 1.2 else 'not met'})")
    print()


# A corpus for the FSDP pass, made here: the device running the check may reach no network.
WORDS = ("the king queen castle night day sword river crown storm ghost letter poison garden war peace love honour "
         "father daughter brother friend enemy ship sea island forest stage play players speak listen remember "
         "forget fortune time death dream sleep wake laugh weep").split()


def fsdp_pass(work: Path) -> None:
    """`accelerate launch --use_fsdp` with one process: training/pretrain.py on a tiny model, 4 steps, a checkpoint
    every 2; whether it trained, checkpointed and saved a folder that loads."""
    rng = random.Random(0)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(4000)))
    out = work / "fsdp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
               str(ROOT / "training" / "pretrain.py"), "--dataset", str(corpus), "--output_dir", str(out),
               "--preset", "cpu-1m", "--context_length", "64", "--tokenizer_vocab_size", "512",
               "--per_device_train_batch_size", "8", "--max_steps", "4", "--save_steps", "2",
               "--mixed_precision", "bf16"]
    print("FSDP: accelerate launch --use_fsdp --num_processes 1 ... training/pretrain.py (tiny model, 4 steps)")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    trained = result.returncode == 0 and (out / "metrics.json").is_file()
    checkpointed = (out / "checkpoint-4" / "manifest.json").is_file()
    loads = False
    if trained:
        from gpt2_scratch import GPT2ScratchForCausalLM

        model = GPT2ScratchForCausalLM.from_pretrained(out)
        loads = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    print(f"  exit {result.returncode} after {time.perf_counter() - start:.0f} s; trained and saved: {trained}; "
          f"checkpoint-4 verified: {checkpointed}; the saved folder loads and generates: {loads}")
    if result.returncode != 0:
        print("  " + "\n  ".join((result.stderr or result.stdout).strip().splitlines()[-15:]))
    print()


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


def decode_check(config, new_tokens: int) -> None:
    from transformers import CompileConfig, GPT2LMHeadModel

    from gpt2_scratch.convert import config_to_hf, from_hf

    def same_weights() -> tuple[torch.nn.Module, torch.nn.Module]:
        """gpt2_scratch and transformers' GPT-2 on the same weights, seeded."""
        torch.manual_seed(0)
        reference = GPT2LMHeadModel(config_to_hf(config))
        return from_hf(reference).cuda(), reference.cuda()

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
    torch.set_float32_matmul_precision("highest")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="train,fsdp,decode", help="which parts to run (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="fewer training steps and new tokens")
    parser.add_argument("--pad_vocab_to_multiple_of", type=int, default=64, help="for ours (0: not padded)")
    parser.add_argument("--smoke", action="store_true",
                        help="run the training part on whatever device is here, on a tiny model, eager only")
    args = parser.parse_args()
    if not (torch.cuda.is_available() or args.smoke):
        print("gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False here; nothing was measured. "
              "Run it on a machine with a GPU (CPU decode speed: benchmarks/bench_generate.py).", file=sys.stderr)
        return 2
    # Imported only once a GPU is known to be there: without one the answer comes before transformers loads.
    from gpt2_scratch import GPT2ScratchConfig

    parts = args.parts.split(",")
    if args.smoke:
        config = GPT2ScratchConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
                                   drop_rate=0.0)
        training_check(config, 2, 1, 1, args.pad_vocab_to_multiple_of, ["eager"], torch.device("cpu"))
        return 0
    steps, new_tokens = (10, 50) if args.quick else (20, 200)
    config = GPT2ScratchConfig.from_preset("gpt2-small", qkv_bias=True, drop_rate=0.0)
    if "train" in parts:
        training_check(config, 16, 3, steps, args.pad_vocab_to_multiple_of, ["eager", "compiled"],
                       torch.device("cuda"))
    if "fsdp" in parts:
        with tempfile.TemporaryDirectory() as work:
            fsdp_pass(Path(work))
    if "decode" in parts:
        torch.set_float32_matmul_precision("high")
        decode_check(config, new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
