"""The token store (gpt2_scratch/token_store.py), bounded evaluation and fast stops: ids equal the tokenizer's, the
smallest type that holds them, reuse without tokenising, a new store when the input or the tokenizer changes, a
half-built store never used, --max_eval_samples, and SIGTERM during an evaluation."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import TEXT, assert_ok, tiny_config, tiny_pretraining, training_script
from datasets import Dataset
from tokenizers import models

from gpt2_scratch import GPT2ScratchForCausalLM, token_store
from gpt2_scratch.pretraining import language_model_evaluator
from gpt2_scratch.token_store import (
    cut_pieces,
    dataset_tokens,
    file_chunks,
    open_store,
    text_file_tokens,
    text_file_training_part,
)
from gpt2_scratch.tokenizer import byte_level, train_tokenizer, wrap

LINES = TEXT.replace(". ", ".\n").replace(", ", ",\n")  # many safe cuts: short lines between non-space characters


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(token_store, "PIECE_CHARS", 300)  # many pieces and batches from a small text
    monkeypatch.setattr(token_store, "BATCH_CHARS", 2000)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer([LINES], 300, show_progress=False)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stores(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "tokens").iterdir() if not p.name.startswith("."))


def test_files_stream_into_a_store_with_the_tokenizers_ids_and_a_held_out_tail(bpe, tmp_path, capsys):
    """Two files (one with Windows line ends) read as one document: the pieces cut while streaming, and the
    held-out cut near 90% of the bytes, tokenise as the whole text does; `<|endoftext|>` ends it."""
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(LINES[:3000].replace("\n", "\r\n").encode())
    second.write_text("é" + LINES[3000:] * 3, encoding="utf-8")
    text = LINES[:3000] + "é" + LINES[3000:] * 3
    assert "".join(file_chunks([first, second])) == text
    store = text_file_tokens([first, second], bpe, 0.1)
    assert store.tokens.dtype == np.uint16 and isinstance(store.tokens, np.memmap)
    assert store.tokens.tolist() == ids(bpe, text) + [bpe.eos_token_id] and store.documents == 1
    train_text = "".join(text_file_training_part([first, second], 0.1))
    assert text.startswith(train_text) and 0.88 < len(train_text.encode()) / len(text.encode()) < 0.95
    assert store.tokens[: store.held_out_start].tolist() == ids(bpe, train_text)
    assert "tokenising 2 files" in capsys.readouterr().out


def test_the_held_out_point_and_piece_cuts_fall_only_at_safe_cuts(monkeypatch):
    monkeypatch.setattr(token_store, "PIECE_CHARS", 50)
    text = LINES * 2
    chunks = [text[i : i + 97] for i in range(0, len(text), 97)]  # cuts straddle the reads
    pieces = list(cut_pieces(chunks, held_out_at=len(text) // 2))
    assert "".join(p.text for p in pieces) == text and [p.ends_document for p in pieces][-2:] == [False, True]
    for piece in pieces[:-1]:
        assert piece.text.endswith("\n") and not piece.text[-2].isspace()
    held = [p.held_out for p in pieces]
    assert held == sorted(held) and 0 < held.index(True)
    assert len("".join(p.text for p in pieces[: held.index(True)])) >= len(text) // 2


def test_a_vocabulary_over_65536_tokens_is_stored_as_uint32(tmp_path):
    alphabet = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [
        chr(c) for c in range(174, 256)] + [chr(256 + i) for i in range(68)]
    vocab = {token: i for i, token in enumerate(alphabet + [f"filler{i}" for i in range(70_000)])}
    large = wrap(byte_level(models.BPE(vocab=vocab, merges=[])))
    assert large.eos_token_id > 65_535
    store = dataset_tokens(Dataset.from_dict({"text": ["ab", "c d"]}), large, "two rows")
    assert store.dtype == np.uint32
    assert store.tolist() == [*ids(large, "ab"), large.eos_token_id, *ids(large, "c d"), large.eos_token_id]


def test_a_store_is_reused_and_rebuilt_when_the_file_or_the_tokenizer_changes(bpe, tmp_path, cache, capsys,
                                                                             monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LINES)
    text_file_tokens([corpus], bpe, 0.1)
    assert "tokenising" in capsys.readouterr().out

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as patched:
        patched.setattr(token_store, "encoded", no_tokenising)
        again = text_file_tokens([corpus], bpe, 0.1)  # reused: nothing is tokenised
    assert again.tokens.tolist() == ids(bpe, LINES) + [bpe.eos_token_id] and len(stores(cache)) == 1
    assert capsys.readouterr().out == ""
    corpus.write_text(LINES + "More text.\n")
    assert text_file_tokens([corpus], bpe, 0.1).tokens.tolist() == ids(bpe, LINES + "More text.\n") + [
        bpe.eos_token_id]
    other = train_tokenizer([LINES], 280, show_progress=False)
    assert text_file_tokens([corpus], other, 0.1).tokens.tolist() == ids(other, LINES + "More text.\n") + [
        other.eos_token_id]
    assert len(stores(cache)) == 3
    rows = Dataset.from_dict({"text": ["first row.", "second\nrow."]})
    expected = [*ids(bpe, "first row."), bpe.eos_token_id, *ids(bpe, "second\nrow."), bpe.eos_token_id]
    assert dataset_tokens(rows, bpe, "rows").tolist() == expected
    assert dataset_tokens(Dataset.from_dict({"text": ["first row.", "second\nrow."]}), bpe, "rows").tolist() \
        == expected and len(stores(cache)) == 4  # the same text in memory: the same store


def test_a_half_built_store_is_never_used(bpe, tmp_path, cache, monkeypatch):
    """Tokenising stopped half-way (Ctrl-C) leaves no store; a folder without its manifest, or with fewer ids than
    its manifest says (a disk that filled up), is built again."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LINES * 4)
    calls = []

    def interrupted(pieces, tokenizer, dtype):
        for batch in token_store_encoded(pieces, tokenizer, dtype):
            calls.append(len(batch[0]))
            if len(calls) == 2:
                raise KeyboardInterrupt
            yield batch

    token_store_encoded = token_store.encoded
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(token_store, "encoded", interrupted)
        text_file_tokens([corpus], bpe, 0.1)
    assert not (cache / "tokens").exists() or not list((cache / "tokens").iterdir())
    store = text_file_tokens([corpus], bpe, 0.1)
    expected = store.tokens.tolist()
    assert expected == ids(bpe, LINES * 4) + [bpe.eos_token_id]
    with open(store.folder / "tokens.bin", "r+b") as cut_short:
        cut_short.truncate(100)
    assert open_store(store.folder) is None
    assert text_file_tokens([corpus], bpe, 0.1).tokens.tolist() == expected
    (store.folder / "manifest.json").unlink()
    assert open_store(store.folder) is None
    assert text_file_tokens([corpus], bpe, 0.1).tokens.tolist() == expected
    assert json.loads((store.folder / "manifest.json").read_text())["tokens"] == len(expected)


