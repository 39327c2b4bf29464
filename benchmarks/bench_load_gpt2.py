"""Peak memory of starting from a stock GPT-2: `GPT2ScratchForCausalLM.from_pretrained(stock folder)` (convert on
load) against transformers' own `GPT2LMHeadModel.from_pretrained` of the same folder, each in a fresh process.

    .venv/bin/python benchmarks/bench_load_gpt2.py                 # gpt2-medium shape (355M parameters, 1.4 GB fp32)
    .venv/bin/python benchmarks/bench_load_gpt2.py --shape gpt2    # gpt2 (124M) shape

The weights are random (no package ships OpenAI's), saved as safetensors the way the Hub stores them. Each loader
runs in its own process; its peak resident set (Linux's VmHWM, restarted after imports) above the resident set after
imports is reported in MB and in copies of the weights, after `from_pretrained` and again after one forward pass
(transformers may leave weights memory-mapped from the file, resident only once read). Not a test: numbers depend on
the machine and the page cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = {"gpt2": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16)}

MEASURE = """
import json, sys, torch
from pathlib import Path
from transformers import GPT2LMHeadModel
from gpt2_scratch import GPT2ScratchForCausalLM
def status_mb(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024
torch.ones(1) @ torch.ones(1)
Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current resident set
before = status_mb("VmRSS")
loader = {"stock": GPT2LMHeadModel, "gpt2_scratch": GPT2ScratchForCausalLM}[sys.argv[1]]
model = loader.from_pretrained(sys.argv[2])
loaded = status_mb("VmHWM")
with torch.no_grad():  # reads every weight, so memory-mapped ones count as resident too
    model(torch.zeros(1, 8, dtype=torch.long))
weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"before": before, "loaded": loaded, "peak": status_mb("VmHWM"), "weights": weights_mb}))
"""


def measure(loader: str, folder: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, loader, str(folder)], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="gpt2-medium")
    args = parser.parse_args()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.shape
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**SHAPES[args.shape])).save_pretrained(folder)
        print(f"{args.shape}-shaped random stock GPT-2 saved to {folder}")
        for loader in ("stock", "gpt2_scratch"):
            numbers = measure(loader, folder)
            loading, peak = numbers["loaded"] - numbers["before"], numbers["peak"] - numbers["before"]
            print(f"{loader:>13} from_pretrained: weights {numbers['weights']:.0f} MB; peak RSS above imports "
                  f"{loading:.0f} MB after loading = {loading / numbers['weights']:.2f} x the weights, {peak:.0f} MB "
                  f"after one forward pass = {peak / numbers['weights']:.2f} x")


if __name__ == "__main__":
    main()
