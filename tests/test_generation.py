"""Generation paths: static cache vs dynamic cache, the compiled decode step, the masks a call builds."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, randomised, tiny_config
from transformers import CompileConfig, DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch import decoding_gpt2_scratch as package
from gpt2_scratch.decoding_gpt2_scratch import PREPACKED, DecodeLayout, DecodeMatmul, GrowingLayer
from gpt2_scratch.modeling_gpt2_scratch import causal_mask


def tiny_model(impl: str = "sdpa", **overrides) -> GPT2ScratchForCausalLM:
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(tiny_config(**overrides)).eval()
    model.config._attn_implementation = impl
    return model


def left_padded_batch(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 320, (rows, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


SEARCHES = {
    "greedy": dict(do_sample=False),
    "sampled": dict(do_sample=True, top_k=0, temperature=1.5),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("search", SEARCHES)
def test_static_cache_generates_the_dynamic_cache_tokens(impl, search):
    model = tiny_model(impl)
    ids, mask = left_padded_batch()
    outputs = []
    for cache_implementation in (None, "static"):
        torch.manual_seed(2)  # the same seed: sampling draws the same tokens when the logits agree
        outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0,
                                      cache_implementation=cache_implementation, **SEARCHES[search]))
    assert outputs[0].shape == (3 * SEARCHES[search].get("num_return_sequences", 1), 7 + 12)
    assert torch.equal(outputs[0], outputs[1])


def test_a_passed_static_cache_generates_the_dynamic_cache_tokens_and_is_filled():
    model = tiny_model()
    ids, mask = left_padded_batch()
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    cache = StaticCache(config=model.config, max_cache_len=32)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, cache=cache)
    assert torch.equal(dynamic, static)
    assert int(cache.get_seq_length()) == 7 + 10 - 1  # the last token is generated, not yet fed back


def test_static_cache_forward_matches_the_full_forward_step_by_step():
    """Direct use without generate(): the 2-D mask and the static cache's unwritten slots are handled in forward."""
    model = tiny_model()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = StaticCache(config=model.config, max_cache_len=16)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        pieces = [model(ids[:, :4], attention_mask=mask[:, :4], position_ids=positions[:, :4], cache=cache).logits]
        for t in range(4, 7):
            pieces.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                                cache=cache).logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[keep], full[keep], atol=1e-5, rtol=0)


def test_a_boolean_4d_mask_is_used_as_given_and_other_masks_are_refused():
    model = tiny_model()
    ids, mask = left_padded_batch()
    allowed = causal_mask(torch.arange(7), 7, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # a 4-D mask does not say where the padding is: pass positions
    with torch.no_grad():
        given = model(ids, attention_mask=allowed, position_ids=positions).logits
        torch.testing.assert_close(given, model(ids, attention_mask=mask).logits)
        with pytest.raises(ValueError, match="4-D attention_mask must be boolean"):
            model(ids, attention_mask=allowed.float())
        with pytest.raises(ValueError, match="must be 2-D .* or 4-D"):
            model(ids, attention_mask=mask[None])


@pytest.fixture
def fresh_dynamo() -> None:
    """Every compiled test traces new models through the same code object (nn.Module's __call__): start from empty
    caches, so dynamo's recompile limit (8 per code object) counts this test's compiles alone."""
    torch._dynamo.reset()


def test_static_cache_decode_step_compiles_with_fullgraph_and_keeps_the_tokens(fresh_dynamo):
    """transformers' compiled generation: static cache, the decode step under torch.compile(fullgraph=True).

    The backend records each captured graph and runs it as captured: fullgraph=True raises on any graph break, so
    this proves the whole step is one graph (inductor's code generation is PyTorch's, and slow on 2 cores)."""
    model = tiny_model(n_layers=1)
    ids, mask = left_padded_batch()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_config = cpu_compile_config(recording_backend)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    compiled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              cache_implementation="static", compile_config=compile_config)
    assert graphs, "the decode step was not compiled"
    assert torch.equal(reference, compiled)
    assert type(model)._can_compile_fullgraph and type(model)._supports_sdpa


def cpu_compile_config(backend) -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True  # generate() compiles only on GPUs unless told
    return config


def randomize_biases(model: GPT2ScratchForCausalLM) -> None:
    with torch.no_grad():  # biases start at zero, which would hide one left out
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))


