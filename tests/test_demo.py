"""`make demo`'s code path end to end on the real corpus, with a seconds-long training budget, in this process
(`python -m gpt2_scratch.demo` is its `main()`)."""

from __future__ import annotations

import json
import math

from conftest import steady_clock

from gpt2_scratch import pretraining
from gpt2_scratch.demo import main


def test_demo_trains_reports_and_generates(tmp_path, monkeypatch, capsys):
    """The recipe's steps are given a time (0.25 s in float32, slower in bf16) and the training clock advances
    0.25 s a step, so the 3-second budget ends after step 13 (3.25 s) of the 10-minute recipe on any machine: enough
    to bring the validation loss well below an untrained model's ln 2048 (6.16 against 7.62)."""
    monkeypatch.chdir(tmp_path)  # the demo writes runs/demo under the working directory
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(pretraining, "step_seconds", lambda config, args: {"no": 0.25, "bf16": 0.5}[
        args.mixed_precision])
    steady_clock(monkeypatch, 0.25)
    assert main(["--minutes", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "timed steps: no 250 ms, bf16 500 ms; training in no" in out
    assert "bits per byte" in out and "gpt2-scratch generate" in out
    folder = tmp_path / "runs" / "demo"
    metrics = json.loads((folder / "metrics.json").read_text())
    start = math.log(pretraining.RECIPES[10].vocab_size)
    assert metrics["steps"] == 13 and metrics["loss"] < start - 1.0, (metrics, start)
    sample = out.split("--max-new-tokens ", 1)[1].split("\n", 1)[1]
    assert sample.lstrip().startswith("ROMEO:") and len(sample.split("ROMEO:", 1)[1].strip()) > 40
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss_curve.png"} <= {
        p.name for p in folder.iterdir()}
