"""`output_attentions=True`: the eager path's weights, equal to transformers' GPT-2 after conversion."""

from __future__ import annotations

import pytest
import torch
from conftest import stock_gpt2, tiny_config
from transformers import GPT2LMHeadModel
from transformers.testing_utils import CaptureLogger

from gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchForSequenceClassification
from gpt2_scratch import modeling_gpt2_scratch as modeling
from gpt2_scratch.convert import from_hf


def eager_stock_and_ours(**shape) -> tuple[GPT2LMHeadModel, GPT2ScratchForCausalLM]:
    stock = stock_gpt2(**shape)
    eager = GPT2LMHeadModel._from_config(stock.config, attn_implementation="eager").eval()
    eager.load_state_dict(stock.state_dict())
    ours = from_hf(stock)
    ours.config._attn_implementation = "eager"
    return eager, ours


@pytest.mark.parametrize("shape", [dict(), dict(n_embd=64, n_layer=3, n_head=2)])
def test_attentions_equal_stock_gpt2_after_conversion(shape):
    stock, ours = eager_stock_and_ours(**shape)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        expected = stock(ids, output_attentions=True).attentions
        got = ours(ids, output_attentions=True).attentions
    assert len(got) == ours.config.n_layers
    for layer, (a, b) in enumerate(zip(expected, got)):
        assert b.shape == (2, ours.config.n_heads, 12, 12), layer
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert torch.all(torch.triu(got[0], diagonal=1) == 0)  # nothing from the future
    torch.testing.assert_close(got[0].sum(-1), torch.ones(2, ours.config.n_heads, 12))


def test_attentions_with_padding_and_cache_equal_stock_gpt2():
    stock, ours = eager_stock_and_ours()
    ids = torch.randint(0, 320, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
        got = ours(ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
        for a, b in zip(expected, got):
            torch.testing.assert_close(b[0], a[0], atol=1e-6, rtol=0)
            # A padding query's row is never used; the real tokens' rows must agree and give padding no weight.
            torch.testing.assert_close(b[1, :, 3:], a[1, :, 3:], atol=1e-6, rtol=0)
            assert torch.all(b[1, :, 3:, :3] == 0)
        # generate() hands the per-step attentions back, one new query row against every cached key
        stock_out = stock.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, output_attentions=True,
                                   return_dict_in_generate=True)
        our_out = ours.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, output_attentions=True,
                                return_dict_in_generate=True)
    assert [step[0].shape[-2:] for step in our_out.attentions] == [(4, 4), (1, 5), (1, 6)]
    for stock_step, our_step in zip(stock_out.attentions, our_out.attentions):
        for a, b in zip(stock_step, our_step):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_sdpa_model_falls_back_to_eager_once_with_a_warning():
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(tiny_config()).eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 320, (1, 7))
    modeling.logger.warning_once.cache_clear()
    with torch.no_grad(), CaptureLogger(modeling.logger) as captured:
        fused = model(ids)
        out = model(ids, output_attentions=True)
    assert captured.out.strip() == ("output_attentions=True: attn_implementation 'sdpa' has no attention weights, so "
                                    "this forward runs the eager path; load with attn_implementation='eager' to "
                                    "silence this")
    assert fused.attentions is None
    torch.testing.assert_close(out.logits, fused.logits, atol=1e-5, rtol=0)
    model.set_attn_implementation("eager")  # transformers' switch works: attention reads the choice at every call
    assert model.config._attn_implementation == "eager"
    with torch.no_grad(), CaptureLogger(modeling.logger) as quiet:
        modeling.logger.warning_once.cache_clear()
        eager = model(ids, output_attentions=True).attentions
    assert quiet.out == ""
    for a, b in zip(eager, out.attentions):
        torch.testing.assert_close(b, a)


def test_config_default_and_tuple_output_and_classifier():
    torch.manual_seed(0)
    config = tiny_config(output_attentions=True)
    config._attn_implementation = "eager"
    ids = torch.randint(0, 320, (1, 5))
    model = GPT2ScratchForCausalLM(config).eval()
    with torch.no_grad():
        assert len(model(ids).attentions) == config.n_layers
        assert model(ids, output_attentions=False).attentions is None
        as_tuple = model(ids, use_cache=False, return_dict=False)
    assert len(as_tuple) == 2 and len(as_tuple[1]) == config.n_layers  # (logits, attentions)
    classifier = GPT2ScratchForSequenceClassification(tiny_config(num_labels=2)).eval()
    with torch.no_grad():
        assert classifier(ids, output_attentions=True).attentions[0].shape == (1, config.n_heads, 5, 5)