def graph_recorder() -> tuple[list, Callable]:
    """A torch.compile backend that runs each captured graph as captured, and the list it keeps them in."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return graphs, recording_backend


def optimizer_step(model: GPT2ScratchForCausalLM, ids: torch.Tensor) -> None:
    """One SGD step on the model's loss over `ids` (lr 1.0, so the tokens change), back in eval mode."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()


def several_rows_compiled(monkeypatch, dtype: torch.dtype, packs: bool) -> tuple[GPT2ScratchForCausalLM, torch.Tensor,
                                                                                 dict]:
    """A tiny model in `dtype` (random biases) whose compiled steps of several rows multiply by oneDNN's copies or
    not, a left-padded batch of 3, and greedy generate() arguments for it."""
    monkeypatch.setattr(DecodeLayout, "packs_several_rows", staticmethod(lambda: packs))
    model = tiny_model(qkv_bias=True).to(dtype)
    randomize_biases(model)
    ids, mask = left_padded_batch()
    return model, ids, dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)


def measured_one_row_kernel(monkeypatch, kernel: str) -> None:
    """Make the eager one-row layout's measurement pick `kernel` (`DecodeLayout.one_row_kinds`) for every shape."""
    monkeypatch.setattr(DecodeLayout, "fastest_one_row_matmuls",
                        classmethod(lambda cls, groups, dtype: [DecodeMatmul(layers, kernel) for layers in groups]))


@pytest.mark.parametrize(("one_row_kernel", "dtype", "step_kind"), [
    ("vector", torch.float32, "reduction"),
    ("linear", torch.float32, "linears"),
    ("linear", torch.bfloat16, "reduction"),
])
def test_a_compiled_one_row_step_multiplies_the_parameters_themselves(one_row_kernel, dtype, step_kind, monkeypatch,
                                                                     fresh_dynamo):
    """One row per step compiled (static cache + compile): every product is traced over the parameters themselves,
    as F.linear per layer where BLAS measured fastest for the eager step in float32 (DecodeMatmul kind "linears"),
    else as a multiply-and-sum (kind "reduction", no linear left); run as captured it gives the dynamic cache's
    tokens, and after an optimizer step the same compiled step follows the new weights (nothing was copied)."""
    measured_one_row_kernel(monkeypatch, one_row_kernel)
    model = tiny_model(qkv_bias=True).to(dtype)
    randomize_biases(model)
    graphs, inputs = [], []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        inputs.append(example_inputs)
        return graph_module.forward

    prompt = left_padded_batch()[0][1:2]  # one row, no padding
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)

    def dynamic_and_compiled() -> tuple[torch.Tensor, torch.Tensor]:
        return model.generate(prompt, **kwargs), model.generate(
            prompt, cache_implementation="static", compile_config=cpu_compile_config(recording_backend), **kwargs)

    before, compiled = dynamic_and_compiled()
    assert torch.equal(before, compiled)
    step = graphs[-1].graph.nodes
    linears = [node for node in step if "linear" in str(node.target)]
    attention = [node for node in step if "scaled_dot_product_attention" in str(node.target)]
    if step_kind == "linears":  # one per layer (query, key and value apart: no fused copy) and the head
        assert len(linears) == 6 * model.config.n_layers + 1
        assert len(attention) == model.config.n_layers  # the fused kernel: summing was not measured beside BLAS
        assert not [node for node in step if node.target == "as_strided"]
        # each multiplies a graph input that is the parameter itself
        placeholders = dict(zip([node for node in step if node.op == "placeholder"], inputs[-1]))
        parameters = {id(p) for p in model.parameters()}
        assert all(id(placeholders.get(node.args[1])) in parameters for node in linears)
    else:  # one realized input per product: the fused query/key/value, out_proj, both feed-forward layers, the head
        assert not linears
        assert sum(node.target == "as_strided" for node in step) == 4 * model.config.n_layers + 1
        # every weight (query, key and value apart) and the head summed in `streams` blocks of rows, and each
        # layer's attention scores and context (`DecodeLayout.summed_attention`)
        assert not attention
        assert sum(node.target == "sum" for node in step) == (
            (6 * model.config.n_layers + 1) * DecodeMatmul.streams + 2 * model.config.n_layers)
    assert len(graphs) == 1

    optimizer_step(model, prompt)
    after, compiled = dynamic_and_compiled()
    assert torch.equal(after, compiled) and not torch.equal(after, before)
    assert len(graphs) == 1  # the same compiled step, reading the new weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_rows", [8, 2])
