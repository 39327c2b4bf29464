"""PEFT LoRA on our module names, shared by classification and instruction tuning.

LoRA freezes a weight W and learns a low-rank update: W x + (alpha / r) · B A x, with A (r × in) random and B (out × r)
zero, so training starts from the unchanged model and only r · (in + out) numbers per matrix are learned.
"""

from __future__ import annotations

import argparse

from peft import LoraConfig
from torch import nn

# The attention projections and both MLP matrices of every TransformerBlock (PEFT matches names by suffix).
DEFAULT_TARGET_MODULES = ["W_query", "W_key", "W_value", "out_proj", "ff.layers.0", "ff.layers.2"]


def add_lora_arguments(parser: argparse.ArgumentParser, r: int = 8, embeddings: bool = False) -> None:
    """`embeddings` adds --train_embeddings (PEFT's trainable tokens over the whole vocabulary)."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora_r", type=int, default=r, help="rank of the update")
    group.add_argument("--lora_alpha", type=float, default=2 * r, help="the update is scaled by alpha / r")
    group.add_argument("--lora_dropout", type=float, default=0.05)
    group.add_argument("--target_modules", nargs="+", default=DEFAULT_TARGET_MODULES,
                       help="module names (suffixes) that get an adapter")
    if embeddings:
        group.add_argument("--train_embeddings", action="store_true",
                           help="also train every token's embedding, and with it the tied output head (PEFT "
                                "trainable tokens: vocab_size x emb_dim more numbers in the adapter)")


def lora_config(args: argparse.Namespace, task_type: str, modules_to_save: list[str] | None = None,
                vocab_size: int | None = None) -> LoraConfig:
    if args.lora_r < 1:
        raise ValueError(f"--lora_r must be at least 1, got {args.lora_r}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    # Trainable tokens, not modules_to_save: PEFT ties the output head to the trained embedding only on this path
    # (it finds tied modules by name in modules_to_save, and ours are not called embed_tokens / lm_head).
    tokens = list(range(vocab_size)) if getattr(args, "train_embeddings", False) else None
    return LoraConfig(task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(args.target_modules), modules_to_save=modules_to_save,
                      trainable_token_indices=tokens)


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """PEFT's own error for a name that matches nothing lists every module; say which name and what exists."""
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            linear = sorted({name.split("trf_blocks.")[1].split(".", 1)[1] for name, m in model.named_modules()
                             if isinstance(m, nn.Linear) and "trf_blocks." in name})
            raise ValueError(f"--target_modules {target}: no module of the model has that name; the blocks' linear "
                             f"layers are {', '.join(linear)}")


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
