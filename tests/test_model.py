"""The hand-written blocks and the model's behaviour: attention paths, cache, masks, heads, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomised, tiny_config

from gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchForSequenceClassification
from gpt2_scratch.modeling_gpt2_scratch import GELU, LayerNorm


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
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context = attention.sdpa_attention(q, k, v, None)
    expected = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float(),
                                              is_causal=True)
    assert context.dtype == torch.bfloat16
    torch.testing.assert_close(context.float(), expected.bfloat16().float(), atol=0, rtol=0)
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
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert abs(block.att.out_proj.weight.std().item() - residual_std) < 0.001
    assert abs(block.ff.layers[2].weight.std().item() - residual_std) < 0.001
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
