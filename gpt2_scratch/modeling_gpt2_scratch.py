"""GPT-2, written out block by block, that is also a Hugging Face `PreTrainedModel`.

Read it top to bottom: GELU → LayerNorm → FeedForward → MultiHeadAttention → TransformerBlock → the model.
Only the classes at the end speak transformers' language (config class, outputs, `generate`, Auto classes).

This file is copied next to every saved checkpoint, so it imports only the configuration file and libraries.
"""

from __future__ import annotations

import math
import re
import time
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers import (
    GenerationMixin,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.utils import can_return_tuple, logging

from .configuration_gpt2_scratch import GPT2ScratchConfig

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
        self.layers = nn.Sequential(
            nn.Linear(config.emb_dim, 4 * config.emb_dim),
            GELU(),
            nn.Linear(4 * config.emb_dim, config.emb_dim),
        )
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
        # The seed kept its causal mask here, as self.register_buffer("mask", torch.triu(torch.ones(context_length,
        # context_length), diagonal=1)): a buffer, not a parameter, so it moves with .to(device) but is never
        # trained (and, with persistent=False, never saved). One such mask per block costs n_layers·context_length²
        # bytes (12 × 10 GB at context 100,000), so the model now builds the (queries × keys) mask a call needs, once
        # per call for all blocks (see `causal_mask`), and none at all where the fused kernel masks by itself.

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


# ----------------------------------------------------------------------------------------------------------------------
# Decode fast path: the same matmuls with weights laid out for one-token steps. Derived from the nn.Linear modules
# above (which stay the source of truth for training, PEFT and saving), never saved, rebuilt whenever they change.
# ----------------------------------------------------------------------------------------------------------------------


class DecodeMatmul:
    """One or more nn.Linear layers that read the same input, as a decode step multiplies them: side by side as one
    wider matmul, through the kernel that streams the weights fastest for the step's row count. `kind` says which
    (see `DecodeLayout.kind_for` and `DecodeLayout.fastest_one_row_matmuls`):

    - "prepacked": several rows times a copy of the weights oneDNN reorders ("prepacks") for 8 rows (float32, and
      bfloat16 on CPUs with bf16 instructions);
    - "widened": several bfloat16 rows on CPUs without bf16 instructions, where bf16 matmuls are emulated and
      compute-bound: the float32 prepacked kernel on the weights widened to float32 (exact), the rows widened and
      the products rounded back to bfloat16 — what a bf16 matmul computes (float32 sums), at float32's speed;
    - for one float32 row, whichever of these three measures fastest on this CPU for the weight's shape: "vector",
      oneDNN's linear on the weights as they are; "linear", F.linear's BLAS matrix-vector product on the same; or
      "transposed", oneDNN's linear on an (in × out) copy, which oneDNN multiplies with its sgemm matrix-vector kernel
      (the one CTranslate2 calls) instead of the kernel it picks for (out × in) weights;
    - for one bfloat16 row, "linear" (PyTorch's bf16 GEMV) or, where the CPU has bf16 instructions, "prepacked" if
      it measures faster; on CPUs without them "linear" alone, the only fast one there, and a prompt of
      `widened_rows` or more rows is multiplied as "widened" does, widening the weights for that call only
      (`widens`);
    - for a compiled step (see `DecodeLayout.for_compiled_step`), the layers' own weights, passed at each call, one
      product per layer. "linears": each layer's F.linear, which inductor leaves to BLAS. "reduction": each product
      written as multiply-and-sums over the input features, which inductor fuses into one loop over the weight's rows
      (`blocked_product`; its own `decompose_mm` pass writes small one-row products the same way, in one block); run
      eagerly, it would materialise every product: it is only ever traced. "packed": the operator
      `prepacked_linear`, which inductor calls as it is, multiplying by a "prepacked" copy kept beside the parameters
      and rebuilt whenever one of them has changed.
    """

    # the kinds of a compiled step: nothing derived in the layout, so nothing for it to fingerprint
    on_parameters = ("reduction", "linears", "packed")
    # Row blocks per weight in a one-row "reduction": inductor's loop then reads 4 rows at once, 4 independent sums over
    # 4 memory streams (8 blocks against one: the compiled step 1.23-1.36x faster in fp32 on a Zen 3 EPYC). Not 8: a
    # bf16 sum takes two AVX2 registers, and 8 of them spilled to the stack (4: bf16 ~1.04x, fp32 even; docs/speed.md).
    streams = 4
    # The most rows a "reduction" multiplies: one sum per row and weight row in inductor's loop (measured up to 8).
    max_rows = 8
    # Where bf16 matmuls are emulated they cost a matrix-vector product per row (gpt2-small's blocks: 10 ms for one
    # row, 134 ms for 16), a widened float32 product one widening of the weights (19 and 56 ms): from 8 rows on, a
    # prompt is multiplied widened (Zen 3 EPYC, docs/speed.md).
    widened_rows = 8
    emulated_bf16 = False  # bf16 weights on a CPU without bf16 instructions, multiplied by F.linear ("linear")

    def __init__(self, layers: list[nn.Linear], kind: str) -> None:
        self.in_features = layers[0].weight.shape[1]
        if kind in self.on_parameters:  # nothing derived: the parameters themselves, read when the step runs
            self.kind, self.layers, self.weight, self.bias, self.nbytes = kind, layers, None, None, 0
            return
        weight = self.fused([layer.weight for layer in layers])
        self.bias = None if layers[0].bias is None else self.fused([layer.bias for layer in layers])
        onednn, bf16_onednn = self.onednn(), self.onednn_bf16()
        if weight.dtype == torch.float32 and (onednn or kind == "linear"):
            self.kind = kind
        elif onednn and weight.dtype == torch.bfloat16 and kind == "prepacked":
            self.kind = kind if bf16_onednn else "widened"
        else:
            self.kind = "linear"
            self.emulated_bf16 = weight.dtype == torch.bfloat16 and not bf16_onednn
        fused, widened = len(layers) > 1, self.kind == "widened"
        if widened:
            weight, self.bias = weight.float(), None if self.bias is None else self.bias.float()
        prepacked, transposed = self.kind in ("prepacked", "widened"), self.kind == "transposed"
        if prepacked:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
        else:  # oneDNN reads the strides: the transposed copy, seen as (out × in), is an (in × out) matrix to it
            self.weight = weight.t().contiguous().t() if transposed else weight
        # Memory beyond the parameters themselves: a fused, prepacked, widened or transposed weight is a copy; so is a
        # fused or widened bias.
        copies = ([weight] if fused or prepacked or transposed else []) + ([self.bias] if fused or widened else [])
        self.nbytes = sum(t.numel() * t.element_size() for t in copies if t is not None)

    @staticmethod
    def onednn() -> bool:
        """Whether this PyTorch has oneDNN and it is switched on."""
        return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled

    @classmethod
    def onednn_bf16(cls) -> bool:
        """Whether oneDNN multiplies bf16 natively here: on, and the CPU has bf16 instructions."""
        return cls.onednn() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    @classmethod
    def blocked_product(cls, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (rows first) times the weight's transpose as multiply-and-sums, which inductor fuses into one loop over
        the weight's rows. One row: over `streams` blocks of the weight's rows, all of one size but the last (which
        inductor loops over apart). Several rows: one multiply-and-sum per row, each weight element read once for all
        of them (a batched multiply-and-sum is a loop that reads the weight again for every row). Only ever traced:
        eagerly it materialises every product."""
        if x.shape[0] == 1:
            blocks = weight.split(math.ceil(weight.shape[0] / cls.streams))
            return torch.cat([(x.unsqueeze(-2) * rows).sum(-1) for rows in blocks], -1)
        return torch.stack([(row.unsqueeze(-2) * weight).sum(-1) for row in x.unbind()])

    def widens(self, x: torch.Tensor) -> bool:
        """Whether F.linear multiplies these rows (a prompt's tokens × sequences) widened to float32, as "widened" does
        with its kept copy: bf16 emulated, and at least `widened_rows` rows."""
        return self.emulated_bf16 and x.numel() >= self.widened_rows * self.in_features

    @staticmethod
    def parameters_of(layers: list[nn.Linear]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The layers' weights, and their biases where they have them."""
        return [layer.weight for layer in layers], [layer.bias for layer in layers if layer.bias is not None]

    @staticmethod
    def fused(tensors: list[torch.Tensor]) -> torch.Tensor:
        """The parameter itself where there is one (no copy), else the parameters stacked along dim 0."""
        return tensors[0].detach() if len(tensors) == 1 else torch.cat([t.detach() for t in tensors])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in self.on_parameters:
            if self.kind == "packed":
                return getattr(torch.ops, OPERATOR_NAMESPACE).prepacked_linear(x, *self.parameters_of(self.layers))
            if self.kind == "linears":
                products = [F.linear(x, layer.weight, layer.bias) for layer in self.layers]
            else:
                # Several rows in float32 (exact, and bf16 products are summed in float32 anyway), widened once: a bf16
                # row widened in the loop, for every weight row, ran 1.9x slower.
                rows = x if x.shape[0] == 1 else x.float()
                # A no-op view, except that inductor must write the rows to memory for it: otherwise it recomputes x's
                # last norm or GELU inside the loop, once per weight row (bf16's tied head ran at half speed that way).
                rows = rows.as_strided(rows.shape, rows.stride())
                products = [self.blocked_product(rows, layer.weight) for layer in self.layers]
                if self.layers[0].bias is not None:
                    products = [product + layer.bias for product, layer in zip(products, self.layers)]
                products = [product.to(x.dtype) for product in products]
            return products[0] if len(products) == 1 else torch.cat(products, dim=-1)
        if self.kind == "linear":
            if not self.widens(x):
                return F.linear(x, self.weight, self.bias)
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        # oneDNN multiplies in the weight's dtype: "widened" takes bf16 rows to float32 and rounds the products back
        # (the casts only there: a no-op cast still costs a dispatch, ~100 a step)
        widened = self.kind == "widened"
        rows = x.float() if widened else x
        product = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return product.to(x.dtype) if widened else product


# oneDNN's prepacked copies of the weights, kept beside the parameters: first weight → (the marks of the parameters
# it was built from, the "prepacked" DecodeMatmul), gone with the weight. The eager layout of several rows and a
# compiled step's operator share them. A compiled step cannot hold the copies itself: inductor takes them only as
# constants, which would go stale after an optimizer step; it calls `prepacked_linear` on the parameters instead.
PREPACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def prepacked_matmul(weights: list[torch.Tensor], biases: list[torch.Tensor]) -> DecodeMatmul:
    """The "prepacked" DecodeMatmul of these weights side by side (and biases, if any), from PREPACKED: built at the
    first call and again whenever one of them has been changed, replaced or moved since."""
    marks = DecodeLayout.marks([*weights, *biases])
    kept = PREPACKED.get(weights[0])
    if kept is None or kept[0] != marks:
        PREPACKED.pop(weights[0], None)  # free the stale copy before building the new one
        layers = [SimpleNamespace(weight=w, bias=b) for w, b in zip(weights, biases or [None] * len(weights))]
        kept = PREPACKED[weights[0]] = marks, DecodeMatmul(layers, "prepacked")
    return kept[1]


def prepacked_linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """x times these weights side by side, plus the biases: the operator a "packed" compiled step calls."""
    return prepacked_matmul(weights, biases)(x)


# One operator for each copy of this file a process imports (the package's module; a checkpoint's copy, loaded as
# remote code), each on its own PREPACKED; registered once, as a plain CPU kernel: `torch.library.custom_op`'s Python
# layers cost ~14 µs more a call (49 calls a step). Decoding only: it has no gradient.
OPERATOR_NAMESPACE = "gpt2_scratch_" + re.sub(r"\W", "_", __name__)
if not hasattr(getattr(torch.ops, OPERATOR_NAMESPACE), "prepacked_linear"):
    OPERATORS = torch.library.Library(OPERATOR_NAMESPACE, "DEF")  # the registrations live as long as this object
    OPERATORS.define("prepacked_linear(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor")
    OPERATORS.impl("prepacked_linear", prepacked_linear, "CPU")
    torch.library.register_fake(f"{OPERATOR_NAMESPACE}::prepacked_linear", lib=OPERATORS)(
        lambda x, weights, biases: x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights))))


