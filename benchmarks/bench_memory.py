"""The memory floor of `gpt2_scratch.memory.training_memory` against what a few real training steps peak at.

    python benchmarks/bench_memory.py cpu-10m 8 256 0.1     # preset, batch, context, drop_rate

Builds the model, takes two AdamW steps on random tokens, and prints the estimate by part beside the measured peak
(resident memory at its peak minus before the model was built). The estimate must stay below the measurement: it
is what `check_memory` refuses runs by.
"""

from __future__ import annotations

import argparse
import resource

import psutil
import torch

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.memory import readable, training_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("batch", type=int)
    parser.add_argument("context", type=int)
    parser.add_argument("drop_rate", type=float)
    args = parser.parse_args()
    config = GPT2ScratchConfig.from_preset(args.preset, context_length=args.context, drop_rate=args.drop_rate)
    before = psutil.Process().memory_info().rss
    model = GPT2ScratchForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    parts = training_memory(model.config, args.batch, device_type="cpu")
    print(f"{args.preset}, batch {args.batch} x context {args.context}, drop_rate {args.drop_rate} "
          f"({model.config._attn_implementation}): estimate {readable(sum(parts.values()))} ("
          + ", ".join(f"{k} {readable(v)}" for k, v in parts.items())
          + f"); measured peak {readable(peak - before)}")


if __name__ == "__main__":
    main()
