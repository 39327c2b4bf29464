"""`gpt2-scratch generate`: the installed console script, greedy and sampled, streaming, and bad input."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.cli import main as cli


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(tiny_config(bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def expected_greedy(model_dir: Path, prompt: str, new_tokens: int) -> str:
    from transformers import AutoTokenizer

    model = GPT2ScratchForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_console_script_generates_greedily(model_dir):
    script = shutil.which("gpt2-scratch", path=str(Path(sys.executable).parent))
    assert script, "the gpt2-scratch console script is not installed"
    result = subprocess.run(
        [script, "generate", "--model", str(model_dir), "--prompt", "To be", "--max-new-tokens", "12",
         "--temperature", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected_greedy(model_dir, "To be", 12)


def test_streaming_prints_the_same_text(model_dir, capsys):
    assert cli(["generate", "--model", str(model_dir), "--prompt", "To be", "--max-new-tokens", "12",
                "--temperature", "0", "--stream"]) == 0
    assert capsys.readouterr().out.strip() == expected_greedy(model_dir, "To be", 12)


def test_sampling_is_reproducible_with_a_seed(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "the", "--max-new-tokens", "20", "--top-k", "40",
            "--top-p", "0.9", "--temperature", "1.2"]
    runs = []
    for seed in ("1", "1", "2"):
        assert cli([*args, "--seed", seed]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-new-tokens", "70"], "exceeds the model's context of 64 tokens"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--top-p", "0"], "--top-p must be in"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
    ],
)
def test_generate_bad_arguments(model_dir, capsys, extra, message):
    assert cli(["generate", "--model", str(model_dir), "--prompt", "To be", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_needs_a_model_folder_with_a_tokenizer(tmp_path, capsys):
    assert cli(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    GPT2ScratchForCausalLM(tiny_config()).save_pretrained(tmp_path / "bare")
    assert cli(["generate", "--model", str(tmp_path / "bare"), "--prompt", "hi"]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err


def test_tokenize_shows_each_piece_with_its_id(model_dir, capsys, monkeypatch):
    from transformers import AutoTokenizer

    text = "To be, or not\nto be: héllo"
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli(["tokenize", "--model", str(model_dir), text]) == 0
    out = capsys.readouterr().out
    assert "\033[" not in out  # not a terminal: a plain table
    rows = [line.split(None, 2) for line in out.splitlines()[1:-1]]
    expected = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    assert [int(row[1]) for row in rows] == expected and [int(row[0]) for row in rows] == list(range(len(expected)))
    shown = [ast.literal_eval(line.rsplit("  ", 1)[1]) for line in out.splitlines()[1:-1]]  # Python literals
    assert b"".join(p if isinstance(p, bytes) else p.encode() for p in shown).decode() == text
    assert {b"\xc3", b"\xa9"} <= {p for p in shown if isinstance(p, bytes)}  # 'é' split into its two bytes
    assert out.splitlines()[-1] == f"{len(expected)} tokens for {len(text)} characters ({len(text.encode())} bytes)"

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli(["tokenize", "--model", str(model_dir), text]) == 0
    assert "\033[48;5;" in capsys.readouterr().out  # a terminal: colours
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli(["tokenize", "--model", str(model_dir), text]) == 0
    assert "\033[" not in capsys.readouterr().out


def test_attention_draws_the_heatmaps_it_computes(model_dir, tmp_path, capsys):
    import matplotlib.image
    from transformers import AutoTokenizer

    from gpt2_scratch.cli import attention_maps

    text = "To be, or not to be"
    model = GPT2ScratchForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels, weights = attention_maps(model, tokenizer, text)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt"), output_attentions=True).attentions
    assert "".join(labels) == text and weights.shape == (2, 4, len(labels), len(labels))
    torch.testing.assert_close(weights, torch.stack([layer[0] for layer in expected]))

    one, grid = tmp_path / "one.png", tmp_path / "out" / "grid.svg"
    assert cli(["attention", "--model", str(model_dir), "--text", text, "--layer", "1", "--head", "2",
                "--out", str(one)]) == 0
    assert cli(["attention", "--model", str(model_dir), "--text", text, "--out", str(grid)]) == 0
    out = capsys.readouterr().out
    assert f"wrote 1 heatmap ({len(labels)} tokens) to {one}" in out and "wrote 8 heatmaps" in out
    assert matplotlib.image.imread(one).ndim == 3 and grid.read_text().count("layer 1, head 3") == 1
    assert not list(tmp_path.rglob(".*partial*"))


@pytest.mark.parametrize("extra, message", [
    (["--text", "To be", "--layer", "2"], "--layer 2: the model has 2 (layers 0..1)"),
    (["--text", "To be", "--head", "-1"], "--head -1: the model has 4 (heads 0..3)"),
    (["--text", "To be " * 40], "tokens long but the model's context is 64"),
    (["--text", ""], "--text is empty"),
])
def test_attention_bad_arguments(model_dir, tmp_path, capsys, extra, message):
    assert cli(["attention", "--model", str(model_dir), *extra, "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "a.png").exists()