class DecodeBlock(NamedTuple):
    """A TransformerBlock as a decode step runs it: its own norm, attention and GELU modules (looked up once, not
    through nn.Module's attribute lookup every step), and its matmuls in the order a step runs them."""

    norm1: LayerNorm
    att: MultiHeadAttention
    norm2: LayerNorm
    gelu: nn.Module
    qkv: DecodeMatmul
    out_proj: DecodeMatmul
    widen: DecodeMatmul
    narrow: DecodeMatmul


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with room for `room` more tokens, so a decode step
    writes its one token in place instead of concatenating the whole history into new memory (batch 8 generates 400
    tokens 1.16x faster this way, docs/speed.md). Anything that replaces `keys` (beam search's reordering, crop,
    batch selection) is copied into fresh buffers at the next update; nothing already returned is ever written to."""

    room = 128  # tokens of spare capacity per (re)allocation: one copy of the history every 128 steps

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        new_length = length + key_states.shape[-2]
        storage = getattr(self, "storage", None)
        if storage is None or self.keys is not self.views[0] or new_length > storage[0].shape[-2]:
            storage = tuple(new.new_empty((*new.shape[:-2], new_length + self.room, new.shape[-1]))
                            for new in (key_states, value_states))
            if length:
                storage[0][..., :length, :] = self.keys
                storage[1][..., :length, :] = self.values
            self.storage = storage
        storage[0][..., length:new_length, :] = key_states
        storage[1][..., length:new_length, :] = value_states
        self.keys, self.values = storage[0][..., :new_length, :], storage[1][..., :new_length, :]
        self.views = (self.keys, self.values)  # what we handed out: anything else in self.keys came from elsewhere
        return self.keys, self.values

    @classmethod
    def grow_in_place(cls, cache: Cache) -> None:
        """Turn a cache's plain DynamicLayers (and those it will add) into GrowingLayers, keeping what they hold."""
        if cache.layer_class_to_replicate is DynamicLayer:
            cache.layer_class_to_replicate = cls
        for i, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer:
                cache.layers[i] = cls()
                cache.layers[i].__dict__.update(layer.__dict__)