def test_a_compiled_step_of_several_rows_sums_each_row_over_the_parameters(dtype, max_rows, monkeypatch,
                                                                          fresh_dynamo):
    """Several rows compiled (a left-padded batch of 3): up to `DecodeMatmul.max_rows` rows, one multiply-and-sum per
    row and weight over the parameters themselves (kind "reduction", no linear left); more rows, the layers'
    F.linear. Either way the dynamic cache's tokens. (Where oneDNN has bf16 instructions, such a step multiplies by
    prepacked copies instead: the next test.)"""
    monkeypatch.setattr(DecodeMatmul, "max_rows", max_rows)
    model, ids, kwargs = several_rows_compiled(monkeypatch, dtype, packs=False)
    graphs, recording_backend = graph_recorder()
    compiled = model.generate(ids, cache_implementation="static", compile_config=cpu_compile_config(recording_backend),
                              **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), compiled)
    step = graphs[-1].graph.nodes
    linears = [node for node in step if "linear" in str(node.target)]
    products = 6 * model.config.n_layers + 1  # query, key and value apart, and the head
    attention = [node for node in step if "scaled_dot_product_attention" in str(node.target)]
    summed = dtype == torch.bfloat16 or max_rows >= len(ids)  # `summed_attention`: bf16, or among the sums
    assert len(attention) == (0 if summed else model.config.n_layers)
    sums = products * len(ids) if max_rows >= len(ids) else 0
    sums += 2 * model.config.n_layers if summed else 0  # the scores and the context
    assert sum(node.target == "sum" for node in step) == sums
    assert len(linears) == (0 if max_rows >= len(ids) else products)


@pytest.mark.skipif(not DecodeMatmul.onednn(), reason="oneDNN's prepacked weights need a PyTorch with oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_step_of_several_rows_calls_onednn_on_copies_kept_beside_the_parameters(dtype, monkeypatch,
                                                                                          fresh_dynamo):
    """Where oneDNN has bf16 instructions (forced here), a compiled step of several rows multiplies by oneDNN's
    prepacked weights, as the eager step does: inductor cannot hold them (it would take them as constants), so the
    step calls the operator `prepacked_linear` on the parameters, once per fused product, which keeps the copies
    beside them, shared with the eager layout. They are built once, not per step; after an optimizer step the same
    compiled step follows the new weights (the copies are rebuilt); `fast_decoding = False` frees them. The dynamic
    cache's tokens throughout."""
    model, ids, kwargs = several_rows_compiled(monkeypatch, dtype, packs=True)
    graphs, recording_backend = graph_recorder()

    def dynamic_and_compiled() -> tuple[torch.Tensor, torch.Tensor]:
        return model.generate(ids, **kwargs), model.generate(
            ids, cache_implementation="static", compile_config=cpu_compile_config(recording_backend), **kwargs)

    def kept() -> list:
        return [PREPACKED.get(layers[0].weight) for layers in DecodeLayout.matmul_layers(model)]

    before, compiled = dynamic_and_compiled()
    assert torch.equal(before, compiled)
    step = graphs[-1].graph.nodes
    calls = [node for node in step if str(node.target).endswith(".prepacked_linear")]
    assert len(calls) == 4 * model.config.n_layers + 1  # query/key/value fused, out_proj, both feed-forward, head
    assert not [node for node in step if "linear" in str(node.target) and node not in calls]
    summed = dtype == torch.bfloat16  # fp32 keeps the fused kernel: summing measured within noise (docs/speed.md)
    fused = [node for node in step if "scaled_dot_product_attention" in str(node.target)]
    assert len(fused) == (0 if summed else model.config.n_layers)
    assert sum(node.target == "sum" for node in step) == (2 * model.config.n_layers if summed else 0)
    copies = kept()
    assert all(entry is not None and entry[1].kind in ("prepacked", "widened") for entry in copies)
    assert DecodeLayout(model, len(ids), kind="packed").nbytes() == sum(entry[1].nbytes for entry in copies) > 0
    assert model._decode_layout.matmuls() == [entry[1] for entry in copies]  # the eager steps' copies: one set
    assert torch.equal(dynamic_and_compiled()[1], compiled)
    assert [entry[1] for entry in kept()] == [entry[1] for entry in copies]  # not rebuilt: nothing changed

    optimizer_step(model, ids)
    after, compiled = dynamic_and_compiled()
    assert torch.equal(after, compiled) and not torch.equal(after, before)
    assert len(graphs) == 1  # the same compiled step, on copies rebuilt from the new weights
    assert all(new[1] is not old[1] for new, old in zip(kept(), copies))
    model.fast_decoding = False
    model.generate(ids, **kwargs)
    assert kept() == [None] * len(copies)


