"""What a user sees: each message one the project means to show (no library bars or notices it did not choose)."""

from __future__ import annotations

import io
import logging

import datasets
import torch
from accelerate import Accelerator
from conftest import tiny_config
from transformers.utils import logging as transformers_logging

from gpt2_scratch import GPT2ScratchForCausalLM, pretraining
from gpt2_scratch.checkpoints import TiedHeadNotice, save_checkpoint
from gpt2_scratch.loading import quiet_library_progress
from gpt2_scratch.training import Progress, ProgressBar


def test_where_output_is_not_a_terminal_training_progress_is_one_line_per_logged_loss():
    out = io.StringIO()
    bar = ProgressBar(100, 10.0, Progress(step=30, seconds=150.0), enabled=True, file=out, plain=True)
    bar.show(Progress(step=31, seconds=155.0))  # no loss logged: nothing written
    bar.show(Progress(step=60, seconds=300.0), loss=2.5)
    bar.close()
    assert out.getvalue() == "training: 05:00 elapsed, 03:20 left, step 60/100, loss 2.500\n"
    out = io.StringIO()
    steps = ProgressBar(100, None, Progress(step=3), enabled=True, file=out, plain=True)
    steps.show(Progress(step=5), loss=1.0)
    assert out.getvalue() == "training: step 5/100, loss 1.000\n"
    silent = ProgressBar(100, None, Progress(step=3), enabled=False, file=out, plain=True)
    silent.show(Progress(step=6), loss=1.0)  # another process than the first: nothing
    assert out.getvalue() == "training: step 5/100, loss 1.000\n"


def test_saving_a_checkpoint_says_nothing_of_the_tied_head(tmp_path, caplog):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = GPT2ScratchForCausalLM(tiny_config())
    accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    with caplog.at_level(logging.WARNING):
        save_checkpoint(accelerator, tmp_path, 1, {"step": 1})
    assert (tmp_path / "checkpoint-1").is_dir()
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]
    other = logging.LogRecord("accelerate.utils.other", logging.WARNING, "", 0,
                              "[RANK 0] Removed shared tensor {'transformer.pos_emb.weight'} while saving.", None, None)
    assert TiedHeadNotice().filter(other)  # a tensor left out that is not the tied head is still said


def test_the_commands_turn_off_library_progress_bars():
    try:
        datasets.enable_progress_bars()  # whatever an earlier command in this process left
        transformers_logging.enable_progress_bar()
        terminal = io.StringIO()
        terminal.isatty = lambda: True
        quiet_library_progress(terminal)
        assert not transformers_logging.is_progress_bar_enabled()
        assert datasets.is_progress_bar_enabled()  # on a terminal the datasets bars stay
        quiet_library_progress(io.StringIO())
        assert not datasets.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
        datasets.enable_progress_bars()


def test_each_model_option_says_its_own_help_once():
    text = pretraining.build_parser().format_help()
    assert text.count("overrides one of its fields") == 1 and text.count("the tokenizer's size") == 1
