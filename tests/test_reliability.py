"""What real machines do to a training run: damaged checkpoints, signals, settings that cannot fit, and whatever a
user types. The end-to-end kills and stops (SIGKILL, SIGINT, SIGTERM, Ctrl-C under `accelerate launch`) are in
test_pretrain.py; here the pieces, in-process, and hypothesis over config values and the scripts' numeric arguments."""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import TEXT, assert_clear_failure, run_training_script, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError

from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, classification, instruction, pretraining
from gpt2_scratch.checkpoints import (
    MANIFEST_FILE,
    CheckpointError,
    checkpoint_problem,
    find_latest,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    write_manifest,
)
from gpt2_scratch.cli import count_parameters
from gpt2_scratch.memory import available_memory, parameter_count, training_memory
from gpt2_scratch.training import (
    ARGUMENT_LIMITS,
    Limits,
    Progress,
    ProgressBar,
    StopSignals,
    check_memory,
    check_numeric_arguments,
    check_training_arguments,
    run_script,
)

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def prepared(config: GPT2ScratchConfig) -> Accelerator:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = GPT2ScratchForCausalLM(config)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    return accelerator


@pytest.fixture
def checkpoints(tmp_path) -> Path:
    """checkpoint-2 and checkpoint-4 of a tiny model, as the loop saves them."""
    accelerator = prepared(tiny_config())
    for step in (2, 4):
        save_checkpoint(accelerator, tmp_path, step, {"step": step})
    return tmp_path


def test_every_file_of_a_checkpoint_is_in_its_manifest(checkpoints):
    folder = checkpoints / "checkpoint-4"
    listed = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    assert set(listed) == {p.name for p in folder.iterdir()} - {MANIFEST_FILE}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "progress.json"} <= set(listed)
    assert listed["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert checkpoint_problem(folder) is None and not list(checkpoints.glob(".*"))  # no partial folder left behind


def truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the sha256 can tell
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (lambda f: truncate(f / "model.safetensors"), "model.safetensors is", "(truncated?)"),
    "missing": (lambda f: (f / "optimizer.bin").unlink(), "optimizer.bin is missing", ""),
    "bit-flipped": (lambda f: flip_a_bit(f / "model.safetensors"), "model.safetensors differs from the sha256", ""),
    "no manifest": (lambda f: (f / MANIFEST_FILE).unlink(), "no manifest.json", ""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_latest_passes_over_a_damaged_checkpoint_and_says_why(checkpoints, damage):
    spoil, reason, detail = DAMAGE[damage]
    spoil(checkpoints / "checkpoint-4")
    found, skipped = find_latest(checkpoints)
    assert found == checkpoints / "checkpoint-2"
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped checkpoint-4: {reason}") and detail in skipped[0]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_named_explicitly_is_one_line_and_exit_2(checkpoints, damage, capsys):
    spoil, reason, _ = DAMAGE[damage]
    spoil(checkpoints / "checkpoint-4")
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: resolve_checkpoint(checkpoints, str(checkpoints / "checkpoint-4")))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --resume_from_checkpoint {checkpoints / 'checkpoint-4'}: {reason}")
    assert err.rstrip().endswith("intact beside it: checkpoint-2")


def test_latest_with_nothing_intact_says_what_it_skipped(checkpoints):
    for step in (2, 4):
        truncate(checkpoints / f"checkpoint-{step}" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*skipped checkpoint-4: .*; skipped "
                                              r"checkpoint-2: model.safetensors is"):
        resolve_checkpoint(checkpoints, "latest")


def test_a_checkpoint_of_another_model_is_refused_in_one_line(checkpoints):
    accelerator = prepared(tiny_config(emb_dim=64))
    with pytest.raises(CheckpointError, match="does not fit this run's model or optimizer") as error:
        load_checkpoint(accelerator, checkpoints / "checkpoint-4")
    assert "\n" not in str(error.value)


def test_a_checkpoint_resumes_its_weights_and_progress_and_names_the_intact_ones(checkpoints):
    accelerator = prepared(tiny_config())
    model = accelerator._models[0]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert load_checkpoint(accelerator, checkpoints / "checkpoint-4") == {"step": 4}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert resolve_checkpoint(checkpoints, str(checkpoints / "checkpoint-2")) == (checkpoints / "checkpoint-2", [])
    assert resolve_checkpoint(checkpoints, "latest") == (checkpoints / "checkpoint-4", [])
    assert checkpoint_problem(checkpoints / "checkpoint-9") == "no such folder"
    with pytest.raises(CheckpointError, match=r"checkpoint-9: no such folder; intact beside it: checkpoint-4, "
                                              r"checkpoint-2$"):
        resolve_checkpoint(checkpoints, str(checkpoints / "checkpoint-9"))
    for step in (2, 4):
        (checkpoints / f"checkpoint-{step}" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(checkpoints, str(checkpoints / "checkpoint-4"))
    assert str(error.value).endswith("(its save was interrupted, or it was not written by this version); no intact "
                                     "checkpoint beside it")
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(checkpoints / "empty", "latest")
    assert str(error.value) == f"--resume_from_checkpoint latest: no intact checkpoint in {checkpoints / 'empty'}"


def test_the_manifest_lists_nested_files_and_must_list_progress(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "part.bin").write_bytes(b"abc")
    (tmp_path / "progress.json").write_text("{}")
    write_manifest(tmp_path)
    write_manifest(tmp_path)  # written again: the manifest never lists itself
    listed = json.loads((tmp_path / MANIFEST_FILE).read_text())["files"]
    assert listed == {"progress.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
                      "sub/part.bin": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}}
    assert checkpoint_problem(tmp_path) is None
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"files": {"sub/part.bin": listed["sub/part.bin"]}}))
    assert checkpoint_problem(tmp_path) == "its manifest does not list progress.json"
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    assert checkpoint_problem(tmp_path) == "manifest.json is unreadable"


