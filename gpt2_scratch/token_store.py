"""A corpus tokenised once into a memory-mapped file of token ids, which every later run reads from disk.

A store is a folder `$GPT2_SCRATCH_CACHE/tokens/<key>/` holding `tokens.bin` (the ids, native byte order, uint16
while the vocabulary has at most 65,536 tokens, else uint32) and `manifest.json`. It is built under a temporary name
while the text streams through `tokenizers` (`encode_batch`, on every core) a few megabytes at a time, fsynced, then
renamed into place with its manifest written last: a folder whose manifest is missing, or whose `tokens.bin` is not
the size the manifest says, is not a store and is built again. Readers get a read-only `np.memmap`: the operating
system pages in what training touches, so memory does not grow with the corpus (nanoGPT's `prepare.py` layout).

The key is the tokenizer (a sha256 of its `tokenizer.json`, and its end-of-text id) and the input's identity:
- local files by resolved path, size and modification time (in nanoseconds): a cached start on a 1 GB corpus then
  reads three numbers instead of hashing a gigabyte (seconds), and an editor or `cp` that rewrites a file changes its
  mtime. (A file changed in place within the same nanosecond tick and to the same size would be missed.)
- a `datasets` split by its fingerprint when it is backed by Arrow cache files (datasets derives it from the data
  files and every operation applied), else by a sha256 of its text (in-memory datasets get random fingerprints).

Text is cut into pieces only where GPT-2's splitter separates anyway (a single newline between two non-space
characters), so the ids equal those of each whole document; every document ends with `<|endoftext|>`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .files import replace_dir_atomically
from .sources import cache_root

FORMAT = 1  # part of every key: a change of layout or of how text is cut builds new stores
TOKENS, MANIFEST = "tokens.bin", "manifest.json"
READ_BYTES = 1 << 20  # bytes read from a file at a time
PIECE_CHARS = 1 << 16  # a piece ends at the first safe cut after this many characters
BATCH_CHARS = 1 << 21  # characters per `encode_batch` call: enough pieces for every core, bounded memory
SAFE_CUT = re.compile(r"\S\n(?=\S)")  # `tokenizer.safe_cut`, found in a long string at once


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of a vocabulary of `vocab_size` tokens."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class Piece:
    text: str
    ends_document: bool = False
    held_out: bool = False  # after the held-out point of `cut_pieces`


def cut_pieces(chunks: Iterable[str], held_out_at: int | None = None) -> Iterator[Piece]:
    """The concatenated `chunks`, one document, as pieces of about PIECE_CHARS characters cut only at safe cuts (so
    they tokenise as the whole does), the last marked as ending the document. With `held_out_at` (a UTF-8 byte
    offset) a piece also ends at the first safe cut from there on, and the pieces after it are marked held out: the
    automatic validation split of plain text, found while streaming."""
    buffer, start, done, held_out, pending = "", 0, 0, False, None  # done: UTF-8 bytes of the pieces cut so far
    for chunk in chunks:
        buffer, start = buffer[start:] + chunk, 0
        while True:
            at = start + PIECE_CHARS
            if held_out_at is not None and not held_out:
                head = buffer[start:at].encode("utf-8")
                if done + len(head) >= held_out_at:  # the held-out point falls in this piece: cut there
                    at = start + len(head[: held_out_at - done].decode("utf-8", "ignore"))
            match = SAFE_CUT.search(buffer, max(at - 1, start)) if at <= len(buffer) else None
            if match is None:
                break  # more text is needed to find the cut
            if pending is not None:
                yield pending
            pending = Piece(buffer[start : match.end()], held_out=held_out)
            done += len(pending.text.encode("utf-8"))
            held_out = held_out or (held_out_at is not None and done >= held_out_at)
            start = match.end()
    rest = buffer[start:]
    if pending is not None and not rest:
        yield Piece(pending.text, ends_document=True, held_out=pending.held_out)
        return
    if pending is not None:
        yield pending
    yield Piece(rest, ends_document=True, held_out=held_out)


def file_chunks(files: list[Path]) -> Iterator[str]:
    """The text of `files` one after the other, a megabyte at a time, with universal newlines as `Path.read_text`
    reads it (`\\r\\n` and `\\r` become `\\n`); a file that is not UTF-8 is one ValueError naming it."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, carry = 0, ""
        with open(path, "rb") as stream:
            while True:
                data = stream.read(READ_BYTES)
                buffered = len(decoder.getstate()[0])  # bytes of a character cut by the previous read
                try:
                    text = carry + decoder.decode(data, final=not data)
                except UnicodeDecodeError as error:
                    raise ValueError(
                        f"{path} is not UTF-8 text (invalid byte at offset {offset - buffered + error.start}); "
                        f"convert it, e.g. with `iconv -f latin1 -t utf-8 {path.name}`") from error
                offset += len(data)
                carry = "\r" if data and text.endswith("\r") else ""  # a \r\n may straddle two reads
                text = text[: len(text) - len(carry)]
                if text:
                    yield text.replace("\r\n", "\n").replace("\r", "\n")
                if not data:
                    break


