"""Writing output folders so that an interrupted run never leaves one that looks complete."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "encoder.json")  # any one of them makes a tokenizer folder


@contextlib.contextmanager
def replace_dir_atomically(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it replaces `out` with one rename, on error it is
    deleted and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """Yield a hidden folder inside `out` to write a model folder into; on success its files move into `out` with
    the config last, so `from_pretrained(out)` never finds a half-written model. `out` may already hold checkpoints."""
    out = Path(out)
    staging = out / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for file in sorted(staging.iterdir(), key=lambda p: p.name in ("config.json", "adapter_config.json")):
        if file.is_dir():
            shutil.rmtree(out / file.name, ignore_errors=True)
        file.replace(out / file.name)
    staging.rmdir()


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    """Save the tokenizer of `source`, if it has one, into the model folder `dest` with stock GPT-2's settings and
    `model_max_length` = the context in `dest`'s config.json (and, for GPT-2's pipeline, vocab.json + merges.txt),
    so the converted folder works with AutoTokenizer and with the tools that read GPT-2 folders."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    from .tokenizer import load_gpt2_tokenizer, with_stock_settings

    source, dest = Path(source), Path(dest)
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        return []
    config = json.loads((dest / "config.json").read_text())
    context = config.get("n_positions") or config["context_length"]
    # Without tokenizer.json: GPT-2's BPE files, in transformers' or OpenAI's format.
    tokenizer = AutoTokenizer.from_pretrained(source) if (source / "tokenizer.json").is_file() \
        else load_gpt2_tokenizer(source)
    stock = with_stock_settings(tokenizer, context)
    written = [Path(f).name for f in stock.save_pretrained(dest)]
    if isinstance(stock, GPT2Tokenizer):  # GPT-2's own two files too, as stock GPT-2 folders have them
        written += [Path(f).name for f in stock.backend_tokenizer.model.save(str(dest))]
    return written


@contextlib.contextmanager
def staged_file(out: str | Path) -> Iterator[Path]:
    """Yield a hidden path beside `out`, with its suffix (which names the format to writers like matplotlib); on
    success it is renamed to `out`, on error deleted, so `out` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