def test_a_checkpoints_copy_of_the_decode_engine_registers_an_operator_of_its_own(tmp_path):
    """Loaded as remote code beside the package, a checkpoint's copy of the decode engine registers the prepacked
    operator under its own name, over its own kept copies, which its eager layout shares: one set per model."""
    tiny_model(qkv_bias=True).save_pretrained(tmp_path)
    # the class the folder's auto_map names, from its own files (AutoModelForCausalLM takes the package's registered
    # class where the package is imported, as here; imported the other way round, both copies are loaded)
    remote_class = get_class_from_dynamic_module("modeling_gpt2_scratch.GPT2ScratchForCausalLM", tmp_path)
    model = remote_class.from_pretrained(tmp_path).eval()
    remote = sys.modules[remote_class.__module__.rpartition(".")[0] + ".decoding_gpt2_scratch"]  # the copy's engine
    assert remote is not package and remote.OPERATOR_NAMESPACE != package.OPERATOR_NAMESPACE
    att = model.transformer.trf_blocks[0].att
    layers = [att.W_query, att.W_key, att.W_value]
    weights, biases = DecodeMatmul.parameters_of(layers)
    x = torch.randn(3, layers[0].in_features)
    product = getattr(torch.ops, remote.OPERATOR_NAMESPACE).prepacked_linear(x, weights, biases)
    torch.testing.assert_close(product, torch.cat([layer(x) for layer in layers], dim=-1))
    assert weights[0] in remote.PREPACKED and weights[0] not in PREPACKED
    layout = remote.DecodeLayout(model, rows=3)
    assert layout.blocks[0].qkv is remote.PREPACKED[weights[0]][1]  # the operator's copy, not a second one


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_summed_attention_is_the_fused_kernels_in_float32(dtype, tolerance):
    """A compiled step's attention (one query per row, over the cache, with and without a padding mask): the fused
    kernel's float32 result, in the cache's dtype."""
    torch.manual_seed(0)
    queries, keys, values = (torch.randn(3, 4, n, 16).to(dtype) for n in (1, 10, 10))
    allowed = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    allowed[0, ..., :3] = False
    for mask in (allowed, None):
        expected = F.scaled_dot_product_attention(queries.float(), keys.float(), values.float(), attn_mask=mask)
        summed = DecodeLayout.summed_attention(queries, keys, values, mask)
        assert summed.dtype == dtype
        torch.testing.assert_close(summed.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("one_row_kernel", ["vector", "linear"])
def test_inductor_compiles_the_one_row_step_to_the_same_tokens(one_row_kernel, monkeypatch, fresh_dynamo):
    """The real compiler (inductor's generated C++ for the reductions, or its calls to BLAS: the fast paths
    docs/speed.md measures), on the smallest model: the tokens of the dynamic cache's eager step."""
    measured_one_row_kernel(monkeypatch, one_row_kernel)
    model = tiny_model(n_layers=1, qkv_bias=True)
    randomize_biases(model)
    prompt = left_padded_batch()[0][1:2]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    compiled = model.generate(prompt, cache_implementation="static", compile_config=cpu_compile_config("inductor"),
                              **kwargs)
    assert torch.equal(model.generate(prompt, **kwargs), compiled)


@pytest.mark.parametrize("packs", [False, True])
def test_inductor_compiles_a_step_of_several_rows_to_the_same_tokens(packs, monkeypatch, fresh_dynamo):
    """inductor's loop summing each row over the weights, or its calls to the operator multiplying by oneDNN's
    prepacked copies (a left-padded batch of 3): the dynamic cache's tokens."""
    if packs and not DecodeMatmul.onednn():
        pytest.skip("oneDNN's prepacked weights need a PyTorch with oneDNN")
    monkeypatch.setattr(DecodeLayout, "packs_several_rows", staticmethod(lambda: packs))
    model = tiny_model(n_layers=1, qkv_bias=True)
    randomize_biases(model)
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    static = dict(cache_implementation="static", compile_config=cpu_compile_config("inductor"))
    compiled = model.generate(ids, **static, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), compiled)
    if packs:  # inductor hands the operator the parameters themselves: the copies are kept, not rebuilt each step
        copies = [PREPACKED[layers[0].weight][1] for layers in DecodeLayout.matmul_layers(model)]
        assert torch.equal(model.generate(ids, **static, **kwargs), compiled)
        assert [PREPACKED[layers[0].weight][1] for layers in DecodeLayout.matmul_layers(model)] == copies