class DecodeLayout:
    """The matmul weights of a causal LM as generate() multiplies them (a `DecodeMatmul` each: query/key/value fused,
    through the kernel fastest for the step's row count), and the blocks run as one loop over them.

    Derived from the nn.Linear modules, which stay the source of truth for training, PEFT and saving: nothing here is a
    parameter or a buffer, so nothing is saved. `fits()` compares each parameter's identity, storage, dtype, device and
    in-place version counter (which optimizer steps, `load_state_dict` and `.to()` all change) with those it was built
    from; a stale layout is rebuilt, never used.
    """

    def __init__(self, model: GPT2ScratchForCausalLM, rows: int, kind: str | None = None) -> None:
        self.kind = kind or self.kind_for(rows)
        # (a compiled step's layout holds no copies, and data pointers cannot be traced: nothing to fingerprint)
        self.sources = [] if self.kind in DecodeMatmul.on_parameters else self.fingerprint(model)
        groups = self.matmul_layers(model)
        if self.kind == "vector":
            matmuls = self.fastest_one_row_matmuls(groups, model.out_head.weight.dtype)
        elif self.kind == "prepacked":  # the copies a compiled step's operator uses too
            matmuls = [prepacked_matmul(*DecodeMatmul.parameters_of(layers)) for layers in groups]
        else:
            matmuls = [DecodeMatmul(layers, self.kind) for layers in groups]
        self.head = matmuls.pop()
        per_block = len(matmuls) // len(model.transformer.trf_blocks)
        self.blocks = [DecodeBlock(block.norm1, block.att, block.norm2, block.ff.layers[1],
                                   *matmuls[i * per_block:(i + 1) * per_block])
                       for i, block in enumerate(model.transformer.trf_blocks)]

    # The fastest one-row kernel for each weight shape, measured once per process for each model shape, dtype and
    # thread count.
    one_row_kernels: dict[tuple, dict[tuple, str]] = {}
    one_row_kinds = {torch.float32: ("vector", "linear", "transposed"), torch.bfloat16: ("linear", "prepacked")}
    copy_margin = 1.1  # a kernel that needs more memory (a transposed or prepacked copy) must be this much faster

    @classmethod
    def one_row_candidates(cls, dtype: torch.dtype) -> tuple[str, ...]:
        """The one-row kernels worth measuring for weights of this dtype on this CPU: oneDNN's (float32, and bfloat16
        where the CPU has bf16 instructions) and BLAS's; BLAS's alone otherwise."""
        if not DecodeMatmul.onednn() or (dtype == torch.bfloat16 and not DecodeMatmul.onednn_bf16()):
            return ("linear",)
        return cls.one_row_kinds.get(dtype, ("linear",))

    @classmethod
    def fastest_one_row_matmuls(cls, groups: list[list[nn.Linear]], dtype: torch.dtype) -> list[DecodeMatmul]:
        """The step's matmuls, each through the kernel (`one_row_candidates`: "vector", "linear" or "transposed" in
        float32, "linear" or "prepacked" in bfloat16; see `DecodeMatmul`) that multiplies one row by weights of its
        shape fastest on this CPU. Measured, not assumed: the answer differs by CPU and shape (in float32 oneDNN's by
        1.5x over BLAS on an AMD EPYC, about even on an Intel Xeon, the transposed copy by 1.25x for the tied head on a
        Zen 3 EPYC; in bfloat16 oneDNN's prepacked weights by 1.46x over BLAS on an AVX-512-BF16 EPYC: docs/speed.md).
        Timed taking turns over all the step's weights in a step's order, so caches hold what they would in
        generate(); once per process (~1 s for gpt2-small, most of it making the copies, all held until the
        verdict)."""
        kinds = cls.one_row_candidates(dtype)
        if len(kinds) == 1:
            return [DecodeMatmul(layers, kinds[0]) for layers in groups]
        shapes = [cls.shape_of(layers) for layers in groups]
        key = (tuple(shapes), dtype, torch.get_num_threads())
        if key in cls.one_row_kernels:
            return [DecodeMatmul(layers, cls.one_row_kernels[key][shape]) for layers, shape in zip(groups, shapes)]
        candidates = {kind: [DecodeMatmul(layers, kind) for layers in groups] for kind in kinds}
        rows = [torch.randn(1, layers[0].in_features, dtype=dtype) for layers in groups]
        seconds = {(kind, shape): [0.0] * 4 for kind in kinds for shape in shapes}
        with torch.no_grad():
            for turn in range(4):  # taking turns; the first round only warms each kernel up
                for kind, matmuls in candidates.items():
                    for matmul, x, shape in zip(matmuls, rows, shapes):
                        start = time.perf_counter()
                        matmul(x)
                        seconds[kind, shape][turn] += time.perf_counter() - start
        chosen = {}
        for shape in dict.fromkeys(shapes):
            nbytes = {kind: sum(m.nbytes for m, s in zip(candidates[kind], shapes) if s == shape) for kind in kinds}
            chosen[shape] = cls.pick_one_row_kernel({kind: min(seconds[kind, shape][1:]) for kind in nbytes}, nbytes)
        cls.one_row_kernels[key] = chosen
        return [candidates[chosen[shape]][i] for i, shape in enumerate(shapes)]

    @classmethod
    def pick_one_row_kernel(cls, seconds: dict[str, float], nbytes: dict[str, int]) -> str:
        """The fastest kind, a kind that holds more memory than another counted `copy_margin` times slower."""
        least = min(nbytes.values())
        return min(seconds, key=lambda kind: seconds[kind] * (cls.copy_margin if nbytes[kind] > least else 1))

    @staticmethod
    def shape_of(layers: list[nn.Linear]) -> tuple[int, int, int]:
        """A matmul's layers as the measurement tells them apart: how many, output and input features."""
        return len(layers), sum(layer.out_features for layer in layers), layers[0].in_features

    @classmethod
    def for_compiled_step(cls, model: GPT2ScratchForCausalLM, rows: int) -> DecodeLayout:
        """The layout a compiled decode step traces: products over the parameters themselves, passed at each call, so
        the compiled step reads the weights as they are when it runs (optimizer steps included); nothing is frozen
        into it.
        One float32 row, where BLAS's matrix-vector product measured fastest for the head, the largest matmul, in the
        eager step (the one-row layout the eager prefill built: `fastest_one_row_matmuls`): the step calls it
        ("linears": an Intel Xeon, docs/speed.md). Several rows where oneDNN multiplies bf16 natively: oneDNN's
        prepacked weights, as the eager step, kept beside the parameters by the operator it calls ("packed",
        `prepacked_matmul`; on the AVX-512-BF16 EPYC at batch 8 1.34x inductor's loop in fp32, 1.41x in bf16).
        Otherwise inductor's own loop ("reduction": where a oneDNN kernel won, in bfloat16, and for up to
        `DecodeMatmul.max_rows` rows; it won on a Zen 3 EPYC); more rows keep the modules' linears."""
        measured = model._decode_layout
        blas = (rows == 1 and model.out_head.weight.dtype == torch.float32 and measured is not None
                and measured.kind == "vector" and measured.head.kind == "linear")
        if rows > 1 and cls.packs_several_rows():
            return cls(model, rows, kind="packed")
        return cls(model, rows, kind="linears" if blas or rows > DecodeMatmul.max_rows else "reduction")

    @staticmethod
    @torch.compiler.assume_constant_result  # asked while tracing: the answer is fixed into the compiled step
    def packs_several_rows() -> bool:
        """Whether a compiled step of several rows multiplies by oneDNN's prepacked weights: where oneDNN has bf16
        instructions to use (measured faster than inductor's loop on such a CPU, docs/speed.md; slower on a Zen 3
        EPYC, without them)."""
        return DecodeMatmul.onednn_bf16()

    @classmethod
    def matmul_layers(cls, model: GPT2ScratchForCausalLM) -> list[list[nn.Linear]]:
        """Every matmul of a step, in a step's order, as the layers that read the same input; the head last."""
        groups = [layers for block in model.transformer.trf_blocks for layers in cls.block_layers(block)]
        return [*groups, [model.out_head]]

    @staticmethod
    def block_layers(block: TransformerBlock) -> tuple[list[nn.Linear], ...]:
        """A block's matmuls in the order a step runs them, each as the layers that read the same input."""
        att, ff = block.att, block.ff
        return [att.W_query, att.W_key, att.W_value], [att.out_proj], [ff.layers[0]], [ff.layers[2]]

    @staticmethod
    def kind_for(rows: int) -> str:
        """One row is a matrix-vector product (through the kernels `fastest_one_row_matmuls` measures fastest);
        several rows are multiplied by oneDNN's prepacked weights."""
        return "vector" if rows == 1 else "prepacked"

    @classmethod
    def fingerprint(cls, model: GPT2ScratchForCausalLM) -> list[tuple]:
        return cls.marks(model.parameters())

    @staticmethod
    def marks(tensors) -> list[tuple]:
        """What changes when a tensor is replaced, moved, cast or written in place (its version counter)."""
        return [(id(t), t.data_ptr(), t.dtype, t.device, t._version) for t in tensors]

    @staticmethod
    def applies_to(model: GPT2ScratchForCausalLM) -> bool:
        """Only plain nn.Linear layers (not PEFT-wrapped ones) on the CPU; elsewhere the modules run unchanged."""
        layers = [layer for group in DecodeLayout.matmul_layers(model) for layer in group]
        return model.device.type == "cpu" and all(type(layer) is nn.Linear for layer in layers)

    def fits(self, model: GPT2ScratchForCausalLM, rows: int) -> bool:
        return self.kind_for(rows) == self.kind and self.fingerprint(model) == self.sources

    def nbytes(self) -> int:
        """Memory held beyond the parameters themselves (for "packed", the copies its operator keeps so far)."""
        if self.kind == "packed":
            kept = [PREPACKED.get(matmul.layers[0].weight) for matmul in self.matmuls()]
            return sum(entry[1].nbytes for entry in kept if entry is not None)
        return sum(matmul.nbytes for matmul in self.matmuls())

    def matmuls(self) -> list[DecodeMatmul]:
        """Every matmul of a step, in the order a step runs them."""
        return [matmul for b in self.blocks for matmul in (b.qkv, b.out_proj, b.widen, b.narrow)] + [self.head]

    def run_blocks(self, x: torch.Tensor, allowed: torch.Tensor | None, cache: Cache | None) -> torch.Tensor:
        """TransformerBlock.forward for every block in turn, through the decode matmuls: the same operations in the
        same order (tests hold the tokens identical), without the module calls, which cost more than the arithmetic
        besides the matmuls when only one token per sequence is new; keys and values are appended in place
        (`GrowingLayer`)."""
        if cache is not None:
            GrowingLayer.grow_in_place(cache)
        # Attention summed where measured faster (docs/speed.md): in bf16 (the fused kernel takes float32 copies of the
        # whole cache), among inductor's own loops ("reduction"), which it then joins (fp32, one row: 1.08x), and
        # between oneDNN's ("packed": fp32, batch 8, 1.05x)
        summed = self.kind in ("reduction", "packed") or (
            self.kind in DecodeMatmul.on_parameters and x.dtype == torch.bfloat16)
        for norm1, att, norm2, gelu, qkv, out_proj, widen, narrow in self.blocks:
            queries, keys, values = map(att.split_heads, qkv(norm1(x)).chunk(3, dim=-1))
            if cache is not None:
                keys, values = cache.update(keys, values, att.layer_idx)
            if summed:
                context = self.summed_attention(queries, keys, values, allowed)
            else:
                context, _ = att.attend(queries, keys, values, allowed)
            x = x + out_proj(att.merge_heads(context))
            x = x + narrow(gelu(widen(norm2(x))))
        return x

    @staticmethod
    def summed_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         allowed: torch.Tensor | None) -> torch.Tensor:
        """Attention of one new token per row, for a compiled step: scores and context as multiply-and-sums in
        float32 over the cached keys and values where they lie, which inductor fuses into its loops (widening bf16 as
        they read it). `attend` calls the fused kernel apart from them, and in bf16 hands it float32 copies of the
        whole cache every step (`sdpa_attention`)."""
        scores = (queries.float() * keys.float()).sum(-1).unsqueeze(-2) / math.sqrt(queries.shape[-1])
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -torch.inf)
        weights = torch.softmax(scores, dim=-1)  # (batch, heads, 1, keys)
        return (weights.transpose(-1, -2) * values.float()).sum(-2, keepdim=True).to(queries.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face edges: weight init, the base model, the heads.
# ----------------------------------------------------------------------------------------------------------------------


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


class GPT2ScratchPreTrainedModel(PreTrainedModel):
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

    # The stock transformers GPT-2 class whose checkpoints this class converts on load, and the tensors a checkpoint
    # may lack because this class adds them (a new head); set by each model class.
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

    def mask_for(
        self, padding_mask: torch.Tensor | None, cache: Cache | None, cache_positions: torch.Tensor, eager: bool = False
    ) -> torch.Tensor | None:
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
            logger.warning_once(
                f"output_attentions=True: attn_implementation {self.config._attn_implementation!r} has no attention "
                "weights, so this forward runs the eager path; load with attn_implementation='eager' to silence this"
            )
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError(
                "attention_mask must be 2-D (batch, keys) of 0/1, or 4-D (batch, 1, queries, keys) of booleans, got "
                f"shape {tuple(attention_mask.shape)}"
            )
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype != torch.bool:
            raise ValueError(
                f"a 4-D attention_mask must be boolean (True where a query may look), got {attention_mask.dtype}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputing a block in backward would append its keys to the cache a second time
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

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
            attention_mask, cache, cache_positions, eager=output_attentions
        )

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
            last_hidden_state=x,
            cache=cache,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
        )
        return output if return_dict is not False else output.to_tuple()