def test_the_evaluator_scores_the_first_max_eval_samples_windows_in_chunks(monkeypatch):
    """Chunked scoring of the head's logits gives the loss of the full logits; max_samples takes the first windows."""
    from gpt2_scratch import pretraining

    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(tiny_config(vocab_size=320, context_length=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 320, 400).astype(np.uint16)
    lengths = np.ones(320, dtype=np.int64)
    accelerator = Accelerator(cpu=True)
    everything = language_model_evaluator(tokens, lengths, 16, 4, accelerator)
    first = language_model_evaluator(tokens, lengths, 16, 4, accelerator, max_samples=5)
    assert everything.tokens == 399 and first.tokens == 5 * 15
    monkeypatch.setattr(pretraining, "LOGIT_CHUNK", 320 * 7)  # 7 positions at a time
    with torch.no_grad():
        ids = torch.from_numpy(np.stack([tokens[start : start + 16] for start in range(0, 75, 15)]).astype(np.int64))
        logits = model(input_ids=ids).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), ids[:, 1:].reshape(-1)).item()
        assert first(model)["eval/loss"] == pytest.approx(expected, rel=1e-5)
        assert first(model)["eval/bits_per_byte"] == pytest.approx(expected / np.log(2), rel=1e-5)


TINY = tiny_pretraining(logging_steps=1, seed=3)


def test_max_eval_samples_bounds_the_score_and_says_what_it_covered(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(LINES * 4)
    result = training_script("pretrain.py", ["--train_file", str(corpus), "--output_dir", str(tmp_path / "out"),
                                             "--max_steps", "2", "--max_eval_samples", "3", *TINY])
    assert_ok(result)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_tokens"] == 3 * 31
    assert f"validation bits per byte {metrics['bits_per_byte']:.4f} over 93 tokens" in result.stdout
    assert "evaluation: 93 tokens of the " in result.stdout


def test_sigterm_during_an_evaluation_ends_it_saves_the_last_step_and_exits_143(tmp_path, monkeypatch):
    """A real SIGTERM, sent to this process while the evaluation after step 1 scores its third batch of ~80: the
    evaluation ends there (no fourth batch), the run saves step 1 and exits 143 with its one line."""
    from gpt2_scratch import pretraining

    corpus, validation = tmp_path / "train.txt", tmp_path / "validation.txt"
    corpus.write_text(LINES * 4)
    validation.write_text(LINES * 2)
    batches = []

    def scored(model, ids):
        batches.append(len(ids))
        if len(batches) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return score(model, ids)

    score = pretraining.summed_next_token_loss
    monkeypatch.setattr(pretraining, "summed_next_token_loss", scored)
    out, before = tmp_path / "out", signal.getsignal(signal.SIGTERM)
    result = training_script("pretrain.py", [
        "--train_file", str(corpus), "--validation_file", str(validation), "--output_dir", str(out), "--max_steps",
        "50", "--eval_steps", "1", "--max_eval_samples", "1000000", "--per_device_eval_batch_size", "1", *TINY])
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert len(batches) == 3 and "evaluation: " in result.stdout and "step 1:" not in result.stdout
    assert result.stderr.count("stopped by") == 1 and (  # the one line (after the progress bar's, in-process)
        f"stopped by SIGTERM during the evaluation after step 1: saved {out}/checkpoint-1; to go on, run the same "
        "command with --resume_from_checkpoint latest\n") in result.stderr
    progress = json.loads((out / "checkpoint-1" / "progress.json").read_text())
    assert progress["step"] == 1 and not (out / "config.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the script's handlers are gone


def test_sigterm_before_the_training_loop_is_one_line_and_exit_143(capsys):
    """While data is downloaded or tokenised (here: a stand-in that takes its time), SIGTERM ends the script at once
    with one line and the shell's status for it; a token store being built is deleted on the way out (above)."""
    from gpt2_scratch.training import run_script

    def tokenising() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler raises before this ends
            sum(range(10_000))
        raise AssertionError("not stopped")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        run_script(tokenising)
    assert exit_info.value.code == 143
    assert capsys.readouterr().err == "stopped by SIGTERM before training started: nothing to save\n"
    assert signal.getsignal(signal.SIGTERM) is before
