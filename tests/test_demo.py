"""`make demo`'s code path, end to end on the real corpus, with a seconds-long training budget."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import assert_ok


def test_demo_trains_reports_and_generates(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-m", "gpt2_scratch.demo", "--minutes", "0.05"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=env)
    assert_ok(result)
    out = result.stdout
    assert "bits per byte" in out and "gpt2-scratch generate" in out
    sample = out.split("--max-new-tokens ", 1)[1].split("\n", 1)[1]
    assert sample.lstrip().startswith("ROMEO:") and len(sample) > 40
    folder = tmp_path / "runs" / "demo"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss_curve.png"} <= {
        p.name for p in folder.iterdir()}
