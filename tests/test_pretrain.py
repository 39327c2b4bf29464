"""training/pretrain.py end to end on tiny models: output folder, exact resume, SIGKILL, 2 processes, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TEXT,
    TWO_PROCESSES,
    assert_clear_failure,
    assert_ok,
    run_without_package,
    steady_clock,
    tiny_config,
    tiny_pretraining,
    training_script,
)
from safetensors.torch import load_file
from transformers import AutoTokenizer

from gpt2_scratch.checkpoints import latest_checkpoint, write_manifest
from gpt2_scratch.hub import push_folder
from gpt2_scratch.pretraining import Recipe, build_parser, recipe_arguments

TINY = tiny_pretraining(learning_rate="3e-3", warmup_steps=2, logging_steps=2, seed=7, drop_rate=0.1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "hamlet.txt"
    path.write_text((TEXT.replace(". ", ".\n") + "\n") * 6)
    return path


def pretrain(args: list[str], launcher: list[str] | None = None, cache: Path | None = None,
             **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    return training_script("pretrain.py", args, launcher, cache, **popen)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory) -> Path:
    """8 steps, checkpoint every 4, evaluation every 4: the reference every resume must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("full")
    result = pretrain(["--dataset", str(corpus), "--output_dir", str(out), "--max_steps", "8", "--save_steps", "4",
                       "--eval_steps", "4", *TINY])
    assert_ok(result)
    return out


