"""Stock GPT-2 ⇄ gpt2_scratch: logits, generation and state dicts agree exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import openai_style_folder, stock_gpt2, tiny_config
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.cli import main as cli
from gpt2_scratch.convert import from_hf, to_hf

SHAPES = [
    dict(n_embd=48, n_layer=2, n_head=4),
    dict(n_embd=64, n_layer=3, n_head=2, vocab_size=500, n_positions=96),
    dict(n_embd=96, n_layer=1, n_head=12, tie_word_embeddings=False),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_logits_and_greedy_generation_match_stock_gpt2(shape, impl, qkv_bias):
    stock = stock_gpt2(qkv_bias=qkv_bias, **shape)
    ours = from_hf(stock)
    ours.config._attn_implementation = impl
    assert ours.config.qkv_bias == qkv_bias  # all-zero biases convert to none
    ids = torch.randint(0, stock.config.vocab_size, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)
        expected = stock.generate(ids[:1, :6], max_new_tokens=32, min_new_tokens=32, do_sample=False)
        got = ours.generate(ids[:1, :6], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_round_trip_gives_the_original_state_dict(shape, qkv_bias):
    stock = stock_gpt2(qkv_bias=qkv_bias, **shape)
    back = to_hf(from_hf(stock))
    original, converted = stock.state_dict(), back.state_dict()
    assert original.keys() == converted.keys()
    for key in original:
        assert torch.equal(original[key], converted[key]), key


def test_model_without_qkv_bias_round_trips_through_stock_format():
    torch.manual_seed(0)
    ours = GPT2ScratchForCausalLM(tiny_config(qkv_bias=False)).eval()
    stock = to_hf(ours)
    ids = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    again = from_hf(stock)
    assert not again.config.qkv_bias
    assert ours.state_dict().keys() == again.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_sampling_and_beam_search_match_stock_gpt2():
    stock = stock_gpt2()
    ours = from_hf(stock)
    prompt = torch.randint(0, 320, (2, 5))
    for kwargs in (
        dict(do_sample=True, top_k=20, temperature=0.9),
        dict(do_sample=True, top_p=0.8),
        dict(num_beams=3, do_sample=False),
    ):
        outputs = []
        for model in (stock, ours):
            torch.manual_seed(123)
            outputs.append(model.generate(prompt, max_new_tokens=16, min_new_tokens=16, **kwargs))
        assert torch.equal(*outputs), kwargs


def test_unsupported_gpt2_variant_is_refused():
    stock = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, activation_function="relu"))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        from_hf(stock)


def test_cli_converts_an_openai_format_folder_and_back(tmp_path, tokenizer, capsys):
    stock = stock_gpt2()
    source = tmp_path / "openai-gpt2"
    openai_style_folder(stock, source)
    tokenizer.save_pretrained(source)
    assert cli(["convert", "--from-hf", str(source), "--out", str(tmp_path / "ours")]) == 0
    assert "wrote gpt2_scratch" in capsys.readouterr().out
    ours = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    ids = torch.randint(0, 320, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, atol=1e-5, rtol=0)

    assert cli(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "stock")]) == 0
    served = GPT2LMHeadModel.from_pretrained(tmp_path / "stock").eval()
    for key, value in stock.state_dict().items():
        assert torch.equal(served.state_dict()[key], value), key


def test_cli_convert_bad_input(tmp_path, capsys):
    assert cli(["convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    stock_gpt2().save_pretrained(tmp_path / "stock")
    assert cli(["convert", "--from-hf", str(tmp_path / "stock"), "--out", str(tmp_path / "busy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
