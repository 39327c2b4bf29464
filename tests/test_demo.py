"""`make demo`'s code path end to end on the real corpus, with a seconds-long training budget, in this process
(`python -m gpt2_scratch.demo` is its `main()`)."""

from __future__ import annotations

from gpt2_scratch.demo import main


def test_demo_trains_reports_and_generates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo writes runs/demo under the working directory
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main(["--minutes", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "gpt2-scratch generate" in out
    sample = out.split("--max-new-tokens ", 1)[1].split("\n", 1)[1]
    assert sample.lstrip().startswith("ROMEO:") and len(sample) > 40
    folder = tmp_path / "runs" / "demo"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss_curve.png"} <= {
        p.name for p in folder.iterdir()}
