"""Stock GPT-2 in, our GPT-2 out: the tensor mapping and the strict `from_pretrained` every model class uses.

Stock transformers GPT-2 (and OpenAI's checkpoints on the Hub) name and lay out the same tensors differently; this
file holds that mapping, beside the readable model rather than in it. It is copied next to every saved checkpoint with
the modeling file, so it imports only the configuration file and libraries.
"""

from __future__ import annotations

import re

import torch
from transformers import GPT2LMHeadModel, GPT2Model, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging

from .configuration_gpt2_scratch import GPT2ScratchConfig

# Starting from OpenAI's GPT-2 (as nanoGPT's `GPT.from_pretrained("gpt2")`): stock transformers GPT-2 stores its
# attention and MLP weights as `Conv1D` (shape in × out) and fuses query, key and value into one `c_attn`; ours are
# `nn.Linear` (out × in) with separate W_query, W_key, W_value. Everything else is a rename. Names are relative to
# the base model (`transformer.` in both models' heads).
STOCK_BLOCK_TENSORS = [  # (stock name, our name, stored as Conv1D so transposed) for every tensor of one block
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
STOCK_MODEL_TENSORS = [
    ("wte.weight", "tok_emb.weight"),
    ("wpe.weight", "pos_emb.weight"),
    ("ln_f.weight", "final_norm.scale"),
    ("ln_f.bias", "final_norm.shift"),
]
STOCK_HEADS = [("lm_head.weight", "out_head.weight"), ("score.weight", "score.weight")]  # full names, same in both
QKV = ("W_query", "W_key", "W_value")
STOCK_CONFIG_FIELDS = [  # (our config field, stock GPT2Config field) for every setting both models share
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
# from_pretrained arguments that say where and how to read a checkpoint, handed to the stock class when converting.
READING_ARGUMENTS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies",
                     "use_safetensors", "variant", "weights_only")
OLD_MASK_BUFFERS = re.compile(r"\.attn\.(masked_)?bias$")  # causal masks OpenAI's files carry: not weights


def config_from_stock(stock: PreTrainedConfig) -> dict:
    """Our config's fields for a stock GPT-2 config; refuses the GPT-2 variants our blocks do not implement."""
    unsupported = {
        "activation_function": stock.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": stock.n_inner not in (None, 4 * stock.n_embd),
        "scale_attn_weights": not stock.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": stock.scale_attn_by_inverse_layer_idx,
        "add_cross_attention": stock.add_cross_attention,
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(
                f"unsupported GPT-2 variant: it sets {name}={getattr(stock, name)!r}, which gpt2_scratch's blocks do "
                "not implement (they use tanh-GELU, a 4x MLP and 1/sqrt(head_dim) attention scaling)"
            )
    return {ours: getattr(stock, name) for ours, name in STOCK_CONFIG_FIELDS}


def state_dict_from_stock(stock: dict[str, torch.Tensor], n_layers: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """Our tensors for a stock GPT-2 state dict (full names, `transformer.` prefix). Tensors are *taken* out of
    `stock`, so each stock tensor is freed as soon as its converted copy exists: converting holds one model's worth."""
    state = {f"transformer.{ours}": stock.pop(f"transformer.{name}") for name, ours in STOCK_MODEL_TENSORS}
    state.update({ours: stock.pop(name) for name, ours in STOCK_HEADS if name in stock})
    for i in range(n_layers):
        stock_block, our_block = f"transformer.h.{i}.", f"transformer.trf_blocks.{i}."
        for name, ours, transposed in STOCK_BLOCK_TENSORS:
            tensor = stock.pop(stock_block + name)
            state[our_block + ours] = tensor.t().contiguous() if transposed else tensor
        weights = stock.pop(stock_block + "attn.c_attn.weight").chunk(3, dim=1)
        biases = stock.pop(stock_block + "attn.c_attn.bias").chunk(3, dim=0)
        for name, weight, bias in zip(QKV, weights, biases):
            state[f"{our_block}att.{name}.weight"] = weight.t().contiguous()
            if qkv_bias:
                state[f"{our_block}att.{name}.bias"] = bias.clone()
    return state


def from_stock(stock_config: PreTrainedConfig, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(our config's fields, our tensors) for a stock GPT-2's config and state dict (emptied as it is converted)."""
    n_layers = stock_config.n_layer
    fields = config_from_stock(stock_config)
    # Biases that are all zero (as `gpt2-scratch convert --to-hf` writes for a model without them) mean none.
    fields["qkv_bias"] = any(state[f"transformer.h.{i}.attn.c_attn.bias"].any() for i in range(n_layers))
    return fields, state_dict_from_stock(state, n_layers, fields["qkv_bias"])


def first_names(names: set[str], shown: int = 5) -> str:
    listed = ", ".join(sorted(names)[:shown])
    return f"{listed} (and {len(names) - shown} more)" if len(names) > shown else listed


class StrictLoadingMixin:
    """`from_pretrained` for the model classes: strict, and converting stock GPT-2 on load. Each model class names the
    stock transformers class whose checkpoints it converts (`stock_class`) and the tensors a checkpoint may lack because
    the class adds them (`new_tensors`, a new head)."""

    stock_class: type[PreTrainedModel] | None = None
    new_tensors: frozenset[str] = frozenset()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, strict, and also from a stock GPT-2: a Hub id (`openai-community/gpt2`,
        `gpt2-medium`, `distilgpt2`, ...) or a folder whose config says `model_type: gpt2` is converted on load.

        Strict: a tensor the checkpoint lacks is an error, never left at its random init (a new head excepted).
        """
        source = pretrained_model_name_or_path
        if source is None or kwargs.get("state_dict") is not None or kwargs.get("gguf_file"):
            return super().from_pretrained(source, *model_args, **kwargs)
        reading = {name: kwargs[name] for name in READING_ARGUMENTS if name in kwargs and name != "weights_only"}
        try:
            found, _ = PreTrainedConfig.get_config_dict(source, **reading)
        except OSError:  # no config there (a typo, an adapter folder): transformers' own loading says what is wrong
            return super().from_pretrained(source, *model_args, **kwargs)
        model_type = found.get("model_type")
        if model_type == "gpt2":
            return cls.from_stock_gpt2(source, *model_args, **kwargs)
        if model_type != GPT2ScratchConfig.model_type:
            raise ValueError(
                f"{source}: model_type is {model_type!r}; {cls.__name__} loads gpt2_scratch checkpoints or stock GPT-2 "
                "(model_type 'gpt2'), nothing else"
            )
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(source, *model_args, output_loading_info=True, **kwargs)
        missing = set(info["missing_keys"]) - cls.new_tensors
        if missing:
            raise ValueError(f"{source}: the checkpoint lacks {len(missing)} tensors this model needs: "
                             f"{first_names(missing)}; they would stay at random init")
        return (model, info) if want_info else model

    @classmethod
    def from_stock_gpt2(cls, source, *model_args, **kwargs):
        """Load with transformers' own GPT-2 class (Hub, cache, shards, dtype), check that every tensor was in the
        checkpoint, rename and transpose into our layout, and let transformers build our model from those tensors."""
        if kwargs.get("config") is not None:
            raise ValueError(f"{source}: a stock GPT-2 brings its own config; pass overrides as keyword arguments")
        reading = {name: kwargs.pop(name) for name in READING_ARGUMENTS if name in kwargs}
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or "auto"
        want_info = kwargs.pop("output_loading_info", False)
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # its load report would name stock tensors; ours follows, or an error
        logging.disable_progress_bar()
        try:
            stock, info = cls.stock_class.from_pretrained(source, dtype=dtype, output_loading_info=True, **reading)
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
        stock_new = {"score.weight"} if "score.weight" in cls.new_tensors else set()
        missing = set(info["missing_keys"]) - stock_new
        unexpected = {key for key in info["unexpected_keys"] if not OLD_MASK_BUFFERS.search(key)}
        unexpected -= {"lm_head.weight"} if cls.stock_class is not GPT2LMHeadModel else set()
        if missing or unexpected or info["mismatched_keys"]:
            found = ", ".join(f"{what} {first_names(set(map(str, keys)))}" for what, keys in (
                ("missing", missing), ("unexpected", unexpected), ("wrong shape", info["mismatched_keys"])) if keys)
            raise ValueError(f"{source}: not a complete stock GPT-2 checkpoint ({found}); nothing was converted")
        state = {f"transformer.{k}" if cls.stock_class is GPT2Model else k: v for k, v in stock.state_dict().items()}
        stock_config, dtype = stock.config, stock.dtype
        keep_score = "score.weight" in state and "score.weight" not in info["missing_keys"]
        del stock  # from here on `state` holds the only reference to each stock tensor
        if not keep_score:  # a language model's checkpoint: the classifier's head starts new
            state.pop("score.weight", None)
        fields, converted = from_stock(stock_config, state)
        if cls.stock_class is GPT2Model:
            converted = {k.removeprefix("transformer."): v for k, v in converted.items()}
        config, kwargs = GPT2ScratchConfig.from_dict(fields, return_unused_kwargs=True, **kwargs)
        if keep_score and converted["score.weight"].shape[0] != config.num_labels:
            raise ValueError(f"{source}: a stock classifier with {converted['score.weight'].shape[0]} labels, but "
                             f"num_labels={config.num_labels} was asked for")
        model, info = super().from_pretrained(None, *model_args, config=config, state_dict=converted, dtype=dtype,
                                              output_loading_info=True, **kwargs)
        missing = set(info["missing_keys"]) - cls.new_tensors
        if missing:  # the mapping above covers every tensor; this guards it
            raise ValueError(f"{source}: converting left {first_names(missing)} at random init")
        model.config.name_or_path = str(source)
        return (model, info) if want_info else model