def encoded(pieces: Iterable[Piece], tokenizer: PreTrainedTokenizerBase, dtype: np.dtype) -> Iterator[
        tuple[np.ndarray, int | None]]:
    """The ids of `pieces` a batch at a time (`<|endoftext|>` after each document's last piece), each batch with the
    position within it where the held-out pieces begin, if they begin there."""
    backend, eos = tokenizer.backend_tokenizer, tokenizer.eos_token_id
    batch: list[Piece] = []
    size = 0

    def encode() -> tuple[np.ndarray, int | None]:
        ids = backend.encode_batch_fast([piece.text for piece in batch], add_special_tokens=False)
        lists, held_out, count = [], None, 0
        for piece, encoding in zip(batch, ids):
            if piece.held_out and held_out is None:
                held_out = count
            lists.append(encoding.ids)
            count += len(encoding.ids)
            if piece.ends_document:
                lists.append([eos])
                count += 1
        return np.fromiter((i for ids in lists for i in ids), dtype=dtype, count=count), held_out

    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= BATCH_CHARS:
            yield encode()
            batch, size = [], 0
    if batch:
        yield encode()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def files_identity(files: list[Path]) -> list[list]:
    return [[str(path.resolve()), stat.st_size, stat.st_mtime_ns] for path in files for stat in [path.stat()]]


def dataset_identity(dataset: Dataset) -> str:
    """The fingerprint of a split backed by Arrow files; a sha256 of the text of one held in memory."""
    if dataset.cache_files:
        return f"fingerprint {dataset._fingerprint}"
    digest = hashlib.sha256()
    for batch in dataset.iter(batch_size=1000):
        for text in batch["text"]:
            digest.update(text.encode("utf-8"))
            digest.update(b"\0")
    return f"sha256 {digest.hexdigest()}"


@dataclass(frozen=True)
class TokenStore:
    """The ids of a tokenised input, memory-mapped read-only; `held_out_start`: where the automatic validation
    split of plain text begins (None for a `datasets` split)."""

    folder: Path
    tokens: np.ndarray
    documents: int
    held_out_start: int | None


def open_store(folder: Path) -> TokenStore | None:
    """The store in `folder`, or None when there is none, or only part of one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        size = (folder / TOKENS).stat().st_size
    except (OSError, ValueError):
        return None
    dtype = np.dtype(manifest.get("dtype", "invalid")) if manifest.get("dtype") in ("uint16", "uint32") else None
    if manifest.get("format") != FORMAT or dtype is None or size != manifest.get("tokens", -1) * dtype.itemsize:
        return None
    tokens = np.memmap(folder / TOKENS, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return TokenStore(folder, tokens, manifest["documents"], manifest["held_out_start"])


def store_tokens(identity: object, pieces: Iterable[Piece], tokenizer: PreTrainedTokenizerBase,
                 what: str) -> TokenStore:
    """The store of the input `identity` names, built from its `pieces` (consumed only when there is none yet)."""
    key = hashlib.sha256(json.dumps([FORMAT, tokenizer_digest(tokenizer), tokenizer.eos_token_id, identity])
                         .encode()).hexdigest()[:32]
    folder = cache_root() / "tokens" / key
    store = open_store(folder)
    if store is not None:
        return store
    dtype = token_dtype(len(tokenizer))
    print(f"tokenising {what} once into {folder}", flush=True)
    count, documents, held_out_start, began = 0, 0, None, time.monotonic()

    def counting(pieces: Iterable[Piece]) -> Iterator[Piece]:
        nonlocal documents
        for piece in pieces:
            documents += piece.ends_document
            yield piece

    with replace_dir_atomically(folder) as partial:
        with open(partial / TOKENS, "wb") as out:
            for ids, held_out in encoded(counting(pieces), tokenizer, dtype):
                if held_out is not None and held_out_start is None:
                    held_out_start = count + held_out
                ids.tofile(out)
                count += len(ids)
            out.flush()
            os.fsync(out.fileno())
        manifest = {"format": FORMAT, "dtype": dtype.name, "tokens": count, "documents": documents,
                    "held_out_start": held_out_start, "input": identity, "tokenizer": tokenizer_digest(tokenizer)}
        with open(partial / MANIFEST, "w") as out:  # last: it makes the folder a store
            out.write(json.dumps(manifest, indent=1))
            out.flush()
            os.fsync(out.fileno())
    print(f"tokenised {what}: {count:,} tokens ({dtype.name}) in {time.monotonic() - began:.1f} s", flush=True)
    return open_store(folder)


def held_out_point(files: list[Path], fraction: float) -> int:
    """The UTF-8 byte offset from which plain text is held out for validation: the last `fraction` of the files'
    bytes (moved on to the next safe cut by `cut_pieces`)."""
    return int(sum(path.stat().st_size for path in files) * (1 - fraction))


def text_file_tokens(files: list[Path], tokenizer: PreTrainedTokenizerBase, fraction: float) -> TokenStore:
    """The store of plain-text `files`, read in order as one document, with the start of its last `fraction` (by
    bytes, at a safe cut) recorded as `held_out_start`."""
    held_out_at = held_out_point(files, fraction)
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    return store_tokens({"files": files_identity(files), "held_out_at": held_out_at},
                        cut_pieces(file_chunks(files), held_out_at), tokenizer,
                        f"{len(files)} file{'s' if len(files) > 1 else ''} ({megabytes:,.1f} MB)")


def text_file_training_part(files: list[Path], fraction: float) -> Iterator[str]:
    """The pieces of plain-text `files` before their held-out part (what a tokenizer is trained on)."""
    for piece in cut_pieces(file_chunks(files), held_out_point(files, fraction)):
        if piece.held_out:
            return
        yield piece.text


def dataset_tokens(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, what: str) -> np.ndarray:
    """The ids of a `datasets` split with a `text` column, one document per row, from its store."""
    def pieces() -> Iterator[Piece]:
        for batch in dataset.iter(batch_size=256):
            for text in batch["text"]:
                yield from cut_pieces([text])

    return store_tokens({"dataset": dataset_identity(dataset)}, pieces(), tokenizer,
                        f"{what} ({len(dataset):,} rows)").tokens