@pytest.mark.parametrize(("intact", "written", "error", "reason"), [
    (True, True, OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (False, True, OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (True, False, OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded"),  # before any folder
    (True, True, SafetensorError("Error while serializing: I/O error"), "Error while serializing: I/O error"),
])
def test_a_failed_save_removes_its_partial_folder_and_says_what_is_intact(checkpoints, intact, written, error,
                                                                          reason, monkeypatch):
    """The in-process twin of the file-size-limit test below: the disk fills while accelerate writes the state."""
    if not intact:
        for step in (2, 4):
            truncate(checkpoints / f"checkpoint-{step}" / "model.safetensors")
    accelerator = prepared(tiny_config())

    def disk_full(folder: str) -> None:
        if written:
            Path(folder).mkdir()
            (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise error

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(CheckpointError) as raised:
        save_checkpoint(accelerator, checkpoints, 6, {"step": 6})
    assert str(raised.value) == (f"writing {checkpoints / 'checkpoint-6'} failed ({reason}); "
                                 + ("checkpoint-4 is intact and resumable" if intact else "no checkpoint is intact"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_a_save_replaces_a_killed_saves_leftovers_and_a_checkpoint_of_the_same_step(checkpoints):
    (checkpoints / ".checkpoint-6.partial").mkdir()
    (checkpoints / ".checkpoint-6.partial" / "stale.bin").write_bytes(b"from a killed save")
    accelerator = prepared(tiny_config())
    for _ in range(2):  # the second save of step 6 replaces the first
        assert save_checkpoint(accelerator, checkpoints, 6, {"step": 6}) == checkpoints / "checkpoint-6"
        assert not (checkpoints / "checkpoint-6" / "stale.bin").exists() and checkpoint_problem(
            checkpoints / "checkpoint-6") is None
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


@pytest.mark.parametrize(("error", "detail"), [(RuntimeError("size mismatch for wte\n\tshape [8] vs [9]"),
                                                 "size mismatch for wte"), (KeyError(), "KeyError")])
def test_a_checkpoint_that_does_not_load_names_the_first_line_of_why(checkpoints, error, detail, monkeypatch):
    accelerator = prepared(tiny_config())

    def refuse(folder: str) -> None:
        raise error

    monkeypatch.setattr(accelerator, "load_state", refuse)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(accelerator, checkpoints / "checkpoint-4")
    assert str(raised.value) == (f"--resume_from_checkpoint {checkpoints / 'checkpoint-4'}: it does not fit this run's "
                                 f"model or optimizer (resume with the arguments it was trained with): {detail}")


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_resumable(checkpoints):
    """A full disk (here: a file-size limit, which fails a write the same way) while saving: one line naming the
    checkpoint still intact, and nothing that looks like a checkpoint. Run in a child so the limit binds only it."""
    code = f"""
import pathlib, resource, signal, torch
from accelerate import Accelerator
from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM
from gpt2_scratch.checkpoints import CheckpointError, save_checkpoint
accelerator = Accelerator(cpu=True)
model = GPT2ScratchForCausalLM(GPT2ScratchConfig(vocab_size=320, context_length=64, emb_dim=48, n_heads=4, n_layers=2))
accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as one fails with ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_checkpoint(accelerator, pathlib.Path({str(checkpoints)!r}), 6, {{"step": 6}})
except CheckpointError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith(f"writing {checkpoints / 'checkpoint-6'} failed ("), result.stdout + result.stderr
    assert "File too large" in result.stdout and "checkpoint-4 is intact and resumable" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_stop_signals_are_noted_not_raised_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a repeat (the launcher forwarding Ctrl-C) changes nothing
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is before


def test_progress_bar_shows_time_elapsed_and_left_under_a_budget():
    out = io.StringIO()
    bar = ProgressBar(100, 10.0, Progress(step=30, seconds=150.0), enabled=True, file=out)
    assert "02:30 elapsed, 07:30 left, step 30/100" in str(bar.bar) and "25%" in str(bar.bar)
    bar.show(Progress(step=60, seconds=300.0), loss=2.5)  # 5 s a step: the 40 steps left end before the budget
    assert "05:00 elapsed, 03:20 left, step 60/100, loss 2.500" in str(bar.bar) and "50%" in str(bar.bar)
    bar.close()
    steps = ProgressBar(100, None, Progress(step=3), enabled=True, file=io.StringIO())
    steps.show(Progress(step=5), loss=1.0)
    assert "5/100" in str(steps.bar) and "loss=1.000" in str(steps.bar)


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True}, {"tie_word_embeddings": False}, {"n_layers": 3}])
def test_parameter_count_from_the_config_matches_the_model(overrides):
    config = tiny_config(**overrides)
    assert parameter_count(config) == count_parameters(config)


def training_args(**overrides) -> argparse.Namespace:
    return pretraining.build_parser().parse_args(["--output_dir", "unused", *[
        item for name, value in overrides.items() for item in (f"--{name}", str(value))]])


def test_the_issues_context_length_is_refused_before_allocating_with_the_estimate():
    """cpu-10m with --context_length 100000 (the kernel used to kill it for memory): refused, with the parts."""
    config = GPT2ScratchConfig.from_preset("cpu-10m", context_length=100_000)
    with pytest.raises(ValueError) as error:
        check_memory(training_args(context_length=100_000), config, torch.device("cpu"))
    message = str(error.value)
    assert message.startswith("this run needs at least ") and "\n" not in message
    for part in ("parameters", "gradients", "optimizer state", "activations", "for batches of 8 x 100000 tokens",
                 "is available to the system on cpu", "--per_device_train_batch"):
        assert part in message, message
    assert "causal mask" not in message  # the fused kernel masks by itself: no mask is built
    config._attn_implementation = "eager"
    with pytest.raises(ValueError, match=r"causal mask 9\.3 GiB"):  # one 100,000² bool for all blocks
        check_memory(training_args(context_length=100_000), config, torch.device("cpu"))
    check_memory(training_args(), GPT2ScratchConfig.from_preset("cpu-10m"), torch.device("cpu"))  # fits


def test_the_estimate_counts_what_a_training_step_holds():
    config = tiny_config()
    parts = training_memory(config, 4)
    params = parameter_count(config)
    assert parts["causal mask"] == 0 and parts["parameters"] == parts["gradients"] == 4 * params
    assert parts["optimizer state"] == 8 * params  # AdamW: two moments
    muon = training_memory(config, 4, "muon")["optimizer state"]
    assert muon == 4 * 2 * 12 * 48 ** 2 + 8 * (params - 2 * 12 * 48 ** 2)  # one momentum for the blocks' matrices
    assert training_memory(config, 8)["activations"] == 2 * parts["activations"]  # linear in the batch
    assert training_memory(config, 4, mixed_precision="bf16")["activations"] < parts["activations"]
    # with dropout, the CPU's fused kernel keeps every head's weights (4 bytes each, 3 copies, and the mask's byte)
    scores = 2 * 4 * 4 * 64 ** 2 * 13
    assert training_memory(tiny_config(drop_rate=0.1), 4)["activations"] == parts["activations"] + scores
    assert training_memory(tiny_config(drop_rate=0.1), 4, device_type="cuda")["activations"] == parts["activations"]


def test_available_memory_is_the_least_of_system_and_cgroup(tmp_path, monkeypatch):
    import psutil

    from gpt2_scratch import memory

    system = psutil.virtual_memory().available
    monkeypatch.setattr(memory, "CGROUP", tmp_path)  # a cgroup folder of our own: none, v2, then v1
    assert available_memory(torch.device("cpu")) == (pytest.approx(system, rel=0.1), "available to the system")
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit
    (tmp_path / "memory.current").write_text(f"{2 ** 30}\n")
    assert available_memory(torch.device("cpu"))[1] == "available to the system"
    (tmp_path / "memory.max").write_text(f"{3 * 2 ** 30}\n")  # a 3 GiB container that uses 1 GiB: 2 GiB left
    assert available_memory(torch.device("cpu")) == (2 * 2 ** 30, "left under the cgroup's memory.max")
    (tmp_path / "memory.current").write_text(f"{4 * 2 ** 30}\n")  # over its limit (page cache): nothing left
    assert available_memory(torch.device("cpu")) == (0, "left under the cgroup's memory.max")
    (tmp_path / "memory.max").unlink()
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(f"{2 ** 63 - 4096}\n")  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text(f"{2 ** 29}\n")
    assert available_memory(torch.device("cpu"))[1] == "available to the system"
    (v1 / "memory.limit_in_bytes").write_text(f"{2 ** 30}\n")
    assert available_memory(torch.device("cpu")) == (2 ** 29, "left under the cgroup's memory/memory.limit_in_bytes")
    if system > 2 ** 40:  # a limit above what the system has left does not count
        return
    (v1 / "memory.limit_in_bytes").write_text(f"{system + 2 ** 40}\n")
    assert available_memory(torch.device("cpu"))[1] == "available to the system"


def test_settings_that_cannot_fit_end_to_end_are_refused_without_allocating(tmp_path):
    """4,000 blocks of cpu-1m (447 M parameters, 1.7 GiB of float32 weights) with a 10,000-token context: refused
    before anything is built. The script's own process reports its peak resident memory (VmHWM) as it exits: a
    process that built the model would have held its weights (building it peaks at 2.27 GiB), while the script's
    imports and tokenizer take well under 1 GiB."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(TEXT * 40)  # enough tokens for one block of 10,000
    peak_file = tmp_path / "peak_kib"
    report_peak = (f"import atexit, runpy, sys; atexit.register(lambda: open({str(peak_file)!r}, 'w').write("
                   "next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))); "
                   "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    result = run_training_script("pretrain.py", [
        "--dataset", str(corpus), "--output_dir", str(tmp_path / "out"), "--preset", "cpu-1m", "--tokenizer_vocab_size",
        "300", "--context_length", "10000", "--n_layers", "4000", "--max_steps", "2"],
        launcher=[sys.executable, "-c", report_peak])
    assert_clear_failure(result, "this run needs at least", tmp_path / "out")
    assert len(result.stderr.strip().splitlines()) == 1 and "GiB" in result.stderr
    weights_gib = parameter_count(GPT2ScratchConfig.from_preset("cpu-1m", vocab_size=300, context_length=10_000,
                                                                n_layers=4000)) * 4 / 2 ** 30
    assert weights_gib > 1.6
    peak_gib = int(peak_file.read_text()) / 2 ** 20
    assert peak_gib < 1.0, peak_gib  # nothing of the model was built


# --- what a user types: every numeric argument of every script, and config values ---------------------------------

SCRIPTS = {
    "pretrain": (pretraining, []),
    "classification": (classification, ["--model_name_or_path", "unused"]),
    "instruction": (instruction, ["--model_name_or_path", "unused"]),
}


def numeric_options(module) -> list[str]:
    return sorted({action.dest for action in module.build_parser()._actions if action.type in (int, float)})


def validate(script: str, argv: list[str]) -> tuple[int, str]:
    """A script's parsing and argument checks, in-process, as `run_script` reports them: (exit status, stderr)."""
    module, required = SCRIPTS[script]
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        try:
            run_script(lambda: check_training_arguments(
                module.build_parser().parse_args(["--output_dir", "unused", *required, *argv])))
        except SystemExit as exit_info:
            return exit_info.code, stderr.getvalue()
    return 0, stderr.getvalue()


def test_every_numeric_argument_has_declared_limits():
    for script, (module, _) in SCRIPTS.items():
        assert set(numeric_options(module)) <= set(ARGUMENT_LIMITS), script


TYPED = st.one_of(
    st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e308", "-0.5", "0.5", str(2 ** 64), str(10 ** 30), "1"]),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)


@FUZZ
@given(data=st.data())
def test_any_number_typed_is_accepted_or_one_line_and_exit_2(data):
    script = data.draw(st.sampled_from(sorted(SCRIPTS)))
    name = data.draw(st.sampled_from(numeric_options(SCRIPTS[script][0])))
    typed = data.draw(TYPED)
    code, err = validate(script, [f"--{name}", typed])
    if code == 0:
        value = float(typed)
        assert math.isfinite(value) and ARGUMENT_LIMITS[name].accepts(value) and err == ""
    else:
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
        assert f"--{name}" in err and "Traceback" not in err, err


def test_a_bad_number_through_the_real_script_is_one_line(tmp_path):
    result = run_training_script("pretrain.py", ["--output_dir", str(tmp_path / "out"), "--learning_rate", "nan"])
    assert_clear_failure(result, "error: --learning_rate must be a finite number, got nan", tmp_path / "out")
    assert len(result.stderr.strip().splitlines()) == 1


def test_limits_describe_themselves():
    assert Limits(1).describe() == "at least 1"
    assert Limits(0, 1, high_open=True).describe() == "at least 0 and less than 1"
    assert Limits(0, low_open=True).describe() == "greater than 0"
    assert Limits(1, 1600).describe() == "at least 1 and at most 1,600"


def test_limits_accept_exactly_their_range():
    closed, open_ends = Limits(1, 100), Limits(0, 1, low_open=True, high_open=True)
    assert [closed.accepts(v) for v in (0.999, 1, 50, 100, 100.001)] == [False, True, True, True, False]
    assert [open_ends.accepts(v) for v in (0, 1e-9, 0.5, 0.999, 1)] == [False, True, True, True, False]
    assert Limits(0).accepts(0) and Limits(0).accepts(1e300) and not Limits(0).accepts(-1e-9)


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("pretrain", ["--learning_rate", "0"], "--learning_rate must be greater than 0, got 0"),
    ("pretrain", ["--learning_rate", "-0.5"], "--learning_rate must be greater than 0, got -0.5"),
    ("pretrain", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    ("pretrain", ["--seed", "4294967296"], "--seed must be at least 0 and at most 4,294,967,295, got 4294967296"),
    ("pretrain", ["--drop_rate", "1"], "--drop_rate must be at least 0 and less than 1, got 1"),
    ("instruction", ["--lora_r", "1601"], "--lora_r must be at least 1 and at most 1,600, got 1601"),
    ("pretrain", ["--max_steps", "0"], "nothing to train: give --max_steps > 0 or --num_train_epochs > 0"),
    ("pretrain", ["--num_train_epochs", "0"], "nothing to train: give --max_steps > 0 or --num_train_epochs > 0"),
    ("pretrain", ["--schedule_on_clock"],
     "--schedule_on_clock needs --max_train_minutes: the budget the cosine decay ends at"),
    ("pretrain", ["--push_to_hub"], "--push_to_hub needs --hub_model_id (e.g. your-name/gpt2-scratch-shakespeare)"),
    ("pretrain", ["--max_steps", "1"], None),
    ("pretrain", ["--max_steps", "-1", "--num_train_epochs", "0.5"], None),
    ("pretrain", ["--max_steps", "5", "--num_train_epochs", "0"], None),
    ("pretrain", ["--schedule_on_clock", "--max_train_minutes", "0.5"], None),
    ("pretrain", ["--push_to_hub", "--hub_model_id", "someone/model"], None),
    ("pretrain", ["--learning_rate", "1e-9", "--drop_rate", "0", "--seed", "4294967295"], None),
])
def test_argument_checks_refuse_exactly_what_is_out_of_range(script, argv, message):
    assert validate(script, argv) == ((2, f"error: {message}\n") if message else (0, ""))


def test_a_number_without_declared_limits_must_be_finite_and_not_negative():
    check_training_arguments(training_args(max_steps=3))
    check_numeric_arguments(argparse.Namespace(undeclared=0, flag=True, name="x"))
    with pytest.raises(ValueError, match=r"^--undeclared must be at least 0, got -1$"):
        check_numeric_arguments(argparse.Namespace(undeclared=-1))
    with pytest.raises(ValueError, match=r"^--undeclared must be at least 0, got -0\.25$"):
        check_numeric_arguments(argparse.Namespace(undeclared=-0.25))
    with pytest.raises(ValueError, match=r"^--undeclared must be a finite number, got inf$"):
        check_numeric_arguments(argparse.Namespace(undeclared=math.inf))


FIELD_VALUES = st.one_of(
    st.integers(min_value=-(2 ** 64), max_value=2 ** 64), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2 ** 63, True, None, "12", 0.5]))
FIELDS = ["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "layer_norm_epsilon",
          "initializer_range"]


@FUZZ
@given(values=st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUES, min_size=1, max_size=4))
def test_any_config_is_built_or_refused_in_one_line_and_any_built_one_is_estimated_or_refused(values):
    try:
        config = GPT2ScratchConfig(**{**dict(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1),
                                      **values})
    except ValueError as error:
        assert str(error).startswith("GPT2ScratchConfig: ") and "\n" not in str(error)
        assert any(name in str(error) for name in values), (values, error)
        return
    parts = training_memory(config, 8)
    assert all(isinstance(size, int) and size >= 0 for size in parts.values()) and parts["parameters"] > 0
    try:
        check_memory(training_args(), config, torch.device("cpu"))
    except ValueError as error:  # a huge one: refused with the estimate, never built
        assert str(error).startswith("this run needs at least ") and "\n" not in str(error)


def test_ctrl_c_before_training_is_one_line_and_exit_130(capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_script(interrupted)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted before training started: nothing to save\n"
