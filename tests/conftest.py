"""Shared fixtures: tiny configs, stock GPT-2 twins, a tokenizer folder, and a Python process that cannot see us."""

from __future__ import annotations

import io
import itertools
import json
import os

# Never reach for the Hub from tests (set before transformers and huggingface_hub read it at import).
os.environ["HF_HUB_OFFLINE"] = "1"
# Under `pytest -n N` the workers share the cores: each takes its share of threads, and so do the scripts it starts
# (torch's default, every core in every worker, oversubscribes them). Set before torch reads it at import.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import runpy
import socket
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.overrides import TorchFunctionMode
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows "
    "of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
) * 20


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (mixed precision included), as a new process would start."""
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Training in this process (a script's run(), Trainer, SFTTrainer, whose SFTConfig turns bf16 on by default)
    leaves accelerate's state behind; the next test starts without it."""
    yield
    reset_accelerate()


def tiny_config(**overrides) -> GPT2ScratchConfig:
    fields = dict(vocab_size=320, context_length=64, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0)
    return GPT2ScratchConfig(**{**fields, **overrides})


def tiny_pretraining(**flags: object) -> list[str]:
    """training/pretrain.py's flags for a model trained in seconds (the cpu-1m preset cut down), plus `flags`."""
    every = {"preset": "cpu-1m", "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
             "tokenizer_vocab_size": 300, "per_device_train_batch_size": 4, **flags}
    return [item for name, value in every.items() for item in (f"--{name}", str(value))]


def randomised(model: GPT2ScratchForCausalLM, seed: int = 1) -> GPT2ScratchForCausalLM:
    """Every tensor drawn with a real spread: GPT-2's init leaves biases at zero, norms at one and the logits nearly
    flat (a spread of ~0.14), where a block or its attention left out barely moves the loss or a bf16 tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.normal_(1.0 if name.endswith("scale") else 0.0, 0.2, generator=generator)
            else:
                param.normal_(0.0, 0.15, generator=generator)
    return model


def stock_gpt2(seed: int = 0, qkv_bias: bool = True, **overrides) -> GPT2LMHeadModel:
    """A transformers GPT2LMHeadModel in eval mode with every tensor random (GPT-2's init leaves biases at zero and
    norms at one, which would hide a mapping mistake); `qkv_bias=False` zeroes the query/key/value biases."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=320, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
            if name.endswith("c_attn.bias") and not qkv_bias:
                param.zero_()
    return model


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few lines, with <|endoftext|> as id 0 (as the stock twins' eos)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


HIDE_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "gpt2_scratch" or name.startswith("gpt2_scratch."):
                raise ImportError("gpt2_scratch is hidden in this process")
    sys.meta_path.insert(0, _Block())
    try:
        import gpt2_scratch
    except ImportError:
        pass
    else:
        raise SystemExit("gpt2_scratch must not be importable here")
    """
)


def without_package(code: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a fresh interpreter running `code` where `import gpt2_scratch` fails."""
    return [sys.executable, "-c", HIDE_PACKAGE + textwrap.dedent(code)], {**os.environ, "PYTHONPATH": ""}


def run_without_package(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `import gpt2_scratch` fails, as for a user who only has the folder."""
    command, env = without_package(code)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


ROOT = Path(__file__).resolve().parent.parent
# On a machine without GPUs `--multi_gpu` starts the processes with torchrun; they train together over gloo.
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# A port of this test process's own: pytest-xdist's workers launch two-process runs at the same time.
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(free_port())]


def run_training_script(script: str, args: list[str], launcher: list[str] | None = None, cache: Path | None = None,
                        **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python training/<script> args` (or under `launcher`), offline, unbuffered, without progress bars."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    if cache:
        env["GPT2_SCRATCH_CACHE"] = str(cache)
    command = [*(launcher or [sys.executable]), str(ROOT / "training" / script), *args]
    if popen:
        return subprocess.Popen(command, env=env, cwd=ROOT, **popen)
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def run_script_here(script: str, args: list[str], cache: Path | None = None) -> subprocess.CompletedProcess:
    """`python training/<script> args` in this process: the same file run as `__main__` with that argv, its exit
    status and what it printed, without a fresh interpreter's 5-8 s of imports. Signals, `accelerate launch` and a
    process without the package need `run_training_script`; each script also runs that way in its own test file."""
    path = ROOT / "training" / script
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = [str(path), *args]
    reset_accelerate()
    if cache:
        os.environ["GPT2_SCRATCH_CACHE"] = str(cache)
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            runpy.run_path(str(path), run_name="__main__")
        status = 0
    except SystemExit as exit:
        if isinstance(exit.code, str):
            print(exit.code, file=stderr)
        status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        reset_accelerate()
    return subprocess.CompletedProcess([str(path), *args], status, stdout.getvalue(), stderr.getvalue())


def training_script(script: str, args: list[str], launcher: list[str] | None = None, cache: Path | None = None,
                    **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """training/<script> in this process (`run_script_here`); in processes of its own under `launcher` or with
    Popen's arguments (`run_training_script`)."""
    if launcher or popen:
        return run_training_script(script, args, launcher, cache, **popen)
    return run_script_here(script, args, cache)


def steady_clock(monkeypatch: pytest.MonkeyPatch, seconds_per_read: float) -> None:
    """The training loop's clock (`Clock.now`) advances `seconds_per_read` at each read: once when a loop starts and
    once per optimizer step, so a time budget of N seconds holds about N / seconds_per_read steps on any machine."""
    from gpt2_scratch.training import Clock

    ticks = itertools.count()
    monkeypatch.setattr(Clock, "now", staticmethod(lambda: next(ticks) * seconds_per_read))


def assert_clear_failure(result: subprocess.CompletedProcess, message: str, out: Path) -> None:
    """Exit status 2, the message on stderr without a traceback, and no output folder that looks complete."""
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (out / "config.json").exists()


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A tiny causal-LM folder as training/pretrain.py writes it (model, code files, tokenizer), with room for the
    instruction template in its context."""
    from gpt2_scratch import GPT2ScratchForCausalLM

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    GPT2ScratchForCausalLM(tiny_config(context_length=256, eos_token_id=0, bos_token_id=0)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def openai_style_folder(stock: GPT2LMHeadModel, path: Path) -> Path:
    """Write `stock` the way the Hub's openai-community/gpt2 stores it: base-model keys without the `transformer.`
    prefix, the old causal-mask buffers, and the original config fields."""
    path.mkdir(parents=True, exist_ok=True)
    config = stock.config
    state = {k.removeprefix("transformer."): v for k, v in stock.state_dict().items() if k != "lm_head.weight"}
    n = config.n_positions
    for i in range(config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_json(path / "config.json", {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": config.bos_token_id, "embd_pdrop": 0.1, "eos_token_id": config.eos_token_id,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": n,
        "n_embd": config.n_embd, "n_head": config.n_head, "n_layer": config.n_layer, "n_positions": n,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": config.vocab_size,
    })
    return path


class AttentionCalls(TorchFunctionMode):
    """The keyword arguments of every `F.scaled_dot_product_attention` call made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append(kwargs or {})
        return func(*args, **(kwargs or {}))