def test_a_copy_compiles_a_step_of_its_own(fresh_dynamo):
    """generate() keeps the compiled __call__ on the model (transformers' `get_compiled_call`); a copy made after that
    compiles its own step (sharing the function, as deepcopy does with functions, the copy's compiled steps would run
    the original's weights), and a pickle leaves it behind."""
    model = tiny_model(n_layers=1)
    prompt = left_padded_batch()[0][1:2]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    static = dict(cache_implementation="static", compile_config=cpu_compile_config("eager"))
    original = model.generate(prompt, **kwargs, **static)
    twin = copy.deepcopy(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.normal_(std=0.5)
    expected = twin.generate(prompt, **kwargs)
    assert not torch.equal(expected, original)
    assert torch.equal(twin.generate(prompt, **kwargs, **static), expected)
    assert twin._compiled_call is not model._compiled_call
    assert not hasattr(pickle.loads(pickle.dumps(model)), "_compiled_call")  # a compiled function does not pickle


def test_masks_are_built_per_call_not_stored_per_block():
    """The seed's per-block (context × context) buffers are gone: a huge context_length allocates no mask."""
    model = GPT2ScratchForCausalLM(tiny_config(context_length=100_000, n_layers=1)).eval()
    assert not any("mask" in name for name, _ in model.named_buffers())
    assert not any(name.endswith(".mask") for name in model.state_dict())
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
        step = model.transformer.mask_for(None, cache, torch.tensor([5]))
    assert step is None  # sdpa, no padding, one new token: no mask at all
    model.config._attn_implementation = "eager"
    assert model.transformer.mask_for(None, None, torch.arange(9)).shape == (1, 1, 9, 9)  # queries × keys, once


def generate_both_ways(model: GPT2ScratchForCausalLM, rows: int = 3, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The same generate() call through the decode layout (first: a stale one must be rebuilt by generate() itself)
    and through the readable modules alone; the layout generate() used stays on the model."""
    ids, mask = left_padded_batch(max(rows, 3))
    kwargs = dict(attention_mask=mask[:rows], max_new_tokens=12, do_sample=False, pad_token_id=0, **kwargs)
    fast = model.generate(ids[:rows], **kwargs)
    layout = model._decode_layout
    model.fast_decoding = False  # also drops the layout
    plain = model.generate(ids[:rows], **kwargs)
    assert model._decode_layout is None
    model.fast_decoding, model._decode_layout = True, layout
    return fast, plain


@pytest.mark.parametrize(("rows", "kind", "one_row_kernel"), [
    (1, "vector", "vector"), (1, "vector", "linear"), (1, "vector", "transposed"), (3, "prepacked", None),
    (6, "prepacked", None),
])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_decode_layout_generates_the_plain_tokens(qkv_bias, rows, kind, one_row_kernel, monkeypatch):
    # one fp32 row goes through whichever kernel measured faster here: each is held to the plain tokens
    measured_one_row_kernel(monkeypatch, one_row_kernel)
    model = tiny_model(qkv_bias=qkv_bias)
    randomize_biases(model)
    fast, plain = generate_both_ways(model, rows)
    assert torch.equal(fast, plain)
    built = model._decode_layout  # built by generate() for its batch
    # several fp32 rows go through oneDNN's prepacked weights wherever PyTorch has oneDNN (x86 and ARM builds)
    onednn = torch.backends.mkldnn.is_available()
    expected = one_row_kernel if rows == 1 and (onednn or one_row_kernel != "vector") else kind if onednn else "linear"
    assert built is not None and built.kind == kind
    assert all(m.kind == expected for m in built.matmuls())
    assert model.decode_layout(rows) is built  # reused while current
    with torch.no_grad():  # outside generate() every forward runs the readable modules
        logits = model(fast).logits
    model.fast_decoding = False
    with torch.no_grad():
        assert torch.equal(logits, model(fast).logits)


def one_row_kind_of_call(function, args) -> str:
    """Which one-row kernel a call is: F.linear, or oneDNN's linear on float32 weights as they are or on a transposed
    copy, or on prepacked bfloat16 weights."""
    if function == "linear":
        return "linear"
    if args[1].dtype == torch.bfloat16:
        return "prepacked"
    return "vector" if args[1].is_contiguous() else "transposed"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's kernel is one of the candidates")
@pytest.mark.parametrize(("dtype", "fastest"), [(dtype, kind) for dtype, kinds in DecodeLayout.one_row_kinds.items()
                                                for kind in kinds])
def test_one_row_takes_the_kernel_measured_fastest(dtype, fastest, monkeypatch):
    """Which one-row kernel is fastest depends on the CPU and the weight's shape, so the layout measures: on a clock
    that charges the others 10 ms a call (`DecodeLayout.clock`: the choice's logic without real timing), each kernel
    wins in turn, for every shape; the verdict is kept for the process (a new layout does not measure again).
    bfloat16 chooses between BLAS and oneDNN's prepacked weights where the CPU has bf16 instructions (elsewhere BLAS
    alone: `test_a_bf16_prompt_is_multiplied_widened_where_bf16_is_emulated`). How fast each kernel really is on this
    CPU is benchmarks/bench_generate.py's to measure."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no bf16 instructions: one bf16 row always goes through BLAS")
    monkeypatch.setattr(DecodeLayout, "one_row_kernels", {})
    calls, charged = [], [0.0]
    monkeypatch.setattr(DecodeLayout, "clock", staticmethod(lambda: charged[0]))

    def held_back(owner, name):
        kernel = getattr(owner, name)

        def slower_unless_fastest(*args):
            charged[0] += 1e-6  # every call takes some time
            if one_row_kind_of_call(name, args) != fastest:
                calls.append(1)
                charged[0] += 0.01
            return kernel(*args)
        monkeypatch.setattr(owner, name, slower_unless_fastest)

    held_back(torch.ops.mkldnn, "_linear_pointwise")
    held_back(torch.nn.functional, "linear")
    model = tiny_model().to(dtype)
    layout = model.decode_layout(1)
    [verdict] = DecodeLayout.one_row_kernels.values()
    assert set(verdict.values()) == {fastest} and len(verdict) == 5  # QKV, out_proj, the two FeedForward, the head
    assert all(m.kind == fastest for m in layout.matmuls())
    config, size = model.config, dtype.itemsize
    qkv = config.n_layers * 3 * config.emb_dim**2 * size  # the fused query/key/value copy
    every_weight = sum(layer.weight.numel() * size for group in DecodeLayout.matmul_layers(model) for layer in group)
    assert layout.nbytes() == (every_weight if fastest in ("transposed", "prepacked") else qkv)
    calls.clear()
    assert all(m.kind == fastest for m in DecodeLayout(tiny_model().to(dtype), 1).matmuls()) and not calls


def test_a_one_row_kernel_that_needs_a_copy_must_be_clearly_faster():
    """A transposed copy costs memory: within `copy_margin` of a kernel on the weights as they are, it loses."""
    nbytes = {"vector": 0, "linear": 0, "transposed": 100}
    margin = DecodeLayout.copy_margin
    assert DecodeLayout.pick_one_row_kernel({"vector": 1.0, "linear": 1.2, "transposed": 1.01 / margin},
                                            nbytes) == "vector"
    assert DecodeLayout.pick_one_row_kernel({"vector": 1.0, "linear": 1.2, "transposed": 0.99 / margin}, nbytes) \
        == "transposed"
    assert DecodeLayout.pick_one_row_kernel({"vector": 1.0, "linear": 0.9, "transposed": 0.85}, nbytes) == "linear"
    # where every kind holds a copy (fused query/key/value), the fastest wins outright
    assert DecodeLayout.pick_one_row_kernel({"vector": 1.0, "linear": 1.2, "transposed": 0.95},
                                            dict.fromkeys(nbytes, 100)) == "transposed"


def test_measuring_the_one_row_kernels_leaves_the_global_random_state_alone(monkeypatch):
    """The first generate() of a process measures its kernels; a seeded sampling run must draw the same either way."""
    monkeypatch.setattr(DecodeLayout, "one_row_kernels", {})
    groups = DecodeLayout.matmul_layers(tiny_model())
    torch.manual_seed(0)
    DecodeLayout.fastest_one_row_matmuls(groups, torch.float32)
    drawn = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(4))


def test_decode_layout_in_bfloat16_gives_the_plain_logits():
    """bf16: fused query/key/value everywhere; for several rows oneDNN's prepacked bf16 linear where the CPU has bf16
    instructions, else its float32 one on widened weights (either may sum in another order: the logits agree to
    bf16's precision, not bit for bit)."""
    model = randomised(tiny_model()).to(torch.bfloat16)
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    fast = model.generate(ids, **kwargs).logits[0]
    layout = model._decode_layout
    several = ("prepacked" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "widened") if DecodeMatmul.onednn() \
        else "linear"
    assert {matmul.kind for matmul in layout.matmuls()} == {several}
    if several == "widened":  # a float32 copy of every matmul weight, the tied head included
        weights = [layer.weight for group in DecodeLayout.matmul_layers(model) for layer in group]
        assert layout.nbytes() >= sum(w.numel() * 4 for w in weights)
        assert all(matmul.weight.dtype == torch.float32 for matmul in layout.matmuls())
    model.fast_decoding = False
    plain = model.generate(ids, **kwargs).logits[0]
    assert plain.float().std() > 1.0  # logits of real spread: a block's attention left out moves them by several units
    torch.testing.assert_close(fast.float(), plain.float(), atol=0.15, rtol=0)


def test_a_bf16_prompt_is_multiplied_widened_where_bf16_is_emulated():
    """On a CPU without bf16 instructions the one-row layout in bf16 multiplies by F.linear ("linear"; with them,
    whichever of it and oneDNN's prepacked weights measures faster). There, where each row of an emulated bf16 matmul
    costs a matrix-vector product, a prompt of `widened_rows` rows or more is multiplied in float32 on weights
    widened for that call (the float32 product, rounded); fewer rows, and every row on a CPU with bf16 instructions,
    in bf16. generate() from such a prompt gives the plain modules' logits."""

    class LinearDtypes(torch.overrides.TorchFunctionMode):  # the dtype each F.linear call multiplies in
        def __init__(self) -> None:
            super().__init__()
            self.dtypes = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                self.dtypes.append(args[1].dtype)
            return func(*args, **(kwargs or {}))

    model = randomised(tiny_model()).to(torch.bfloat16)
    emulated = not (DecodeMatmul.onednn() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    layout = model.decode_layout(1)
    kinds = {(matmul.kind, matmul.emulated_bf16) for matmul in layout.matmuls()}
    assert kinds == {("linear", True)} if emulated else kinds <= {("linear", False), ("prepacked", False)}
    matmul = DecodeMatmul([model.transformer.trf_blocks[0].ff.layers[0]], "linear")
    torch.manual_seed(3)
    prompt = torch.randn(1, DecodeMatmul.widened_rows, matmul.in_features).bfloat16()
    with LinearDtypes() as calls:
        product, fewer = matmul(prompt), matmul(prompt[:, 1:])
    assert calls.dtypes == [torch.float32 if emulated else torch.bfloat16, torch.bfloat16]
    assert product.dtype == fewer.dtype == torch.bfloat16
    torch.testing.assert_close(product, F.linear(prompt.float(), matmul.weight.float(), matmul.bias.float()).bfloat16())
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    kwargs = dict(max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
    fast = model.generate(ids, **kwargs).logits[0]
    model.fast_decoding = False
    plain = model.generate(ids, **kwargs).logits[0]
    assert plain.float().std() > 1.0
    torch.testing.assert_close(fast.float(), plain.float(), atol=0.15, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_decode_layout_appends_keys_in_place_with_the_plain_tokens(search, monkeypatch):
    """The layout's cache layers write each step's keys/values into spare room (grown every 5 tokens here, so
    every search regrows several times; beam search reorders rows every step): the same tokens as the readable
    modules, which keep transformers' DynamicCache as it is."""
    monkeypatch.setattr(GrowingLayer, "room", 5)
    model = tiny_model()
    outputs, caches = [], []
    for fast_decoding in (True, False):
        model.fast_decoding = fast_decoding
        torch.manual_seed(2)
        ids, mask = left_padded_batch()
        result = model.generate(ids, attention_mask=mask, max_new_tokens=17, pad_token_id=0,
                                return_dict_in_generate=True, **SEARCHES[search])
        outputs.append(result.sequences)
        caches.append(result.cache)
    assert torch.equal(outputs[0], outputs[1])
    assert {type(layer) for layer in caches[0].layers} == {GrowingLayer}
    assert {type(layer) for layer in caches[1].layers} == {DynamicLayer}
    for grown, plain in zip(caches[0].layers, caches[1].layers):  # oneDNN's fused matmul may round differently
        torch.testing.assert_close(grown.keys, plain.keys)
        torch.testing.assert_close(grown.values, plain.values)
        assert grown.keys.shape[-2] < grown.storage[0].shape[-2] <= grown.keys.shape[-2] + 5


def test_growing_layer_never_writes_into_what_it_returned():
    """Step by step against DynamicLayer, through reorder, crop and batch selection (each replaces the keys, which
    the next update copies into new storage); every tensor handed out keeps its values."""
    torch.manual_seed(0)
    grown, plain = GrowingLayer(), DynamicLayer()
    handed_out, batch = [], 4
    for step in range(9):
        new_tokens = 3 if step == 0 else 1
        keys, values = torch.randn(batch, 2, new_tokens, 8), torch.randn(batch, 2, new_tokens, 8)
        got, want = grown.update(keys, values), plain.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        handed_out.append((got, [t.clone() for t in got]))
        for layer in (grown, plain):
            if step == 3:
                layer.reorder_cache(torch.tensor([2, 0, 1, 1]))
            if step == 5:
                layer.crop(-2)
            if step == 7:
                layer.batch_select_indices(torch.tensor([0, 3]))
        batch = grown.keys.shape[0]
        assert grown.get_seq_length() == plain.get_seq_length()
    assert all(torch.equal(t, copy) for tensors, copies in handed_out for t, copy in zip(tensors, copies))
    cache = DynamicCache()  # layers added lazily, one per block: the layout's grow lazily too
    GrowingLayer.grow_in_place(cache)
    cache.update(torch.ones(1, 2, 1, 8), torch.ones(1, 2, 1, 8), 0)
    assert type(cache.layers[0]) is GrowingLayer


@pytest.mark.parametrize(("rows", "one_row_kernel"), [(3, None), (1, "transposed")])
def test_decode_layout_is_never_saved_and_follows_every_weight_change(rows, one_row_kernel, tmp_path, monkeypatch):
    """Several rows (oneDNN's prepacked copies) and one row through transposed copies of every weight."""
    if one_row_kernel:
        measured_one_row_kernel(monkeypatch, one_row_kernel)
    model = tiny_model()
    keys = set(model.state_dict())
    before, _ = generate_both_ways(model, rows)
    built = model._decode_layout
    assert set(model.state_dict()) == keys  # nothing derived joins the weights
    model.save_pretrained(tmp_path)
    assert set(GPT2ScratchForCausalLM.from_pretrained(tmp_path).state_dict()) == keys
    twin = copy.deepcopy(model)  # oneDNN's packed weights have no storage to copy: copies leave the layout behind
    assert twin._decode_layout is None and pickle.loads(pickle.dumps(model))._decode_layout is None
    assert torch.equal(twin.generate(before[:, :7], max_new_tokens=12, do_sample=False, pad_token_id=0), before)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids, _ = left_padded_batch()
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # in place: every parameter's version counter moves
    model.eval()
    assert not built.fits(model, rows) and model._decode_layout is built
    after, plain = generate_both_ways(model, rows)
    assert torch.equal(after, plain) and not torch.equal(after, before)
    rebuilt = model._decode_layout
    assert rebuilt is not built and rebuilt.fits(model, rows)

    with torch.no_grad():
        bias = model.transformer.trf_blocks[1].ff.layers[2].bias  # one tensor, edited by hand
        bias.add_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(3)) * 5)
    assert not rebuilt.fits(model, rows)
    edited, plain = generate_both_ways(model, rows)
    assert torch.equal(edited, plain) and not torch.equal(edited, after)
    assert model._decode_layout is not rebuilt


def test_decode_layout_steps_aside_for_peft_and_gradients():
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["W_query", "W_value"], lora_dropout=0.0))
    assert model.decode_layout() is None  # a LoRA-wrapped layer is not a plain nn.Linear: no copies to go stale
    ids, mask = left_padded_batch()
    out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 11)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_gpu_check_refuses_in_one_line_without_cuda():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "needs a CUDA GPU" in result.stderr and len(result.stderr.strip().splitlines()) == 1