def test_output_folder_is_hub_ready(full_run, tmp_path):
    names = {p.name for p in full_run.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_gpt2_scratch.py", "configuration_gpt2_scratch.py",
            "tokenizer.json", "README.md", "loss_curve.png", "metrics.json", "checkpoint-4", "checkpoint-8",
            "runs"} <= names
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["steps"] == 8 and 0 < metrics["bits_per_byte"] < 20
    card = (full_run / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: text-generation" in card
    assert "license: mit" in card and f"{metrics['bits_per_byte']:.4f}" in card and "trust_remote_code=True" in card
    assert list((full_run / "runs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    result = run_without_package(
        f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(full_run)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(full_run)!r}, trust_remote_code=True)
        ids = tokenizer("To be, or not", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + 5
        assert model.config.eos_token_id == tokenizer.eos_token_id == len(tokenizer) - 1
        print("OK")
        """,
        cwd=tmp_path,
    )
    assert_ok(result)


def test_resume_from_step_4_gives_the_uninterrupted_weights(full_run, corpus, tmp_path):
    """`latest` passes over a newer checkpoint whose weights were cut short (a full disk, a truncated copy), says so,
    and resumes from the intact one before it."""
    shutil.copytree(full_run / "checkpoint-4", tmp_path / "checkpoint-4")
    shutil.copytree(full_run / "checkpoint-8", tmp_path / "checkpoint-8")
    with open(tmp_path / "checkpoint-8" / "model.safetensors", "r+b") as weights_file:
        weights_file.truncate(4)  # safetensors alone would fail with "invalid header length"
    result = pretrain(["--dataset", str(corpus), "--output_dir", str(tmp_path), "--max_steps", "8", "--save_steps",
                       "4", "--eval_steps", "4", "--resume_from_checkpoint", "latest", *TINY])
    assert_ok(result)
    assert "skipped checkpoint-8: model.safetensors is 4 bytes where the manifest says" in result.stdout
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    assert_same_weights(full_run, tmp_path)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_muon_run_resumes_exactly(corpus, tmp_path, precision):
    """Muon and AdamW each keep their state and schedule in the checkpoint: a resumed run matches bit for bit, also
    under bf16 autocast (bf16 Newton-Schulz, float32 attention)."""
    args = ["--dataset", str(corpus), "--max_steps", "6", "--save_steps", "3", "--optimizer", "muon",
            "--muon_learning_rate", "0.02", "--mixed_precision", precision, *TINY]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert_ok(pretrain([*args, "--output_dir", str(full)]))
    assert {"optimizer.bin", "optimizer_1.bin", "scheduler.bin", "scheduler_1.bin"} <= {
        p.name for p in (full / "checkpoint-3").iterdir()}
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    result = pretrain([*args, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert_ok(result)
    assert "at step 3" in result.stdout
    assert_same_weights(full, resumed)
    card = (full / "README.md").read_text()
    assert "Muon lr 0.02 (5 Newton-Schulz steps)" in card and f"mixed precision {precision}." in card


def test_recipe_arguments_fit_the_budget_in_a_precision(tokenizer, tmp_path):
    """A recipe becomes pretrain.py arguments: the budget with the decay on the clock, warmup sized by the time of a
    step, and the mixed precision pinned, or the faster of both ("fastest"). The step times are given (`step_time`):
    what is about the logic is tested without timing; benchmarks/ measures."""
    tokenizer.save_pretrained(tmp_path)
    model = dict(emb_dim=32, n_heads=2, n_layers=2, context_length=16)
    timed, seconds = [], {"no": 0.02}

    def step_time(config, args) -> float:  # what timing a step of each precision measured, here made up
        timed.append((config.emb_dim, config.context_length, config.vocab_size, args.mixed_precision))
        return seconds[args.mixed_precision]

    # A minute at 0.02 s a step holds 3,000 steps, at 0.01 s 6,000: warmup over 5% of them.
    for recipe, bf16_seconds, chosen, warmup in [(Recipe(model, 320, 4, 3e-3, "muon", mixed_precision="no"), 0.01,
                                                  "no", 150),
                                                 (Recipe(model, 320, 4, 3e-3, "muon"), 0.01, "bf16", 300),
                                                 (Recipe(model, 320, 4, 3e-3, "muon"), 0.04, "no", 150)]:
        timed.clear()
        seconds["bf16"] = bf16_seconds
        args = build_parser().parse_args(["--output_dir", "unused",
                                          *recipe_arguments(recipe, 1.0, tmp_path, step_time=step_time)])
        assert [t[3] for t in timed] == (["no"] if recipe.mixed_precision == "no" else ["no", "bf16"])
        assert all(t[:3] == (32, 16, 320) for t in timed)  # the recipe's model was timed
        assert args.mixed_precision == chosen and args.optimizer == "muon" and args.max_train_minutes == 1.0
        assert args.schedule_on_clock and args.max_steps == -1 and args.warmup_steps == warmup
        assert args.eval_steps == 0  # evaluated at the end only, unless `evaluations` asks for more


def test_partial_checkpoints_are_never_resumed(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "progress.json").write_text("{}")
    write_manifest(tmp_path / "checkpoint-4")
    (tmp_path / ".checkpoint-8.partial").mkdir()  # a save killed half-way
    (tmp_path / "checkpoint-12").mkdir()  # renamed but without its manifest: not ours
    (tmp_path / "checkpoint-12" / "progress.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


@pytest.fixture(scope="module")
def reference_60(corpus, tmp_path_factory) -> Path:
    """60 steps uninterrupted: what every killed or stopped run must end with, bit for bit, once resumed."""
    out = tmp_path_factory.mktemp("reference")
    assert_ok(pretrain(["--dataset", str(corpus), "--max_steps", "60", "--save_steps", "2", *TINY, "--output_dir",
                        str(out)]))
    return out


def test_pretraining_lowers_the_validation_loss_far_below_its_start(reference_60):
    """Learning: an untrained model predicts every token about equally (loss ln V); 60 seeded steps on the repeated
    Hamlet lines bring the validation loss over 2 nats below it (to 3.38 from ln 300 = 5.70). A loop that climbs the
    loss ends above ln V."""
    metrics = json.loads((reference_60 / "metrics.json").read_text())
    start = math.log(json.loads((reference_60 / "config.json").read_text())["vocab_size"])
    assert metrics["steps"] == 60 and metrics["loss"] < start - 2.0, (metrics, start)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_killed_or_stopped_mid_training_resumes_to_the_same_weights(corpus, tmp_path, reference_60, stop):
    """SIGKILL: the last complete checkpoint remains. SIGINT (Ctrl-C) and SIGTERM: the run stops at the end of the
    step it is in, saves a checkpoint there, says how to go on and exits 130 / 143. Either way the resumed run ends
    with the uninterrupted run's weights."""
    args = ["--dataset", str(corpus), "--max_steps", "60", "--save_steps", "2", *TINY]
    killed = tmp_path / "killed"
    process = pretrain([*args, "--output_dir", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    deadline = time.monotonic() + 300
    while latest_checkpoint(killed) is None or latest_checkpoint(killed).name == "checkpoint-2":
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(stop)
    stderr = process.communicate(timeout=120)[1]
    assert not (killed / "config.json").exists()  # no final model: the run did not finish
    last = latest_checkpoint(killed)
    if stop == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 128 + stop, stderr
        step = int(last.name.split("-")[1])
        assert 4 <= step < 60 and "Traceback" not in stderr
        assert (f"stopped by {stop.name} after step {step}: saved {last}; to go on, run the same command with "
                "--resume_from_checkpoint latest") in stderr.splitlines()
    result = pretrain([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    assert_ok(result)
    assert f"resumed from {last}" in result.stdout
    assert_same_weights(reference_60, killed)


def test_ctrl_c_stops_every_process_at_the_same_step(corpus, tmp_path):
    """Ctrl-C reaches every process of `accelerate launch` (the terminal signals the whole group, and the launcher
    forwards it again): all processes agree on one step, each saves its part of one verified checkpoint, and the
    line saying how to go on is printed once."""
    out = tmp_path / "out"
    process = pretrain(["--dataset", str(corpus), "--output_dir", str(out), "--max_steps", "100000", "--eval_steps",
                        "1", *TINY], launcher=TWO_PROCESSES, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       start_new_session=True)
    for line in process.stdout:
        if line.startswith("step 1:"):  # both processes are in the loop: they evaluated step 1 together
            break
    os.killpg(process.pid, signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGINT, (process.returncode, stderr)  # as Ctrl-C leaves a shell
    last = latest_checkpoint(out)
    assert last is not None and {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in last.iterdir()}
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped by SIGINT")]
    assert stopped == [f"stopped by SIGINT after step {last.name.split('-')[1]}: saved {last}; to go on, run the same "
                       "command with --resume_from_checkpoint latest"], stderr


def test_two_processes_with_accelerate_launch(corpus, tmp_path):
    result = pretrain(["--dataset", str(corpus), "--output_dir", str(tmp_path), "--max_steps", "4",
                       "--save_steps", "2", *TINY], launcher=TWO_PROCESSES)
    assert_ok(result)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["bits_per_byte"] > 0
    assert (tmp_path / "checkpoint-4" / "random_states_1.pkl").is_file()  # each process saved its RNG
    assert "2 processes" in result.stdout


def test_streaming_from_a_local_file(corpus, tmp_path, full_run):
    result = pretrain(["--dataset", str(corpus), "--output_dir", str(tmp_path), "--streaming", "--tokenizer",
                       str(full_run), "--streaming_eval_blocks", "4", "--max_steps", "3", *TINY])
    assert_ok(result)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3


def test_streamed_blocks_are_the_files_tokens(corpus, full_run):
    from transformers import AutoTokenizer

    from gpt2_scratch.data import streaming_blocks

    tokenizer = AutoTokenizer.from_pretrained(full_run)
    blocks = [b["input_ids"] for b in streaming_blocks([corpus], "text", tokenizer, 32, "text")]
    expected = tokenizer(corpus.read_text())["input_ids"] + [tokenizer.eos_token_id]
    assert len(blocks) == len(expected) // 32
    assert [i for block in blocks for i in block] == expected[: len(blocks) * 32]


def test_wall_clock_budget_stops_cleanly_and_saves(corpus, tmp_path):
    result = pretrain(["--dataset", str(corpus), "--output_dir", str(tmp_path), "--max_steps", "100000",
                       "--save_steps", "1000", "--max_train_minutes", "0.0001", "--tokenizer_isolate_spaces",
                       "--tokenizer_split_digits", *TINY])
    assert_ok(result)
    assert "--max_train_minutes 0.0001 reached" in result.stdout
    steps = json.loads((tmp_path / "metrics.json").read_text())["steps"]
    assert 1 <= steps < 100000 and latest_checkpoint(tmp_path) == tmp_path / f"checkpoint-{steps}"
    assert "stopped by --max_train_minutes" in (tmp_path / "README.md").read_text()
    saved = AutoTokenizer.from_pretrained(tmp_path)  # the tokenizer trained with the two options
    assert saved.convert_ids_to_tokens(saved(" 42", add_special_tokens=False)["input_ids"]) == ["Ġ", "4", "2"]


def test_schedule_on_clock_decays_to_the_end_of_the_budget(corpus, tmp_path, monkeypatch):
    """No step count: warmup by steps, then the cosine follows the training clock and the run ends with the budget,
    the learning rate decayed to (nearly) nothing; the clock and the decay's start are checkpointed. The clock
    advances 0.25 s a step (`steady_clock`): the 6-second budget is 24 steps on any machine."""
    steady_clock(monkeypatch, 0.25)
    result = pretrain(["--dataset", str(corpus), "--output_dir", str(tmp_path), "--max_train_minutes", "0.1",
                       "--schedule_on_clock", "--save_steps", "1000000", "--logging_steps", "1", *TINY])
    assert_ok(result)
    assert "optimizer steps for 0.1 minutes" in result.stdout
    assert "the learning rate has decayed to its end" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 25  # the first reading past 6 s is step 25's (25 x 0.25 s)
    progress = json.loads((latest_checkpoint(tmp_path) / "progress.json").read_text())
    assert progress["step"] == 25 and progress["seconds"] == 6.25
    rates = {h["step"]: h["train/lr"] for h in progress["history"] if "train/lr" in h}  # every 2 steps (TINY)
    # warmup_steps 2 from TINY, then half a cosine over the clock from the end of warmup (step 2's reading, 0.5 s) to
    # the budget's 6 s: step k's rate follows its reading, 0.25 k s.
    assert progress["decay_start"] == 0.5 and sorted(rates) == list(range(2, 25, 2))
    for step, rate in rates.items():
        done = (0.25 * step - 0.5) / (6.0 - 0.5)
        assert rate == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * done)), abs=1e-12), step
    assert rates[2] == pytest.approx(3e-3) and rates[24] < 0.003 * 3e-3  # from the peak to nearly nothing
    card = (tmp_path / "README.md").read_text()
    assert "cosine decay ending with the 0.1-minute budget" in card and "stopped by" not in card


def test_schedule_on_clock_needs_a_budget(corpus, tmp_path):
    result = pretrain(["--dataset", str(corpus), "--output_dir", str(tmp_path / "out"), "--schedule_on_clock",
                       *TINY])
    assert_clear_failure(result, "--schedule_on_clock needs --max_train_minutes", tmp_path / "out")


def test_push_to_hub_uploads_the_folder_without_checkpoints(full_run, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["repo"] = repo_id
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        uploaded["commit_repo"] = repo_id
        # what huggingface_hub would send: each operation's bytes, read through the operation itself
        uploaded["bytes"] = {}
        for op in operations:
            with op.as_file() as handle:
                uploaded["bytes"][op.path_in_repo] = handle.read()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    push_folder(full_run, "someone/gpt2-scratch-test")
    assert uploaded["repo"] == uploaded["commit_repo"] == "someone/gpt2-scratch-test"
    files = sorted(uploaded["bytes"])
    uploaded["card"] = uploaded["bytes"]["README.md"].decode()
    for name, data in uploaded["bytes"].items():  # every file whole, as it is in the folder
        assert data == (full_run / name).read_bytes(), name
    assert {"README.md", "config.json", "model.safetensors", "modeling_gpt2_scratch.py",
            "configuration_gpt2_scratch.py", "tokenizer.json", "loss_curve.png", "metrics.json"} <= set(files)
    assert any(f.startswith("runs/") for f in files)
    assert not any(f.startswith("checkpoint-") for f in files)
    assert uploaded["card"].startswith("---\n") and "pipeline_tag: text-generation" in uploaded["card"]


BAD_CORPORA = {
    "missing": (None, "missing.txt: no such file or folder"),
    "empty": (b"", "empty.txt is empty"),
    "latin": ("café ".encode("latin-1") * 50, "latin.txt is not UTF-8 text"),
    "short": (b"To be, or not to be.\n" * 3, "fewer than one block of 32"),
}


@pytest.mark.parametrize("name", list(BAD_CORPORA))
def test_bad_corpus_gives_one_clear_message(tmp_path, name):
    content, message = BAD_CORPORA[name]
    dataset = tmp_path / f"{name}.txt"
    if content is not None:
        dataset.write_bytes(content)
    result = pretrain(["--dataset", str(dataset), "--output_dir", str(tmp_path / "out"), "--max_steps", "2", *TINY])
    assert_clear_failure(result, message, tmp_path / "out")


def test_tokenizer_larger_than_the_model_is_refused(corpus, tmp_path):
    result = pretrain(["--dataset", str(corpus), "--output_dir", str(tmp_path / "out"), "--max_steps", "2", *TINY,
                       "--tokenizer", "gpt2", "--vocab_size", "300"])
    assert_clear_failure(result, "the tokenizer has 50257 tokens but the model's vocab_size is 300", tmp_path / "out")


def test_recipe_arguments_space_the_evaluations_over_the_budget(tokenizer, tmp_path):
    """`make demo` evaluates during training: `evaluations` passes evenly spaced over the steps the budget holds as
    timed (warmup is 1/20 of them, so 4 passes fall every ~4 warmups); none by default."""
    tokenizer.save_pretrained(tmp_path)
    recipe = Recipe(dict(emb_dim=32, n_heads=2, n_layers=2, context_length=16), 320, 4, 3e-3, mixed_precision="no")
    # An hour's budget at a step's 0.5 s: 7,200 steps, warmup 360, a pass every 7,200 / 5 = 1,440 steps.
    args = build_parser().parse_args(["--output_dir", "unused", *recipe_arguments(
        recipe, 60, tmp_path, evaluations=4, step_time=lambda config, args: 0.5)])
    assert args.warmup_steps == 360 and args.eval_steps == 1440


def test_loss_curve_labels_each_validation_point(tmp_path):
    from gpt2_scratch.hub import save_loss_curve

    history = [{"step": s, "train/loss": 6.0 - s / 10} for s in range(5, 41, 5)]
    history += [{"step": s, "eval/loss": loss} for s, loss in ((10, 5.25), (20, 4.5), (30, 4.125), (40, 3.875))]
    save_loss_curve(history, tmp_path / "curve.svg")
    drawing = (tmp_path / "curve.svg").read_text()
    assert all(value in drawing for value in ("5.250", "4.500", "4.125", "3.875")) and "validation" in drawing


def test_closing_lets_go_of_the_prepared_model_before_the_process_group(tmp_path, monkeypatch):
    """DDP's reducer can hold the last reference to gloo's process group; freed after the group is destroyed it
    deadlocks on the GIL (TrainingLoop.close). So by the time end_training() runs, the prepared model is gone."""
    import weakref

    from gpt2_scratch.modeling_gpt2_scratch import GPT2ScratchForCausalLM
    from gpt2_scratch.pretraining import collate_blocks
    from gpt2_scratch.training import TrainingLoop, make_accelerator

    args = build_parser().parse_args(["--output_dir", str(tmp_path), "--max_steps", "1", "--logging_steps", "1",
                                      "--per_device_train_batch_size", "2"])
    accelerator = make_accelerator(args)
    blocks = [{"input_ids": torch.randint(0, 320, (16,))} for _ in range(4)]
    loop = TrainingLoop(accelerator, args, GPT2ScratchForCausalLM(tiny_config()), blocks, collate_blocks,
                        lambda model: {"eval/loss": 0.0})
    loop.run()
    prepared = weakref.ref(loop.model)
    alive_at_the_end = []
    monkeypatch.setattr(accelerator, "end_training", lambda: alive_at_the_end.append(prepared() is not None))
    loop.close()
    assert alive_at_the_end == [False]
