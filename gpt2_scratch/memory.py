"""Will a training run fit in memory? An estimate of what a training step holds, by what holds it, against the memory
there is: a run that cannot fit is refused before anything large is allocated, not killed by the kernel half-way.

The estimate is a floor, not a forecast: it counts what a step cannot do without (the causal mask, the weights, their
gradients and optimizer state, the activations kept for backward and the logits), so a refusal is never wrong, while
a run it lets through may still need more (allocator slack, evaluation, the tokenizer and data).
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

from .configuration_gpt2_scratch import GPT2ScratchConfig

# Values a transformer block keeps per token for backward, in units of emb_dim: its input and two norm outputs (3),
# query, key, value and the attention output (4), the projection (1), the MLP's 4x-wide input and activation (8).
KEPT_PER_TOKEN_PER_BLOCK = 16


def parameter_count(config: GPT2ScratchConfig) -> int:
    """Unique parameters of the causal LM, counted from the config (the meta-device count in `gpt2-scratch presets`
    builds the model; this does not, so it stays instant for any size)."""
    e = config.emb_dim
    attention = 4 * e * e + (3 * e if config.qkv_bias else 0) + e  # query, key, value, output projection (+ bias)
    feed_forward = 8 * e * e + 4 * e + e
    norms = 2 * 2 * e
    embeddings = config.vocab_size * e + config.context_length * e
    head = 0 if config.tie_word_embeddings else config.vocab_size * e
    return embeddings + config.n_layers * (attention + feed_forward + norms) + 2 * e + head


def hidden_matrix_count(config: GPT2ScratchConfig) -> int:
    """Parameters in the blocks' weight matrices: what --optimizer muon takes (AdamW takes the rest)."""
    return config.n_layers * 12 * config.emb_dim ** 2


def causal_mask_bytes(config: GPT2ScratchConfig) -> int:
    """The causal mask a training step builds. The model holds none between calls (the seed's one buffer per block
    cost n_layers x context²): a call that needs one builds a (queries x keys) bool once for every block, and the
    fused kernel (sdpa), with nothing padded, masks by itself. Change this if the modeling file's design changes."""
    return config.context_length ** 2 if getattr(config, "_attn_implementation", None) == "eager" else 0


def scores_kept(config: GPT2ScratchConfig, device_type: str) -> bool:
    """Whether training keeps every head's (context x context) attention weights for backward: the eager path
    always; PyTorch's fused kernel on the CPU too once dropout is on (measured: cpu-1m, batch 32, context 1024 peaks
    at 4.4 GiB with drop_rate 0 and 10.8 GiB with 0.1); on a GPU its flash kernel applies dropout without them."""
    eager = getattr(config, "_attn_implementation", None) == "eager"
    return eager or (device_type == "cpu" and config.drop_rate > 0)


def training_memory(config: GPT2ScratchConfig, batch_size: int, optimizer: str = "adamw",
                    mixed_precision: str = "no", trainable: int | None = None, hidden: int | None = None,
                    logits_width: int | None = None, device_type: str = "cpu") -> dict[str, int]:
    """Bytes one process holds at a training step's peak, by what holds them. `trainable` (default: every
    parameter) and `hidden` (its part in the blocks' matrices, for Muon) describe a partly frozen or LoRA model;
    `logits_width` is the head's output size (default: the vocabulary; a classifier's is its number of labels)."""
    parameters = parameter_count(config)
    trainable = parameters if trainable is None else trainable
    hidden = min(hidden_matrix_count(config), trainable) if hidden is None else hidden
    # AdamW keeps two moments per parameter; Muon one momentum per matrix entry (AdamW still takes the rest).
    state = 8 * trainable if optimizer == "adamw" else 4 * hidden + 8 * (trainable - hidden)
    activation = 2 if mixed_precision in ("bf16", "fp16") else 4
    tokens = batch_size * config.context_length
    blocks = config.n_layers * tokens * config.emb_dim * KEPT_PER_TOKEN_PER_BLOCK * activation
    if scores_kept(config, device_type):  # scores, weights, dropped weights and the dropout mask, per head
        blocks += config.n_layers * batch_size * config.n_heads * config.context_length ** 2 * (3 * activation + 1)
    logits = 2 * tokens * (config.vocab_size if logits_width is None else logits_width) * 4  # and their gradient
    return {"causal mask": causal_mask_bytes(config), "parameters": 4 * parameters, "gradients": 4 * trainable,
            "optimizer state": state, "activations": blocks + logits}


def readable(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) reads as None


CGROUP = Path("/sys/fs/cgroup")  # where this process's cgroup (v2) or its memory controller (v1) shows its limit


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """Bytes this process may still allocate on `device`, and where that number comes from; None where unknown.
    On the CPU: the least of the system's available memory and what the cgroup (a container's limit) leaves."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    if device.type != "cpu":
        return None
    found = [(psutil.virtual_memory().available, "available to the system")]
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # cgroup v1
        limit_bytes, used = read_number(CGROUP / limit), read_number(CGROUP / usage)
        if limit_bytes is not None and used is not None and limit_bytes < 2 ** 60:  # v1 writes "no limit" as ~2^63
            found.append((max(limit_bytes - used, 0), f"left under the cgroup's {limit}"))
    return min(found)


def check_fits(needed: dict[str, int], device: torch.device, processes: int, detail: str, remedy: str) -> None:
    """Refuse, in one line, a run whose `needed` bytes (per process) times the `processes` sharing `device`'s memory
    exceed what is available. `detail` adds to the breakdown (e.g. the batch), `remedy` says what to lower."""
    available = available_memory(device)
    total = sum(needed.values()) * processes
    if available is None or total <= available[0]:
        return
    parts = ", ".join(f"{name} {readable(size)}" for name, size in needed.items() if size)
    per = f" ({processes} processes x {readable(sum(needed.values()))})" if processes > 1 else ""
    raise ValueError(f"this run needs at least {readable(total)}{per}: {parts}, {detail}; only "
                     f"{readable(available[0])} is {available[1]} on {device.type}. {remedy}")


def processes_sharing(device: torch.device) -> int:
    """How many processes of this run share `device`'s memory: every local process on the CPU, one per GPU."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
