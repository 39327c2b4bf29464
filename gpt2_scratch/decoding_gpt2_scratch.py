"""The decode engine: generate()'s matmuls through the CPU kernels that measured fastest, beside the readable model.

The model in modeling_gpt2_scratch.py is the source of truth; everything here is derived from its nn.Linear layers
(which training, PEFT and saving use), never saved, and rebuilt whenever they change. A decode step multiplies one
token per sequence, which makes reading the weights the cost: the same products, with the weights laid out for the
kernel that streams them fastest on this CPU (docs/speed.md names the CPU kind and measured gain behind each path).
Tests hold this engine to the readable model's tokens. `model.fast_decoding = False` switches it off.

This file is copied next to every saved checkpoint with the modeling file, so it imports only libraries.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer


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
    """A TransformerBlock as a decode step runs it: the block (for its norms, attention and GELU) and its matmuls in
    the order a step runs them."""

    block: nn.Module
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

    def __init__(self, model: PreTrainedModel, rows: int, kind: str | None = None) -> None:
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
        self.blocks = [DecodeBlock(block, *matmuls[i * per_block:(i + 1) * per_block])
                       for i, block in enumerate(model.transformer.trf_blocks)]

    # The fastest one-row kernel for each weight shape, measured once per process for each model shape, dtype and
    # thread count.
    one_row_kernels: dict[tuple, dict[tuple, str]] = {}
    one_row_kinds = {torch.float32: ("vector", "linear", "transposed"), torch.bfloat16: ("linear", "prepacked")}
    copy_margin = 1.1  # a kernel that needs more memory (a transposed or prepacked copy) must be this much faster
    clock: Callable[[], float] = staticmethod(time.perf_counter)  # what the kernel choice times with (tests replace it)

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
        # A generator of its own: drawing from the global one would change what a seeded sampling run draws next.
        inputs = torch.Generator().manual_seed(0)
        rows = [torch.randn(1, layers[0].in_features, dtype=dtype, generator=inputs) for layers in groups]
        seconds = {(kind, shape): [0.0] * 4 for kind in kinds for shape in shapes}
        with torch.no_grad():
            for turn in range(4):  # taking turns; the first round only warms each kernel up
                for kind, matmuls in candidates.items():
                    for matmul, x, shape in zip(matmuls, rows, shapes):
                        start = cls.clock()
                        matmul(x)
                        seconds[kind, shape][turn] += cls.clock() - start
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
    def for_compiled_step(cls, model: PreTrainedModel, rows: int) -> DecodeLayout:
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
    def matmul_layers(cls, model: PreTrainedModel) -> list[list[nn.Linear]]:
        """Every matmul of a step, in a step's order, as the layers that read the same input; the head last."""
        groups = [layers for block in model.transformer.trf_blocks for layers in cls.block_layers(block)]
        return [*groups, [model.out_head]]

    @staticmethod
    def block_layers(block: nn.Module) -> tuple[list[nn.Linear], ...]:
        """A block's matmuls in the order a step runs them, each as the layers that read the same input."""
        att, ff = block.att, block.ff
        return [att.W_query, att.W_key, att.W_value], [att.out_proj], [ff.layers[0]], [ff.layers[2]]

    @staticmethod
    def kind_for(rows: int) -> str:
        """One row is a matrix-vector product (through the kernels `fastest_one_row_matmuls` measures fastest);
        several rows are multiplied by oneDNN's prepacked weights."""
        return "vector" if rows == 1 else "prepacked"

    @classmethod
    def fingerprint(cls, model: PreTrainedModel) -> list[tuple]:
        return cls.marks(model.parameters())

    @staticmethod
    def marks(tensors) -> list[tuple]:
        """What changes when a tensor is replaced, moved, cast or written in place (its version counter)."""
        return [(id(t), t.data_ptr(), t.dtype, t.device, t._version) for t in tensors]

    @staticmethod
    def applies_to(model: PreTrainedModel) -> bool:
        """Only plain nn.Linear layers (not PEFT-wrapped ones) on the CPU; elsewhere the modules run unchanged."""
        layers = [layer for group in DecodeLayout.matmul_layers(model) for layer in group]
        return model.device.type == "cpu" and all(type(layer) is nn.Linear for layer in layers)

    def fits(self, model: PreTrainedModel, rows: int) -> bool:
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
        # whole cache), and among inductor's own loops ("reduction"), which it then joins (fp32, one row: 1.08x)
        summed = self.kind == "reduction" or (self.kind in DecodeMatmul.on_parameters and x.dtype == torch.bfloat16)
        for block, qkv, out_proj, widen, narrow in self.blocks:
            att = block.att
            queries, keys, values = map(att.split_heads, qkv(block.norm1(x)).chunk(3, dim=-1))
            if cache is not None:
                keys, values = cache.update(keys, values, att.layer_idx)
            if summed:
                context = self.summed_attention(queries, keys, values, allowed)
            else:
                context, _ = att.attend(queries, keys, values, allowed)
            x = x + out_proj(att.merge_heads(context))
            x = x + narrow(block.ff.layers[1](widen(block.norm2(x))))
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


class FastDecodingMixin:
    """The seam between a causal LM and this engine: `fast_decoding`, the layouts generate() builds, and the layout
    each of its forward calls runs through (`step_layout`)."""

    # generate() multiplies by a DecodeLayout (fused query/key/value copies, and for several rows prepacked copies of
    # every matmul weight, also kept for a compiled step: `prepacked_linear`); False saves that memory.
    fast_decoding = True
    _decode_layout: DecodeLayout | None = None
    _step_layouts: dict[int, DecodeLayout | None] | None = None  # rows → layout, within one generate() call

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

    def step_layout(self, inputs: torch.Tensor) -> DecodeLayout | None:
        """The layout a forward call inside generate() runs through (None outside generate(), in training, or where
        none applies). `inputs`: the call's input ids or embeddings, (rows, new tokens, ...)."""
        layouts = self._step_layouts
        if layouts is None or self.training or torch.is_grad_enabled():
            return None
        rows, num_new = inputs.shape[:2]
        if not torch.compiler.is_compiling():
            if rows not in layouts:
                layouts[rows] = self.decode_layout(rows)
            return layouts[rows]
        if num_new == 1 and self.fast_decoding and DecodeLayout.applies_to(self):
            # inductor takes oneDNN's packed weights only as constants, which would go stale: a compiled step
            # multiplies the parameters themselves
            return DecodeLayout.for_compiled_step(self, rows)
        return None

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
