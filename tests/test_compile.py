"""The training loop on a GPU's settings, tested on a CPU: --torch_compile (the loss curve of eager training, exact
resume, state dicts with the model's own names, a model that generates and saves as after eager training), the
settings a careful user sets on CUDA, and the vocabulary padded for training but saved at its real size."""

from __future__ import annotations

import argparse
import copy
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import is_compiled_module
from conftest import (
    ROOT,
    TEXT,
    AttentionCalls,
    assert_clear_failure,
    assert_ok,
    tiny_config,
    tiny_pretraining,
    training_script,
)
from safetensors.torch import load_file

from gpt2_scratch import GPT2ScratchForCausalLM
from gpt2_scratch.convert import to_hf
from gpt2_scratch.pretraining import build_parser, collate_blocks
from gpt2_scratch.training import (
    DeviceSettings,
    PaddedVocabulary,
    TrainingLoop,
    build_optimizers,
    device_settings,
    make_accelerator,
)

# No dropout: compiled dropout draws other random numbers than eager dropout, and the curves are compared step by step.
TINY = tiny_pretraining(n_layers=1, learning_rate="3e-3", warmup_steps=2, logging_steps=1, seed=7, drop_rate=0.0,
                        max_steps=4, save_steps=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    path.write_text((TEXT.replace(". ", ".\n") + "\n") * 6)
    return path


@pytest.fixture(scope="module")
def eager(corpus, tmp_path_factory) -> Path:
    """The uncompiled, unpadded run every other run here is held to."""
    out = tmp_path_factory.mktemp("eager")
    pretrain(corpus, out)
    return out


def pretrain(corpus: Path, out: Path, *extra: str) -> None:
    assert_ok(training_script("pretrain.py", ["--dataset", str(corpus), "--output_dir", str(out), *TINY, *extra]))


def losses(out: Path) -> list[float]:
    history = json.loads((out / "checkpoint-4" / "progress.json").read_text())["history"]
    return [h["train/loss"] for h in history if "train/loss" in h]


@pytest.fixture
def restores_determinism():
    """--full_determinism switches PyTorch's process-wide deterministic mode on: off again for the next test."""
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False


def test_compiled_pretraining_follows_the_eager_curve_and_resumes_exactly(corpus, eager, tmp_path,
                                                                         restores_determinism):
    """--torch_compile (inductor) in fp32: the same loss at every step as eager training to float rounding; the
    checkpoints hold the tensors under the model's own names (no `_orig_mod.`: an eager run can resume a compiled
    one's checkpoint and the other way round), and a compiled run resumed from step 2 ends bit for bit where the
    uninterrupted compiled run did (with --full_determinism: inductor's embedding gradient adds in parallel, and two
    fresh compiled runs differ in the last bits without it). The saved folders generate the same tokens."""
    compiled, resumed = tmp_path / "compiled", tmp_path / "resumed"
    pretrain(corpus, compiled, "--torch_compile", "--full_determinism")
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-5) and len(losses(eager)) == 4
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert load_file(str(compiled / checkpoint / "model.safetensors")).keys() \
            == load_file(str(eager / checkpoint / "model.safetensors")).keys()
    shutil.copytree(compiled / "checkpoint-2", resumed / "checkpoint-2")
    pretrain(corpus, resumed, "--torch_compile", "--full_determinism", "--resume_from_checkpoint", "latest")
    final, again = load_file(str(compiled / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    ids = torch.tensor([[5, 17, 42, 8]])
    tokens = [GPT2ScratchForCausalLM.from_pretrained(out).generate(ids, max_new_tokens=8, do_sample=False)
              for out in (eager, compiled)]
    assert torch.equal(*tokens)


def test_the_compiled_step_leaves_the_model_as_eager_training_would(tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend ...` (here aot_eager, which compiles in seconds) compiles the step as
    --torch_compile does. Only the step is compiled: the prepared model that evaluation, checkpoints and the scripts
    take is the plain model, its state dict has the plain names, and it generates and saves like any other."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    args = build_parser().parse_args(["--output_dir", str(tmp_path), "--max_steps", "2", "--logging_steps", "1",
                                      "--per_device_train_batch_size", "2"])
    accelerator = make_accelerator(args)
    torch.manual_seed(0)
    blocks = [{"input_ids": torch.randint(0, 320, (16,))} for _ in range(4)]
    model = GPT2ScratchForCausalLM(tiny_config())
    names = list(model.state_dict())
    evaluated = []
    loop = TrainingLoop(accelerator, args, model, blocks, collate_blocks,
                        lambda m: evaluated.append(is_compiled_module(m)) or {"eval/loss": 0.0})
    loop.run()
    assert is_compiled_module(loop.step_model) and evaluated == [False]
    final = accelerator.unwrap_model(loop.model)
    assert final is model and not is_compiled_module(final) and list(final.state_dict()) == names
    final.eval().save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    reloaded = GPT2ScratchForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(final.generate(ids, max_new_tokens=6, do_sample=False),
                       reloaded.generate(ids, max_new_tokens=6, do_sample=False))
    loop.close()


def test_what_the_loop_sets_on_cuda():
    """TF32 for float32 matmuls, AdamW's fused kernel (also beside Muon) and pinned memory on CUDA; PyTorch's
    defaults elsewhere."""
    assert device_settings(torch.device("cuda", 0)) == DeviceSettings(tf32=True, fused_adamw=True, pin_memory=True)
    assert device_settings(torch.device("cpu")) == DeviceSettings(tf32=False, fused_adamw=False, pin_memory=False)
    model = GPT2ScratchForCausalLM(tiny_config())
    args = argparse.Namespace(optimizer="adamw", learning_rate=1e-3, weight_decay=0.1, muon_learning_rate=0.02,
                              muon_ns_steps=5, mixed_precision="bf16")
    assert build_optimizers(model, args, fused=True)[0].defaults["fused"] is True
    assert build_optimizers(model, args)[0].defaults["fused"] is None
    muon, adamw = build_optimizers(model, argparse.Namespace(**{**vars(args), "optimizer": "muon"}), fused=True)
    assert adamw.defaults["fused"] is True and "fused" not in muon.defaults


def test_training_attention_is_what_the_flash_kernel_takes():
    """A training batch (no padding mask) reaches SDPA as flash attention needs it: no explicit mask, causal by the
    kernel itself, with the blocks' dropout; on CUDA under bf16 that is the flash kernel (benchmarks/gpu_check.py
    trains with every other kernel switched off)."""
    model = GPT2ScratchForCausalLM(tiny_config(drop_rate=0.1)).train()
    ids = torch.randint(0, 320, (2, 16))
    with AttentionCalls() as attention:
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(attention.calls) == 2  # one per block
    assert all(c["attn_mask"] is None and c["is_causal"] and c["dropout_p"] == 0.1 for c in attention.calls)


def test_padding_the_vocabulary_changes_no_number():
    """Padded rows are there for the matmul's shape only: the logits, the loss and the gradients of the real rows
    are the unpadded model's, and trimming gives back the original tensors (and a head without the hook)."""
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(tiny_config(vocab_size=300))
    reference = copy.deepcopy(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 16))
    expected = reference(input_ids=ids, labels=ids)
    expected.loss.backward()
    state = torch.random.get_rng_state()
    padding = PaddedVocabulary(model, 64)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched
    assert padding.vocab_size == 300 and model.config.vocab_size == 320
    assert model.out_head.weight is model.transformer.tok_emb.weight  # still tied
    padded = model(input_ids=ids, labels=ids)
    padded.loss.backward()
    assert padded.logits.shape[-1] == 300
    torch.testing.assert_close(padded.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded.loss, expected.loss, rtol=0, atol=1e-6)
    grad = model.transformer.tok_emb.weight.grad
    torch.testing.assert_close(grad[:300], reference.transformer.tok_emb.weight.grad, rtol=0, atol=1e-6)
    assert not grad[300:].any()  # never predicted, never an input: the padded rows learn nothing
    del padded
    padding.trim()
    assert model.config.vocab_size == 300 and model.out_head.weight is model.transformer.tok_emb.weight
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert not model.out_head._forward_hooks


def test_padded_pretraining_saves_the_real_vocabulary(corpus, eager, tmp_path):
    """--pad_vocab_to_multiple_of 64: the 300-token run trains padded to 320 (checkpoints padded, and resumed padded
    bit for bit), follows the unpadded run's curve, and saves a 300-token GPT-2 that converts to stock exactly."""
    plain, padded, resumed = eager, tmp_path / "padded", tmp_path / "resumed"
    result = training_script("pretrain.py", ["--dataset", str(corpus), "--output_dir", str(padded), *TINY,
                                              "--pad_vocab_to_multiple_of", "64"])
    assert_ok(result)
    assert "vocab 300 padded to 320," in result.stdout
    assert load_file(str(padded / "checkpoint-2" / "model.safetensors"))["transformer.tok_emb.weight"].shape[0] == 320
    assert losses(padded) == pytest.approx(losses(plain), rel=1e-5)
    shutil.copytree(padded / "checkpoint-2", resumed / "checkpoint-2")
    pretrain(corpus, resumed, "--pad_vocab_to_multiple_of", "64", "--resume_from_checkpoint", "latest")
    saved, again = load_file(str(padded / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    model = GPT2ScratchForCausalLM.from_pretrained(padded).eval()
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == 300
    assert model.transformer.tok_emb.weight.shape == (300, 32)
    unpadded = load_file(str(plain / "model.safetensors"))
    for key, value in saved.items():
        torch.testing.assert_close(value, unpadded[key], rtol=0, atol=1e-5)
    stock = to_hf(model)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert stock.config.vocab_size == 300


def test_padding_is_refused_beyond_its_limit(corpus, tmp_path):
    result = training_script("pretrain.py", ["--dataset", str(corpus), "--output_dir", str(tmp_path / "out"), *TINY,
                                             "--pad_vocab_to_multiple_of", "100000"])
    assert_clear_failure(result, "--pad_vocab_to_multiple_of must be at least 0 and at most 4,096", tmp_path / "out")


def test_gpu_check_smoke_runs_the_training_check_on_a_cpu(monkeypatch, capsys):
    """benchmarks/gpu_check.py --smoke: the GPU check's training part (the scripts' loop, ours padded beside
    transformers' GPT-2, MFU, ratios, each run's settings read off its loop) on a tiny model, eager, one timed step."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--smoke"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exit.value.code == 0, out
    for line in ("gpt2_scratch  eager", "transformers  eager", "eager: gpt2_scratch / transformers",
                 "vocabulary padded to a multiple of 64", "compiled False, bf16 autocast", "vocab 300, batch 2 x 32"):
        assert line in out, out
