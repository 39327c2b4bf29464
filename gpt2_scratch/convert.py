"""Real GPT-2 checkpoints in and out: transformers' stock `GPT2LMHeadModel` ⇄ `GPT2ScratchForCausalLM`.

Stock GPT-2 stores its attention and MLP weights as `Conv1D` (shape in × out) and fuses query, key and value into
one `c_attn`; ours are `nn.Linear` (shape out × in) with separate `W_query`, `W_key`, `W_value`. Everything else is a
rename. The mapping is exact, so logits agree to float rounding and a round trip returns the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .configuration_gpt2_scratch import GPT2ScratchConfig
from .files import copy_tokenizer_files, replace_dir_atomically
from .modeling_gpt2_scratch import GPT2ScratchForCausalLM

# (stock name, our name, stored as Conv1D so transposed) for every tensor of one block.
BLOCK_TENSORS = [
    ("ln_1.weight", "norm1.scale", False),
    ("ln_1.bias", "norm1.shift", False),
    ("attn.c_proj.weight", "att.out_proj.weight", True),
    ("attn.c_proj.bias", "att.out_proj.bias", False),
    ("ln_2.weight", "norm2.scale", False),
    ("ln_2.bias", "norm2.shift", False),
    ("mlp.c_fc.weight", "ff.layers.0.weight", True),
    ("mlp.c_fc.bias", "ff.layers.0.bias", False),
    ("mlp.c_proj.weight", "ff.layers.2.weight", True),
    ("mlp.c_proj.bias", "ff.layers.2.bias", False),
]
MODEL_TENSORS = [
    ("transformer.wte.weight", "transformer.tok_emb.weight"),
    ("transformer.wpe.weight", "transformer.pos_emb.weight"),
    ("transformer.ln_f.weight", "transformer.final_norm.scale"),
    ("transformer.ln_f.bias", "transformer.final_norm.shift"),
    ("lm_head.weight", "out_head.weight"),
]
QKV = ("W_query", "W_key", "W_value")
# (our config field, stock GPT2Config field) for every setting both models share.
CONFIG_FIELDS = [
    ("vocab_size", "vocab_size"),
    ("context_length", "n_positions"),
    ("emb_dim", "n_embd"),
    ("n_heads", "n_head"),
    ("n_layers", "n_layer"),
    ("drop_rate", "resid_pdrop"),  # stock GPT-2 has three dropout rates, all equal in OpenAI's releases
    ("layer_norm_epsilon", "layer_norm_epsilon"),
    ("initializer_range", "initializer_range"),
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("pad_token_id", "pad_token_id"),
    ("tie_word_embeddings", "tie_word_embeddings"),
]


def config_from_hf(hf_config: GPT2Config, qkv_bias: bool = True) -> GPT2ScratchConfig:
    """Our config for a stock GPT-2 config; refuses the GPT-2 variants our blocks do not implement."""
    unsupported = {
        "activation_function": (hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": hf_config.n_inner not in (None, 4 * hf_config.n_embd),
        "scale_attn_weights": not hf_config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
        "add_cross_attention": hf_config.add_cross_attention,
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(
                f"cannot convert: this GPT-2 sets {name}={getattr(hf_config, name)!r}, which gpt2_scratch's blocks "
                "do not implement (they use tanh-GELU, a 4x MLP and 1/sqrt(head_dim) attention scaling)"
            )
    fields = {ours: getattr(hf_config, stock) for ours, stock in CONFIG_FIELDS}
    return GPT2ScratchConfig(qkv_bias=qkv_bias, **fields)


def config_to_hf(config: GPT2ScratchConfig) -> GPT2Config:
    fields = {stock: getattr(config, ours) for ours, stock in CONFIG_FIELDS}
    return GPT2Config(
        activation_function="gelu_new",
        embd_pdrop=config.drop_rate,
        attn_pdrop=config.drop_rate,
        architectures=["GPT2LMHeadModel"],
        **fields,
    )


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], n_layers: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    state = {ours: hf_state[stock] for stock, ours in MODEL_TENSORS if stock in hf_state}
    for i in range(n_layers):
        stock, ours = f"transformer.h.{i}.", f"transformer.trf_blocks.{i}."
        for stock_name, our_name, transposed in BLOCK_TENSORS:
            tensor = hf_state[stock + stock_name]
            state[ours + our_name] = tensor.t().contiguous() if transposed else tensor.clone()
        weights = hf_state[stock + "attn.c_attn.weight"].chunk(3, dim=1)
        biases = hf_state[stock + "attn.c_attn.bias"].chunk(3, dim=0)
        for name, weight, bias in zip(QKV, weights, biases):
            state[f"{ours}att.{name}.weight"] = weight.t().contiguous()
            if qkv_bias:
                state[f"{ours}att.{name}.bias"] = bias.clone()
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], config: GPT2ScratchConfig) -> dict[str, torch.Tensor]:
    hf_state = {stock: state[ours] for stock, ours in MODEL_TENSORS if ours in state}
    for i in range(config.n_layers):
        stock, ours = f"transformer.h.{i}.", f"transformer.trf_blocks.{i}."
        for stock_name, our_name, transposed in BLOCK_TENSORS:
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


def from_hf(source: GPT2LMHeadModel | str | Path) -> GPT2ScratchForCausalLM:
    """A `GPT2ScratchForCausalLM` with the weights of a stock GPT-2 (a model object, or a directory such as a
    download of the Hub's `openai-community/gpt2`)."""
    hf_model = source if isinstance(source, GPT2LMHeadModel) else GPT2LMHeadModel.from_pretrained(source)
    hf_state = hf_model.state_dict()
    n_layers = hf_model.config.n_layer
    # Biases that are all zero (as written by to_hf for a model without them) mean the model had none.
    qkv_bias = any(hf_state[f"transformer.h.{i}.attn.c_attn.bias"].any() for i in range(n_layers))
    config = config_from_hf(hf_model.config, qkv_bias=qkv_bias)
    model = GPT2ScratchForCausalLM(config).to(hf_model.dtype)
    model.load_state_dict(state_dict_from_hf(hf_state, n_layers, qkv_bias), strict=not config.tie_word_embeddings)
    return model.eval() if not hf_model.training else model


def to_hf(source: GPT2ScratchForCausalLM | str | Path) -> GPT2LMHeadModel:
    """A stock transformers `GPT2LMHeadModel` with this model's weights: servable by any GPT-2-compatible tool."""
    model = source if isinstance(source, GPT2ScratchForCausalLM) else GPT2ScratchForCausalLM.from_pretrained(source)
    hf_model = GPT2LMHeadModel(config_to_hf(model.config)).to(model.dtype)
    hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=True)
    return hf_model.eval() if not model.training else hf_model


def convert_directory(source: str | Path, out: str | Path, to_stock: bool) -> Path:
    """Convert a saved checkpoint directory, copying its tokenizer files along; `out` appears only once complete."""
    source = Path(source)
    if not source.is_dir() or not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model directory (no config.json in it)")
    model = to_hf(source) if to_stock else from_hf(source)
    with replace_dir_atomically(out) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(source, tmp)
    return Path(out)
