"""`gpt2-scratch generate`: the installed console script, greedy and sampled, streaming, and bad input."""

from __future__ import annotations

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
