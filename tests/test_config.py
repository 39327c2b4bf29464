"""Presets, parameter counts against the known figures and against transformers' GPT-2, and invalid values."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2_scratch import PRESETS, GPT2ScratchConfig
from gpt2_scratch.cli import count_parameters
from gpt2_scratch.cli import main as cli
from gpt2_scratch.convert import config_to_hf

KNOWN = {  # OpenAI's released sizes as counted by transformers (tied embeddings, with qkv bias)
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def test_the_seed_config_has_124_412_160_parameters():
    config = GPT2ScratchConfig.from_preset("gpt2-small")
    assert (config.vocab_size, config.context_length, config.emb_dim, config.n_heads, config.n_layers) == (
        50257, 1024, 768, 12, 12)
    assert config.drop_rate == 0.1 and config.qkv_bias is False
    assert count_parameters(config) == 124_412_160


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_match_transformers_gpt2(name):
    config = GPT2ScratchConfig.from_preset(name, qkv_bias=True)
    with torch.device("meta"):
        stock = GPT2LMHeadModel(config_to_hf(config))
    assert count_parameters(config) == stock.num_parameters()
    if name in KNOWN:
        assert count_parameters(config) == KNOWN[name]
    # without qkv bias: three emb_dim-sized vectors fewer per layer
    without_bias = stock.num_parameters() - 3 * config.emb_dim * config.n_layers
    assert count_parameters(GPT2ScratchConfig.from_preset(name)) == without_bias


def test_cpu_presets_are_the_sizes_their_names_say():
    sizes = {name: count_parameters(GPT2ScratchConfig.from_preset(name)) for name in ("cpu-1m", "cpu-10m", "cpu-30m")}
    assert 0.7e6 < sizes["cpu-1m"] < 1.5e6
    assert 7e6 < sizes["cpu-10m"] < 13e6
    assert 25e6 < sizes["cpu-30m"] < 35e6


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(emb_dim=100, n_heads=3), r"emb_dim \(100\) must be divisible by n_heads \(3\)"),
        (dict(n_layers=0), "n_layers must be a positive integer, got 0"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer, got -5"),
        (dict(context_length=2.5), "context_length must be a positive integer, got 2.5"),
        (dict(drop_rate=1.0), r"drop_rate must be in \[0, 1\), got 1.0"),
        (dict(drop_rate=-0.1), r"drop_rate must be in \[0, 1\), got -0.1"),
    ],
)
def test_invalid_values_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        GPT2ScratchConfig(**fields)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*gpt2-small"):
        GPT2ScratchConfig.from_preset("gpt5")


def test_presets_command_prints_the_counts(capsys):
    assert cli(["presets"]) == 0
    out = capsys.readouterr().out
    assert "124,412,160" in out and "124,439,808" in out and "1,557,611,200" in out
