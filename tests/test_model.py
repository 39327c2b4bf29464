"""The hand-written blocks and the model's behaviour: attention paths, cache, masks, heads, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import AttentionCalls, randomised, tiny_config
from transformers.modeling_outputs import BaseModelOutputWithPast

from gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchForSequenceClassification
from gpt2_scratch.modeling_gpt2_scratch import GELU, LayerNorm, causal_mask


def model_for(impl: str = "sdpa", seed: int = 0, **overrides) -> GPT2ScratchForCausalLM:
    torch.manual_seed(seed)
    model = GPT2ScratchForCausalLM(tiny_config(**overrides)).eval()
    model.config._attn_implementation = impl
    return model


def test_gelu_is_the_tanh_formula():
    x = torch.linspace(-6, 6, 1001)
    formula = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(GELU()(x), formula, atol=1e-6, rtol=0)


def test_layernorm_is_the_textbook_formula():
    torch.manual_seed(0)
    norm = LayerNorm(16)
    with torch.no_grad():
        norm.scale.normal_()
        norm.shift.normal_()
    x = torch.randn(3, 5, 16) * 4 + 2
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.scale + norm.shift
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_eager_and_sdpa_agree(padded):
    eager, sdpa = model_for("eager"), model_for("sdpa")
    ids = torch.randint(0, 320, (3, 20))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0  # left padding
        mask[1, -4:] = 0  # right padding
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=0)


def test_eager_and_sdpa_gradients_agree():
    eager, sdpa = model_for("eager").train(), model_for("sdpa").train()
    ids = torch.randint(0, 320, (2, 16))
    for model in (eager, sdpa):
        model(ids, labels=ids).loss.backward()
    for (name, p), q in zip(eager.named_parameters(), sdpa.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_under_cpu_bf16_autocast_attends_in_float32():
    """Under bf16 autocast the projections are bfloat16; attention itself runs in float32 (the fused CPU kernel is
    slow backwards in bfloat16) and hands bfloat16 back. Same result as float32 attention of the bf16 projections."""
    torch.manual_seed(0)
    attention = model_for("sdpa").transformer.trf_blocks[0].att
    q, k, v = (torch.randn(2, 4, 12, 16).bfloat16().requires_grad_() for _ in range(3))
    padded = causal_mask(torch.arange(12), 12, torch.arange(12).expand(2, 12) >= torch.tensor([[0], [5]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context = attention.sdpa_attention(q, k, v, None)
        masked = attention.sdpa_attention(q, k, v, padded)
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    assert context.dtype == torch.bfloat16
    torch.testing.assert_close(context.float(), expected.bfloat16().float(), atol=0, rtol=0)
    expected = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=padded)
    torch.testing.assert_close(masked.float(), expected.bfloat16().float(), atol=0, rtol=0)
    context.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_bf16_autocast_training_step_tracks_float32():
    """On randomised weights the bf16 loss is within 4e-4 of the float32 one (logits within 0.04 of a spread of
    1.1); leaving the blocks out moves the loss by 0.36, so a bf16 path that lost them would fail."""
    model = randomised(model_for("sdpa").train())
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    full = model(ids, labels=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(ids, labels=ids)
    assert mixed.loss.dtype == torch.float32 and mixed.logits.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.loss, full.loss, atol=5e-3, rtol=0)
    torch.testing.assert_close(mixed.logits.float(), full.logits, atol=0.1, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_causal_future_tokens_do_not_change_the_past(impl):
    model = model_for(impl)
    ids = torch.randint(0, 320, (1, 24))
    changed = ids.clone()
    changed[0, 12:] = torch.randint(0, 320, (12,))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :12], model(changed).logits[:, :12])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_incremental_decoding_matches_full_forward(impl):
    model = model_for(impl)
    ids = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        pieces = [out.logits]
        # a chunk of several tokens with a cache, then single tokens
        out = model(ids[:, 10:17], cache=out.cache, use_cache=True)
        pieces.append(out.logits)
        for t in range(17, 30):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            pieces.append(out.logits)
    assert out.cache.get_seq_length() == 30
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padded_batch_matches_each_prompt_alone(impl):
    model = model_for(impl)
    short, long = torch.randint(0, 320, (1, 6)), torch.randint(0, 320, (1, 11))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        alone = model.generate(short, max_new_tokens=8, do_sample=False)
    assert torch.equal(together[0, 5:], alone[0])


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = model_for()
    ids = torch.randint(0, 320, (2, 12))
    labels = ids.clone()
    labels[0, 3:6] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 320), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    counted = int((labels[:, 1:] != -100).sum())
    summed = model(ids, labels=labels, num_items_in_batch=counted * 2).loss
    torch.testing.assert_close(summed, expected / 2)


def test_logits_to_keep_returns_the_last_positions():
    model = model_for()
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, model(ids).logits[:, -1:])


def test_return_dict_false_gives_a_tuple():
    model = model_for()
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        logits = model(ids, use_cache=False, return_dict=False)[0]
    torch.testing.assert_close(logits, model(ids).logits)


def test_hidden_states_are_returned_on_request():
    model = model_for()
    out = model(torch.randint(0, 320, (1, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layers + 1


def test_embeddings_are_tied():
    model = model_for()
    assert model.out_head.weight is model.transformer.tok_emb.weight
    untied = model_for(tie_word_embeddings=False)
    assert untied.out_head.weight is not untied.transformer.tok_emb.weight


def test_init_follows_gpt2():
    torch.manual_seed(0)
    config = tiny_config(emb_dim=256, n_heads=4, n_layers=8)
    model = GPT2ScratchForCausalLM(config)
    block = model.transformer.trf_blocks[0]
    assert abs(block.att.W_query.weight.std().item() - 0.02) < 0.002
    residual_std = 0.02 / math.sqrt(2 * 8)  # 2 residual writes a block; sqrt(3 * 8) would be 18% smaller
    assert abs(block.att.out_proj.weight.std().item() - residual_std) < 0.05 * residual_std
    assert abs(block.ff.layers[2].weight.std().item() - residual_std) < 0.05 * residual_std
    assert torch.all(block.att.out_proj.bias == 0) and torch.all(block.norm1.scale == 1)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 320, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = model_for().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_torch_compile_gives_the_same_logits():
    model = model_for()
    ids = torch.randint(0, 320, (2, 16))
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_too_long_input_names_both_numbers():
    model = model_for()
    with pytest.raises(ValueError, match=r"65 tokens.*context_length is 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    out = model(torch.zeros(1, 60, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match=r"66 tokens long \(60 cached \+ 6 new\)"):
        model(torch.zeros(1, 6, dtype=torch.long), cache=out.cache)


def test_out_of_vocabulary_id_is_reported():
    model = model_for()
    with pytest.raises(ValueError, match=r"token id 320 is outside .*vocab_size=320"):
        model(torch.tensor([[1, 2, 320]]))
    with pytest.raises(ValueError, match=r"token id -1"):
        model(torch.tensor([[1, -1]]))


def classifier(num_labels: int = 3, **overrides) -> GPT2ScratchForSequenceClassification:
    torch.manual_seed(0)
    config = tiny_config(num_labels=num_labels, pad_token_id=0, **overrides)
    return GPT2ScratchForSequenceClassification(config).eval()


def test_classifier_pools_the_last_real_token_for_any_padding():
    model = classifier()
    text = torch.randint(1, 320, (1, 9))
    pad = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        alone = model(text).logits
        right = model(torch.cat([text, pad], 1), attention_mask=torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], 1))
        left = model(torch.cat([pad, text], 1), attention_mask=torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], 1))
        by_pad_id = model(torch.cat([text, pad], 1))  # no mask: the pad id marks the padding
    for out in (right, left, by_pad_id):
        torch.testing.assert_close(out.logits, alone, atol=1e-5, rtol=0)


def test_classifier_losses_follow_problem_type():
    ids = torch.randint(1, 320, (4, 7))
    model = classifier(3)
    labels = torch.tensor([0, 2, 1, 2])
    out = model(ids, labels=labels)
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))

    multi = classifier(3)
    targets = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])
    out = multi(ids, labels=targets)
    assert multi.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))

    regression = classifier(1)
    values = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = regression(ids, labels=values)
    assert regression.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), values))


# The tests below were written against mutants `make mutation` found alive (docs/testing.md).


def test_layernorm_is_torchs_with_gpt2s_epsilon_or_the_one_given():
    x = torch.randn(2, 3, 16) * 1e-2  # a spread this small shows the epsilon (its variance is 1e-4)
    torch.testing.assert_close(LayerNorm(16)(x), F.layer_norm(x, (16,), eps=1e-5), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(LayerNorm(16, eps=0.25)(x), F.layer_norm(x, (16,), eps=0.25), atol=1e-6, rtol=1e-4)
    model = model_for(layer_norm_epsilon=0.25)
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert len(norms) == 2 * model.config.n_layers + 1 and all(n.eps == 0.25 for n in norms)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dropout_is_off_in_evaluation(impl):
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model_for(impl, drop_rate=0.3)(ids).logits, model_for(impl)(ids).logits)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_of_two_tokens_the_first_never_sees_the_second(impl):
    model = model_for(impl)
    ids = torch.randint(0, 320, (3, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :1], model(ids[:, :1]).logits, atol=1e-6, rtol=0)


def test_input_errors_are_one_whole_sentence():
    model = model_for()
    ids = torch.randint(0, 320, (1, 5))
    vocabulary = ("token id 320 is outside this model's vocabulary (vocab_size=320, valid ids 0..319); was the input "
                  "encoded with a different tokenizer?")
    cases = [
        (dict(input_ids=torch.zeros(1, 65, dtype=torch.long)), "input is 65 tokens long (0 cached + 65 new) but this "
         "model's context_length is 64; truncate the input or use a model with a longer context"),
        (dict(input_ids=torch.tensor([[1, 2, 320]])), vocabulary),
        (dict(input_ids=torch.tensor([[320]])), vocabulary),
        (dict(), "pass exactly one of input_ids or inputs_embeds"),
        (dict(input_ids=ids, attention_mask=torch.ones(1, 1, 5)), "attention_mask must be 2-D (batch, keys) of 0/1, "
         "or 4-D (batch, 1, queries, keys) of booleans, got shape (1, 1, 5)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            model(**kwargs)


def test_exactly_context_length_tokens_fit_with_and_without_a_cache_and_none_is_fine_too():
    model = model_for()
    ids = torch.randint(0, 320, (1, 64))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :60])
        rest = model(ids[:, 60:], cache=first.cache).logits
        assert model(ids[:, :0]).logits.shape == (1, 0, 320)
    torch.testing.assert_close(rest, full[:, 60:], atol=1e-5, rtol=0)


def test_a_cache_is_returned_exactly_when_asked_for():
    model = model_for()
    ids = torch.randint(0, 320, (1, 6))
    assert model(ids, use_cache=False).cache is None and model(ids).cache is not None  # the config says use_cache
    model.train()
    assert model(ids, use_cache=True).cache is not None
    model.gradient_checkpointing_enable()
    assert model(ids, use_cache=True).cache is None  # recomputing a block would append its keys twice


def test_inputs_embeds_give_the_logits_of_their_ids():
    model = model_for()
    ids = torch.randint(0, 320, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.transformer.tok_emb(ids)).logits, model(ids).logits)


def test_hidden_states_are_each_blocks_input_then_the_normed_output():
    base = model_for().transformer
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        out = base(ids, output_hidden_states=True)
        states = out.hidden_states
        torch.testing.assert_close(states[0], base.tok_emb(ids) + base.pos_emb(torch.arange(5))[None])
        for block, before, after in zip(base.trf_blocks, states, states[1:-1]):
            torch.testing.assert_close(block(before, None, None)[0], after)
        torch.testing.assert_close(states[-1], out.last_hidden_state)
        assert base(ids).hidden_states is None


def test_the_base_model_returns_a_tuple_only_when_asked():
    base = model_for().transformer
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        plain, asked, tuple_ = base(ids), base(ids, return_dict=True), base(ids, return_dict=False)
    assert isinstance(plain, BaseModelOutputWithPast) and isinstance(asked, BaseModelOutputWithPast)
    assert isinstance(tuple_, tuple) and torch.equal(tuple_[0], plain.last_hidden_state)


def test_attention_and_vocabulary_can_be_changed_as_on_any_transformers_model():
    model = model_for("sdpa")
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    model.resize_token_embeddings(400)
    assert model.get_input_embeddings().num_embeddings == 400
    assert model.out_head.weight is model.transformer.tok_emb.weight
    assert model(torch.tensor([[399, 1, 2]])).logits.shape == (1, 3, 400)


def test_classifier_pools_each_rows_own_last_token():
    model = classifier()
    a, b = torch.randint(1, 320, (1, 9)), torch.randint(1, 320, (1, 5))
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
    with torch.no_grad():
        expected = torch.cat([model(a).logits, model(b).logits])
        by_mask = model(batch, attention_mask=(batch != 0).long()).logits
        by_pad_id = model(batch).logits
        by_embeds = model(inputs_embeds=model.transformer.tok_emb(a)).logits
    torch.testing.assert_close(by_mask, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_pad_id, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_embeds, expected[:1], atol=1e-5, rtol=0)


def test_classifier_without_a_pad_token_or_mask_pools_the_last_position():
    torch.manual_seed(0)
    model = GPT2ScratchForSequenceClassification(tiny_config(num_labels=3)).eval()
    assert model.config.pad_token_id is None and model.num_labels == 3 and model.score.bias is None
    ids = torch.randint(0, 320, (3, 7))
    with torch.no_grad():
        expected = model.score(model.transformer(ids).last_hidden_state[:, -1])
        torch.testing.assert_close(model(ids).logits, expected)


def test_the_eager_choice_never_calls_the_fused_kernel_and_weights_come_only_when_asked():
    model = model_for("eager")
    attention = model.transformer.trf_blocks[0].att
    x, allowed = torch.randn(1, 5, 48), causal_mask(torch.arange(5), 5, None)
    with torch.no_grad(), AttentionCalls() as calls:
        model(torch.randint(0, 320, (1, 5)))
        assert attention(x, allowed)[1] is None
        assert attention(x, allowed, None, True)[1].shape == (1, 4, 5, 5)
    assert calls.calls == []


def test_plain_causal_calls_leave_the_mask_to_the_fused_kernel():
    """No explicit mask where the kernel's own causal pattern is exact (what flash attention needs): an all-ones
    attention_mask, and one new token after a cache."""
    model = model_for("sdpa")
    ids = torch.randint(0, 320, (2, 6))
    with torch.no_grad(), AttentionCalls() as calls:
        out = model(ids, attention_mask=torch.ones(2, 6))
        model(ids[:, :1], attention_mask=torch.ones(2, 7), cache=out.cache)
    assert [(c["attn_mask"], c["is_causal"]) for c in calls.calls] == [(None, True)] * 2 + [(None, False)] * 2


def test_a_padding_mask_shorter_than_the_keys_is_extended_as_blocked_future():
    """A static cache has more key slots than tokens seen; the padding mask covers the tokens seen."""
    allowed = causal_mask(torch.arange(2), 4, torch.tensor([[1, 1]] * 5))
    expected = torch.tensor([[True, False, False, False], [True, True, False, False]])
    assert allowed.shape == (5, 1, 2, 4) and torch.equal(allowed, expected.expand(5, 1, 2, 4))
