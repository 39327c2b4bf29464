"""GPT-2, written out block by block, that is also a Hugging Face `PreTrainedModel`.

Read it top to bottom: GELU → LayerNorm → FeedForward → MultiHeadAttention → TransformerBlock → the model.
Only the classes at the end speak transformers' language (config class, outputs, `generate`, Auto classes).

This file is copied next to every saved checkpoint, so it imports only the configuration file and libraries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import can_return_tuple

from .configuration_gpt2_scratch import GPT2ScratchConfig


class GELU(nn.Module):
    """GPT-2's activation: GELU(x) = x·Φ(x), in the tanh approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch evaluates exactly the formula above in one fused kernel; spelled out as tensor ops it would write
        # six intermediates the size of the MLP's widest activation (tests check both agree).
        return F.gelu(x, approximate="tanh")


class LayerNorm(nn.Module):
    """Normalise each token's vector to zero mean and unit variance, then apply a learned scale and shift."""

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps  # keeps the division finite when a vector is (nearly) constant
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (x - mean) / sqrt(var + eps) * scale + shift, with the biased variance (as GPT-2 was trained), fused by
        # PyTorch into one pass over the vector instead of five (tests check it against the explicit formula).
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class FeedForward(nn.Module):
    """Per-token MLP: widen to 4·emb_dim, GELU, project back. It is where most of the parameters live."""

    def __init__(self, config: GPT2ScratchConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(config.emb_dim, 4 * config.emb_dim),
            GELU(),
            nn.Linear(4 * config.emb_dim, config.emb_dim),
        )
        self.layers[2].writes_to_residual = True  # initialised smaller, see _init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def future_mask(context_length: int) -> torch.Tensor:
    """True above the diagonal: position i must not see positions j > i (the future it is trained to predict)."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)


class MultiHeadAttention(nn.Module):
    """Causal self-attention: every token mixes in the values of the tokens before it, weighted by query·key."""

    def __init__(self, config: GPT2ScratchConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config  # the attention implementation ("eager" or "sdpa") is read from it at call time
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.d_out = config.emb_dim
        self.num_heads = config.n_heads
        self.head_dim = config.emb_dim // config.n_heads
        self.W_query = nn.Linear(config.emb_dim, config.emb_dim, bias=config.qkv_bias)
        self.W_key = nn.Linear(config.emb_dim, config.emb_dim, bias=config.qkv_bias)
        self.W_value = nn.Linear(config.emb_dim, config.emb_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim)  # mixes the heads' outputs back together
        self.out_proj.writes_to_residual = True  # initialised smaller, see _init_weights
        self.dropout = nn.Dropout(config.drop_rate)
        # A buffer, not a parameter: it moves with .to(device) but is never trained, and (non-persistent) never saved.
        self.register_buffer("mask", future_mask(config.context_length), persistent=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, emb_dim) → (batch, heads, tokens, head_dim): each head attends independently."""
        batch, num_tokens, _ = x.shape
        return x.view(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def blocked(self, num_queries: int, num_keys: int, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Boolean mask, True where a query may not look: the future, and padding keys."""
        past = num_keys - num_queries  # queries are the last `num_queries` positions of the keys
        blocked = self.mask[past:num_keys, :num_keys]
        if padding_mask is None:
            return blocked
        blocked = blocked | ~padding_mask[:, None, None, :num_keys].bool()
        # A left-padding query sees nothing; letting it see everything keeps softmax finite (its output is unused).
        return blocked & ~blocked.all(dim=-1, keepdim=True)

    def eager_attention(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The textbook path: scores → mask → softmax → dropout → weighted sum of values."""
        attn_scores = queries @ keys.transpose(2, 3)  # (batch, heads, queries, keys)
        attn_scores = attn_scores.masked_fill(self.blocked(queries.shape[2], keys.shape[2], padding_mask), -torch.inf)
        # Scaling by 1/√head_dim keeps the scores' variance near 1, so softmax does not saturate into one-hot weights.
        attn_weights = torch.softmax(attn_scores / math.sqrt(self.head_dim), dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values

    def sdpa_attention(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The same computation in PyTorch's fused kernel, which never materialises the full score matrix."""
        if queries.device.type == "cpu" and queries.dtype == torch.bfloat16:
            # The fused CPU kernel's backward runs ~4x slower in bfloat16 than in float32 (PyTorch 2.13), so under
            # bf16 autocast attention runs in float32 (autocast off, or it would cast straight back) and returns bf16.
            with torch.autocast("cpu", enabled=False):
                context = self.sdpa_attention(queries.float(), keys.float(), values.float(), padding_mask)
            return context.to(queries.dtype)
        num_queries, num_keys = queries.shape[2], keys.shape[2]
        dropout_p = self.dropout.p if self.training else 0.0
        if padding_mask is None and num_queries == num_keys:  # plain causal: the kernel builds the mask itself
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
        if padding_mask is None and num_queries == 1:  # one new token may see every cached one
            return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p)
        allowed = ~self.blocked(num_queries, num_keys, padding_mask)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, dropout_p=dropout_p)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: Cache | None = None
    ) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        queries = self.split_heads(self.W_query(x))
        keys = self.split_heads(self.W_key(x))
        values = self.split_heads(self.W_value(x))
        if cache is not None:  # append this step's keys/values and attend over everything seen so far
            keys, values = cache.update(keys, values, self.layer_idx)
        if self.config._attn_implementation == "eager":
            context = self.eager_attention(queries, keys, values, padding_mask)
        else:
            context = self.sdpa_attention(queries, keys, values, padding_mask)
        # transpose() only changes strides; .contiguous() lays the heads side by side in memory so .view can merge them.
        context = context.transpose(1, 2).contiguous().view(batch, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(GradientCheckpointingLayer):  # the base class only adds model.gradient_checkpointing_enable()
    """Pre-norm residual block: x + Attention(LayerNorm(x)), then x + FeedForward(LayerNorm(x))."""

    def __init__(self, config: GPT2ScratchConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(config.emb_dim, config.layer_norm_epsilon)
        self.att = MultiHeadAttention(config, layer_idx)
        self.norm2 = LayerNorm(config.emb_dim, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: Cache | None = None
    ) -> torch.Tensor:
        # The residual path carries x through unchanged, so gradients reach early layers without vanishing.
        x = x + self.drop_shortcut(self.att(self.norm1(x), padding_mask, cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face edges: weight init, the base model, the heads.
# ----------------------------------------------------------------------------------------------------------------------


class GPT2ScratchPreTrainedModel(PreTrainedModel):
    config_class = GPT2ScratchConfig
    config: GPT2ScratchConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _supports_attention_backend = False
    _can_compile_fullgraph = False
    _skip_keys_device_placement = "cache"
    _keys_to_ignore_on_load_unexpected = [r"\.mask$"]

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, and residual projections scaled by 1/√(2·n_layers)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "writes_to_residual", False):
                # Each block adds two outputs onto the residual stream; shrinking them keeps its variance from
                # growing with depth.
                std = std / math.sqrt(2 * self.config.n_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LayerNorm):
            init.ones_(module.scale)
            init.zeros_(module.shift)
        elif isinstance(module, MultiHeadAttention):
            init.copy_(module.mask, future_mask(self.config.context_length))  # loading leaves buffers empty


class GPT2ScratchModel(GPT2ScratchPreTrainedModel):
    """Token + position embeddings → n_layers TransformerBlocks → final LayerNorm. Returns hidden states."""

    def __init__(self, config: GPT2ScratchConfig) -> None:
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)  # learned, one vector per position
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList([TransformerBlock(config, i) for i in range(config.n_layers)])
        self.final_norm = LayerNorm(config.emb_dim, config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.tok_emb = new_embeddings

    def check_inputs(self, input_ids: torch.Tensor | None, num_new: int, num_past: int) -> None:
        """Fail with both numbers rather than with an index error deep inside an embedding lookup."""
        if num_past + num_new > self.config.context_length:
            raise ValueError(
                f"input is {num_past + num_new} tokens long ({num_past} cached + {num_new} new) but this model's "
                f"context_length is {self.config.context_length}; truncate the input or use a model with a longer "
                "context"
            )
        if input_ids is not None and input_ids.numel() > 0:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = high if high >= self.config.vocab_size else low
                raise ValueError(
                    f"token id {bad} is outside this model's vocabulary (vocab_size={self.config.vocab_size}, valid "
                    f"ids 0..{self.config.vocab_size - 1}); was the input encoded with a different tokenizer?"
                )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported by gpt2_scratch; read the attention module instead")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2-D (batch, keys) of 0/1, got shape {tuple(attention_mask.shape)}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputing a block in backward would append its keys to the cache a second time
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        num_new = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        num_past = cache.get_seq_length() if cache is not None else 0
        if not torch.compiler.is_compiling():
            self.check_inputs(input_ids, num_new, num_past)
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None  # nothing is padded: take the plain causal fast path
        if position_ids is None:
            if attention_mask is not None:  # left padding: count positions from each row's first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -num_new:]
            else:
                position_ids = torch.arange(num_past, num_past + num_new, device=self.pos_emb.weight.device)[None]

        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.drop_emb(x + self.pos_emb(position_ids))
        all_hidden_states = [] if output_hidden_states else None
        for block in self.trf_blocks:
            if all_hidden_states is not None:
                all_hidden_states.append(x)
            x = block(x, attention_mask, cache)
        x = self.final_norm(x)
        if all_hidden_states is not None:
            all_hidden_states.append(x)

        output = BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )
        return output if return_dict is not False else output.to_tuple()


class GPT2ScratchForCausalLM(GPT2ScratchPreTrainedModel, GenerationMixin):
    """GPT-2 with its language-model head: next-token logits, the shifted loss, and `generate()`."""

    _tied_weights_keys = {"out_head.weight": "transformer.tok_emb.weight"}

    def __init__(self, config: GPT2ScratchConfig) -> None:
        super().__init__(config)
        self.transformer = GPT2ScratchModel(config)
        # Tied to tok_emb (see _tied_weights_keys): reading and writing a token share one vector (vocab·emb_dim fewer).
        self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.out_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.out_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` are the input ids themselves: the loss shifts them so position t is scored on token t+1.

        `logits_to_keep=k` computes logits for the last k positions only (generation needs just the last one);
        `num_items_in_batch` makes the loss a sum divided by that count, so gradient accumulation averages correctly.
        """
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.out_head(hidden_states)

        loss = None
        if labels is not None:
            # Shift the targets, not the logits: no copy of the (tokens × vocab) logits is made.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).to(logits.device)
            reduction = "mean" if num_items_in_batch is None else "sum"
            # In fp32 even under bf16 autocast: log-softmax over a large vocabulary needs the precision.
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction
            )
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


class GPT2ScratchForSequenceClassification(GPT2ScratchPreTrainedModel):
    """GPT-2 with a classification head read from the last real (non-padding) token, which has seen the whole text."""

    def __init__(self, config: GPT2ScratchConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPT2ScratchModel(config)
        self.score = nn.Linear(config.emb_dim, config.num_labels, bias=False)
        self.post_init()

    def last_token_index(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, length: int):
        """Index of each row's last real token: works for left, right and no padding."""
        positions = torch.arange(length, device=self.score.weight.device)
        if attention_mask is not None:
            return (positions * attention_mask.to(positions.device)).argmax(-1)
        if input_ids is not None and self.config.pad_token_id is not None:
            return (positions * (input_ids != self.config.pad_token_id).to(positions.device)).argmax(-1)
        return torch.full((1,), length - 1, device=positions.device)  # without a mask nothing can be padded

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        batch, length = hidden_states.shape[:2]
        last = self.last_token_index(input_ids, attention_mask, length).expand(batch)
        pooled_logits = self.score(hidden_states[torch.arange(batch, device=hidden_states.device), last])

        loss = None
        if labels is not None:
            labels = labels.to(pooled_logits.device)
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                batch = labels.shape[0]
                loss = F.mse_loss(pooled_logits.float().view(batch, -1), labels.float().view(batch, -1))
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(pooled_logits.float().view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(pooled_logits.float(), labels.float())
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled_logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


# save_pretrained copies this file and the configuration file next to the weights, and records them in auto_map.
GPT2ScratchConfig.register_for_auto_class()
GPT2ScratchModel.register_for_auto_class("AutoModel")
GPT2ScratchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
GPT2ScratchForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
