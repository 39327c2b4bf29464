"""GPT-2, written out block by block, that is also a Hugging Face `PreTrainedModel`.

Read it top to bottom: GELU → LayerNorm → FeedForward → causal mask → MultiHeadAttention → TransformerBlock → the
model. Only the classes at the end speak transformers' language (config class, outputs, `generate`, Auto classes).

Two files sit beside this one and travel with it into every saved checkpoint: decoding_gpt2_scratch.py, the engine
generate() multiplies through on a CPU (derived from the layers here, switched off by `model.fast_decoding = False`),
and stock_gpt2_scratch.py, which maps stock GPT-2 checkpoints onto these layers when loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GenerationMixin,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import can_return_tuple, logging

from .configuration_gpt2_scratch import GPT2ScratchConfig
from .decoding_gpt2_scratch import DecodeLayout, FastDecodingMixin
from .stock_gpt2_scratch import StrictLoadingMixin

logger = logging.get_logger(__name__)


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
        self.layers = nn.Sequential(nn.Linear(config.emb_dim, 4 * config.emb_dim), GELU(),
                                    nn.Linear(4 * config.emb_dim, config.emb_dim))
        self.layers[2].writes_to_residual = True  # initialised smaller, see _init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def causal_mask(query_positions: torch.Tensor, num_keys: int, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch or 1, 1, queries, keys) booleans, True where a query may look: at keys up to its own position, never at
    the future it is trained to predict, nor at padding (`padding_mask`: (batch, keys seen so far) of 0/1)."""
    allowed = torch.arange(num_keys, device=query_positions.device) <= query_positions[:, None]
    allowed = allowed[None, None]
    if padding_mask is not None:
        padding_mask = padding_mask.to(torch.bool)
        if padding_mask.shape[-1] < num_keys:  # a static cache's unwritten slots: the future, blocked anyway
            padding_mask = torch.cat([padding_mask, padding_mask.new_zeros(
                padding_mask.shape[0], num_keys - padding_mask.shape[-1])], dim=-1)
        allowed = allowed & padding_mask[:, None, None, :num_keys]
    # A left-padding query sees nothing; letting it see everything keeps softmax finite (its output is unused).
    return allowed | ~allowed.any(dim=-1, keepdim=True)


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
        # The seed kept its causal mask here as a (context × context) buffer; one per block costs n_layers·context²
        # bytes (12 × 10 GB at context 100,000), so the model builds the (queries × keys) mask a call needs, once per
        # call for all blocks (`causal_mask`), and none at all where the fused kernel masks by itself.

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, emb_dim) → (batch, heads, tokens, head_dim): each head attends independently."""
        batch, num_tokens, _ = x.shape
        return x.view(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, context: torch.Tensor) -> torch.Tensor:
        """(batch, heads, tokens, head_dim) → (batch, tokens, emb_dim): the heads' outputs side by side."""
        batch, _, num_tokens, _ = context.shape
        # transpose() only changes strides; .contiguous() lays the heads side by side in memory so .view can merge them.
        return context.transpose(1, 2).contiguous().view(batch, num_tokens, self.d_out)

    def eager_attention(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The textbook path: scores → mask → softmax → dropout → weighted sum of values. Returns the context and the
        attention weights (batch, heads, queries, keys): row i says how much query i takes from each key."""
        attn_scores = queries @ keys.transpose(2, 3)  # (batch, heads, queries, keys)
        attn_scores = attn_scores.masked_fill(~allowed, -torch.inf)
        # Scaling by 1/√head_dim keeps the scores' variance near 1, so softmax does not saturate into one-hot weights.
        attn_weights = torch.softmax(attn_scores / math.sqrt(self.head_dim), dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values, attn_weights

    def sdpa_attention(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        """The same computation in PyTorch's fused kernel, which never materialises the full score matrix.

        `allowed=None` means the plain causal pattern: the queries are all the keys, or the one newest key.
        """
        if queries.device.type == "cpu" and queries.dtype == torch.bfloat16:
            # The fused CPU kernel's backward runs ~4x slower in bfloat16 than in float32 (PyTorch 2.13), so under
            # bf16 autocast attention runs in float32 (autocast off, or it would cast straight back) and returns bf16.
            with torch.autocast("cpu", enabled=False):
                context = self.sdpa_attention(queries.float(), keys.float(), values.float(), allowed)
            return context.to(queries.dtype)
        dropout_p = self.dropout.p if self.training else 0.0
        # Without a mask the kernel builds the causal one itself; one new token may see every cached one.
        is_causal = allowed is None and queries.shape[2] > 1
        return F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=allowed, dropout_p=dropout_p, is_causal=is_causal
        )

    def attend(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The context, and the attention weights when `output_attentions` (only the eager path has them)."""
        if self.config._attn_implementation == "eager" or output_attentions:  # the fused kernel never forms weights
            context, attn_weights = self.eager_attention(queries, keys, values, allowed)
            return context, attn_weights if output_attentions else None
        return self.sdpa_attention(queries, keys, values, allowed), None

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attended output, and the attention weights when `output_attentions` (only the eager path has them).

        `allowed`: the call's `causal_mask` (True where a query may look), or None for the plain causal pattern.
        """
        queries = self.split_heads(self.W_query(x))
        keys = self.split_heads(self.W_key(x))
        values = self.split_heads(self.W_value(x))
        if cache is not None:  # append this step's keys/values and attend over everything seen so far
            keys, values = cache.update(keys, values, self.layer_idx)
        context, attn_weights = self.attend(queries, keys, values, allowed, output_attentions)
        return self.out_proj(self.merge_heads(context)), attn_weights


def new_token_slots(cache: Cache | None, num_new: int, device: torch.device) -> torch.Tensor:
    """Where this call's tokens go in the cache: after the ones already there (a tensor count for a static cache)."""
    num_past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(num_new, device=device) + num_past


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
        self,
        x: torch.Tensor,
        allowed: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The residual path carries x through unchanged, so gradients reach early layers without vanishing.
        attended, attn_weights = self.att(self.norm1(x), allowed, cache, output_attentions)
        x = x + self.drop_shortcut(attended)
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x, attn_weights


# ---- Hugging Face edges: weight init, the base model, the heads. ----------------------------------------------------


class GPT2ScratchPreTrainedModel(StrictLoadingMixin, PreTrainedModel):  # from_pretrained: strict, stock GPT-2 too
    config_class = GPT2ScratchConfig
    config: GPT2ScratchConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _supports_attention_backend = False
    _can_compile_fullgraph = True  # tests compile a static-cache decode step with fullgraph=True
    _skip_keys_device_placement = "cache"
    _keys_to_ignore_on_load_unexpected = [r"\.mask$"]  # the seed's state dicts still carry its per-block masks

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """`model.set_attn_implementation("eager")` works: MultiHeadAttention reads the choice at every call (the
        default check looks for transformers' attention-function registry in this file's source)."""
        return True

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


class GPT2ScratchModel(GPT2ScratchPreTrainedModel):
    """Token + position embeddings → n_layers TransformerBlocks → final LayerNorm. Returns hidden states."""

    stock_class = GPT2Model

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
            raise ValueError(f"input is {num_past + num_new} tokens long ({num_past} cached + {num_new} new) but this "
                             f"model's context_length is {self.config.context_length}; truncate the input or use a "
                             "model with a longer context")
        if input_ids is not None and input_ids.numel() > 0:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = high if high >= self.config.vocab_size else low
                raise ValueError(f"token id {bad} is outside this model's vocabulary (vocab_size="
                                 f"{self.config.vocab_size}, valid ids 0..{self.config.vocab_size - 1}); was the input "
                                 "encoded with a different tokenizer?")

    def mask_for(self, padding_mask: torch.Tensor | None, cache: Cache | None, cache_positions: torch.Tensor,
                 eager: bool = False) -> torch.Tensor | None:
        """The `causal_mask` every block uses this call, or None where the fused kernel's own causal mask is exact
        (never for the eager path, which `eager=True` asks for whatever the configured implementation)."""
        num_new = cache_positions.shape[0]
        num_keys = cache.get_mask_sizes(num_new, 0)[0] if cache is not None else num_new
        # A static cache's keys include slots not written yet, which only a mask hides.
        keys_are_tokens_seen = cache is None or not cache.is_compileable
        plain_causal = keys_are_tokens_seen and (num_new == num_keys or num_new == 1)
        if padding_mask is None and plain_causal and not eager and self.config._attn_implementation != "eager":
            return None
        return causal_mask(cache_positions, num_keys, padding_mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        decode_layout: DecodeLayout | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """`decode_layout`: run the blocks through these decode matmuls (see DecodeLayout); generate() passes it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(f"output_attentions=True: attn_implementation {self.config._attn_implementation!r} "
                                "has no attention weights, so this forward runs the eager path; load with "
                                "attn_implementation='eager' to silence this")
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError("attention_mask must be 2-D (batch, keys) of 0/1, or 4-D (batch, 1, queries, keys) of "
                             f"booleans, got shape {tuple(attention_mask.shape)}")
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
            raise ValueError(f"a 4-D attention_mask must be boolean (True where a query may look), got "
                             f"{attention_mask.dtype}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputing a block in backward would append its keys to the cache a second time
        cache = (cache if cache is not None else DynamicCache(config=self.config)) if use_cache else None

        num_new = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        device = self.pos_emb.weight.device
        cache_positions = new_token_slots(cache, num_new, device)
        if not torch.compiler.is_compiling():
            self.check_inputs(input_ids, num_new, int(cache.get_seq_length()) if cache is not None else 0)
        padded = attention_mask is not None and attention_mask.dim() == 2
        if padded and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask, padded = None, False  # nothing is padded: take the plain causal fast path
        if position_ids is None:
            if padded:  # left padding: count positions from each row's first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -num_new:]
            else:
                position_ids = cache_positions[None]
        allowed = attention_mask if attention_mask is not None and not padded else self.mask_for(
            attention_mask, cache, cache_positions, eager=output_attentions)

        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.drop_emb(x + self.pos_emb(position_ids))
        all_hidden_states = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        if decode_layout is not None and not (output_attentions or output_hidden_states):
            x = decode_layout.run_blocks(x, allowed, cache)  # the same blocks, through the decode matmuls
        else:
            for block in self.trf_blocks:
                if all_hidden_states is not None:
                    all_hidden_states.append(x)
                x, attn_weights = block(x, allowed, cache, output_attentions)
                if all_attentions is not None:
                    all_attentions.append(attn_weights)
        x = self.final_norm(x)
        if all_hidden_states is not None:
            all_hidden_states.append(x)

        output = BaseModelOutputWithPast(
            last_hidden_state=x, cache=cache,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
        )
        return output if return_dict is not False else output.to_tuple()


class GPT2ScratchForCausalLM(FastDecodingMixin, GPT2ScratchPreTrainedModel, GenerationMixin):
    """GPT-2 with its language-model head: next-token logits, the shifted loss, and `generate()`."""

    _tied_weights_keys = {"out_head.weight": "transformer.tok_emb.weight"}
    stock_class = GPT2LMHeadModel

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

    def create_masks_for_generate(self, config: GPT2ScratchConfig, inputs_embeds: torch.Tensor,
                                  attention_mask: torch.Tensor | None, cache: Cache | None,
                                  **kwargs) -> torch.Tensor | None:
        """generate() asks for the mask ahead of each step with a static cache, so a compiled step sees fixed shapes."""
        positions = new_token_slots(cache, inputs_embeds.shape[1], inputs_embeds.device)
        return self.transformer.mask_for(attention_mask, cache, positions)

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
        # Inside generate(), the decode engine's layout of these same weights (decoding_gpt2_scratch.py); else None.
        layout = self.step_layout(input_ids if input_ids is not None else inputs_embeds)
        outputs = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, decode_layout=layout, **kwargs)
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = (self.out_head if layout is None else layout.head)(hidden_states)

        loss = None
        if labels is not None:
            # Shift the targets, not the logits: no copy of the (tokens × vocab) logits is made.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).to(logits.device)
            # In fp32 even under bf16 autocast: log-softmax over a large vocabulary needs the precision.
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class GPT2ScratchForSequenceClassification(GPT2ScratchPreTrainedModel):
    """GPT-2 with a classification head read from the last real (non-padding) token, which has seen the whole text."""

    stock_class = GPT2ForSequenceClassification
    new_tensors = frozenset({"score.weight"})  # a language model's checkpoint starts a classifier without one

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
        outputs = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = outputs.last_hidden_state
        batch, length = hidden_states.shape[:2]
        last = self.last_token_index(input_ids, attention_mask, length).expand(batch)
        pooled_logits = self.score(hidden_states[torch.arange(batch, device=hidden_states.device), last])

        # transformers' loss for every problem type (regression, single- or multi-label), in fp32 as ours above
        loss = None if labels is None else ForSequenceClassificationLoss(labels, pooled_logits.float(), self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled_logits, cache=outputs.cache,
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# save_pretrained copies this file and the configuration file next to the weights, and records them in auto_map.
GPT2ScratchConfig.register_for_auto_class()
GPT2ScratchModel.register_for_auto_class("AutoModel")
GPT2ScratchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
GPT2ScratchForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
