"""Real GPT-2 checkpoints in and out: transformers' stock `GPT2LMHeadModel` ⇄ `GPT2ScratchForCausalLM`.

The stock → ours mapping lives in the modeling file (its tables and `from_pretrained`, so a saved checkpoint's code
converts too); this module adds the way back, for serving with any GPT-2 tool, and whole-folder conversion. The
mapping is exact, so logits agree to float rounding and a round trip returns the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import GPT2Config, GPT2LMHeadModel

from .configuration_gpt2_scratch import GPT2ScratchConfig
from .files import replace_dir_atomically
from .loading import STOCK, source_config
from .modeling_gpt2_scratch import GPT2ScratchForCausalLM
from .stock_gpt2_scratch import (
    QKV,
    STOCK_BLOCK_TENSORS,
    STOCK_CONFIG_FIELDS,
    STOCK_HEADS,
    STOCK_MODEL_TENSORS,
    from_stock,
)
from .tokenizer import copy_tokenizer_files

# The files a Hub repository may hold its tokenizer in (transformers' and OpenAI's formats).
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "encoder.json", "vocab.bpe"]


def config_to_hf(config: GPT2ScratchConfig) -> GPT2Config:
    fields = {stock: getattr(config, ours) for ours, stock in STOCK_CONFIG_FIELDS}
    return GPT2Config(
        activation_function="gelu_new",
        embd_pdrop=config.drop_rate,
        attn_pdrop=config.drop_rate,
        architectures=["GPT2LMHeadModel"],
        **fields,
    )


def state_dict_to_hf(state: dict[str, torch.Tensor], config: GPT2ScratchConfig) -> dict[str, torch.Tensor]:
    """Stock names and layouts for our tensors: the inverse of the modeling file's `state_dict_from_stock`."""
    hf_state = {f"transformer.{stock}": state[f"transformer.{ours}"] for stock, ours in STOCK_MODEL_TENSORS}
    hf_state.update({stock: state[ours] for stock, ours in STOCK_HEADS if ours in state})
    for i in range(config.n_layers):
        stock, ours = f"transformer.h.{i}.", f"transformer.trf_blocks.{i}."
        for stock_name, our_name, transposed in STOCK_BLOCK_TENSORS:
            tensor = state[ours + our_name]
            hf_state[stock + stock_name] = tensor.t().contiguous() if transposed else tensor.clone()
        hf_state[stock + "attn.c_attn.weight"] = torch.cat([state[f"{ours}att.{n}.weight"].t() for n in QKV], dim=1)
        query_weight = state[f"{ours}att.W_query.weight"]
        hf_state[stock + "attn.c_attn.bias"] = (
            torch.cat([state[f"{ours}att.{n}.bias"] for n in QKV])
            if config.qkv_bias  # stock GPT-2 always has these biases: zeros compute the same as none
            else query_weight.new_zeros(3 * config.emb_dim)
        )
    return hf_state


def from_hf(source: GPT2LMHeadModel | str | Path, **kwargs) -> GPT2ScratchForCausalLM:
    """A `GPT2ScratchForCausalLM` with the weights of a stock GPT-2: a model object, a folder, or a Hub id such as
    `openai-community/gpt2` (the last two are what `GPT2ScratchForCausalLM.from_pretrained` converts on load)."""
    if not isinstance(source, GPT2LMHeadModel):
        return GPT2ScratchForCausalLM.from_pretrained(source, **kwargs)
    # Clones: the converted model must not share a tensor with the caller's stock model.
    fields, state = from_stock(source.config, {k: v.clone() for k, v in source.state_dict().items()})
    model = GPT2ScratchForCausalLM.from_pretrained(None, config=GPT2ScratchConfig(**fields), state_dict=state,
                                                   dtype=source.dtype, **kwargs)
    return model.train(source.training)


def to_hf(source: GPT2ScratchForCausalLM | str | Path) -> GPT2LMHeadModel:
    """A stock transformers `GPT2LMHeadModel` with this model's weights: servable by any GPT-2-compatible tool."""
    model = source if isinstance(source, GPT2ScratchForCausalLM) else GPT2ScratchForCausalLM.from_pretrained(source)
    hf_model = GPT2LMHeadModel(config_to_hf(model.config)).to(model.dtype)
    hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=True)
    return hf_model.eval() if not model.training else hf_model


def convert_directory(source: str | Path, out: str | Path, to_stock: bool) -> Path:
    """Convert a checkpoint (a folder, or with `to_stock=False` also a Hub id) into the folder `out`, with the
    source's tokenizer files; `out` appears only once complete, and not at all when the source is the wrong kind."""
    flag, expected = ("--to-hf", GPT2ScratchConfig.model_type) if to_stock else ("--from-hf", STOCK)
    model_type = source_config(str(source), flag).get("model_type")
    if model_type != expected:
        wanted = "a gpt2_scratch model" if to_stock else "a stock GPT-2 (model_type 'gpt2', e.g. openai-community/gpt2)"
        other = "--from-hf" if to_stock else "--to-hf"
        hint = f"; it is the other kind: use {other}" if model_type in (STOCK, GPT2ScratchConfig.model_type) else ""
        raise ValueError(f"{flag} {source}: model_type is {model_type!r}, not {wanted}{hint}; nothing written")
    model = to_hf(source) if to_stock else from_hf(source)
    folder = Path(source)
    if not folder.is_dir():  # a Hub id: its tokenizer files, downloaded (or read from the cache when offline)
        folder = Path(snapshot_download(str(source), allow_patterns=TOKENIZER_PATTERNS))
    with replace_dir_atomically(out) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(folder, tmp)
    return Path(out)
