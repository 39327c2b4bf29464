"""Does the decode engine's fused query/key/value product earn its copy? One row through the three layers fused
(one DecodeMatmul over the weights side by side, as the engine runs them) against three products, each through the
same kernel, taking turns; gpt2-small's shape, fp32 and bf16.

    .venv/bin/python benchmarks/bench_fused_qkv.py --rounds 12

Prints the median time of each and the ratio (three / fused), and how many rounds fused was ahead. Not a test: the
numbers depend on the machine and on what else runs on it; only the ratio within one run compares.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gpt2_scratch.decoding_gpt2_scratch import DecodeLayout, DecodeMatmul


def seconds_per_call(matmuls: list[DecodeMatmul], x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        for matmul in matmuls:
            matmul(x)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=200, help="calls per timing")
    parser.add_argument("--emb_dim", type=int, default=768)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, emb_dim {args.emb_dim}")
    for dtype in (torch.float32, torch.bfloat16):
        layers = [nn.Linear(args.emb_dim, args.emb_dim).to(dtype) for _ in range(3)]
        kind = DecodeLayout.one_row_candidates(dtype)[0]  # the one-row kernel this CPU offers first for the dtype
        fused, three = [DecodeMatmul(layers, kind)], [DecodeMatmul([layer], kind) for layer in layers]
        x = torch.randn(1, args.emb_dim, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(fused[0](x), torch.cat([m(x) for m in three], -1))
            seconds_per_call(fused + three, x, 20)  # warm up
            timed = [(seconds_per_call(fused, x, args.calls), seconds_per_call(three, x, args.calls))
                     for _ in range(args.rounds)]
        one, apart = statistics.median(t[0] for t in timed), statistics.median(t[1] for t in timed)
        ahead = sum(f < t for f, t in timed)
        print(f"{str(dtype):15} kernel {kind!r}: fused {one * 1e6:7.1f} us, three {apart * 1e6:7.1f} us, "
              f"three / fused {apart / one:.2f}x (fused ahead in {ahead} of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