class GPT2ScratchForCausalLM(GPT2ScratchPreTrainedModel, GenerationMixin):
    """GPT-2 with its language-model head: next-token logits, the shifted loss, and `generate()`."""

    _tied_weights_keys = {"out_head.weight": "transformer.tok_emb.weight"}
    stock_class = GPT2LMHeadModel

    def __init__(self, config: GPT2ScratchConfig) -> None:
        super().__init__(config)
        self.transformer = GPT2ScratchModel(config)
        # Tied to tok_emb (see _tied_weights_keys): reading and writing a token share one vector (vocab·emb_dim fewer).
        self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        self._decode_layout: DecodeLayout | None = None
        self._step_layouts: dict[int, DecodeLayout | None] | None = None  # rows → layout, within one generate() call
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.out_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.out_head = new_embeddings

    # generate() multiplies by a DecodeLayout (fused query/key/value copies, and for several rows prepacked copies of
    # every matmul weight, also kept for a compiled step: `prepacked_linear`); False saves that memory.
    fast_decoding = True

    def decode_layout(self, rows: int = 1) -> DecodeLayout | None:
        """The decode copies of the weights for steps of `rows` sequences, built (or rebuilt, when stale or laid out for
        another row count) now; None where they do not apply. generate() calls it with its batch size."""
        if not (self.fast_decoding and DecodeLayout.applies_to(self)):
            self._decode_layout = None
            for layers in DecodeLayout.matmul_layers(self):  # and the copies a compiled step's operator kept
                PREPACKED.pop(layers[0].weight, None)
            return None
        if self._decode_layout is None or not self._decode_layout.fits(self, rows):
            self._decode_layout = None  # free the stale copy before building the new one
            self._decode_layout = DecodeLayout(self, rows)
        return self._decode_layout

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickle leave behind what belongs to this model object alone: the decode layouts (rebuilt on
        # demand; oneDNN's packed tensors have no storage to copy) and the compiled __call__ generate() keeps (a
        # function, which deepcopy shares: a copy's compiled steps would run this model's weights).
        state = {**super().__getstate__(), "_decode_layout": None, "_step_layouts": None}
        state.pop("_compiled_call", None)
        return state

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, with every forward it makes going through `decode_layout()`, which checks that
        the layout is current once per call (checking every parameter at every step would cost ~1 ms a token)."""
        self._step_layouts = {}
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._step_layouts = None

    def create_masks_for_generate(
        self, config: GPT2ScratchConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
        cache: Cache | None, **kwargs,
    ) -> torch.Tensor | None:
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
        layout, layouts = None, self._step_layouts
        if layouts is not None and not (self.training or torch.is_grad_enabled()):
            rows, num_new = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            if not torch.compiler.is_compiling():
                if rows not in layouts:
                    layouts[rows] = self.decode_layout(rows)
                layout = layouts[rows]
            elif num_new == 1 and self.fast_decoding and DecodeLayout.applies_to(self):
                # inductor takes oneDNN's packed weights only as constants, which would go stale: a compiled step
                # multiplies the parameters themselves
                layout = DecodeLayout.for_compiled_step(self, rows)
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            decode_layout=layout,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.out_head(hidden_states) if layout is None else layout.head(hidden_states)

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
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


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
            loss=loss, logits=pooled_logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# save_pretrained copies this file and the configuration file next to the weights, and records them in auto_map.
GPT2ScratchConfig.register_for_auto_class()
GPT2ScratchModel.register_for_auto_class("AutoModel")
GPT2ScratchForCausalLM.register_for_auto_class("AutoModelForCausalLM")
GPT2ScratchForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
