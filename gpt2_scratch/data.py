"""Training text, everywhere through `datasets`: a named source, local files, or a Hub dataset → token blocks.

Documents are cut into pieces of ~100 lines at places where GPT-2's splitter separates anyway, and the pieces are
tokenised in batches (`datasets.map`): `tokenizers` encodes a batch of strings on all cores, while one multi-megabyte
string is encoded on one core at a small fraction of the speed. The ids equal those of each whole document. Each
document ends with `<|endoftext|>`, then all tokens are concatenated and cut into `block_size` blocks (GPT-2's packing).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset
from transformers import PreTrainedTokenizerBase

from .bpe import CHAR_TO_BYTE
from .sources import LOADERS
from .tokenizer import pieces_of, read_text_file

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
VALIDATION_FRACTION = 0.1


def local_files(path: Path) -> tuple[str, list[Path]]:
    """The `datasets` builder and the files for a file or a folder of files of one supported kind."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"folder {path} has no {', '.join(BUILDERS)} files")
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        raise ValueError(f"folder {path} mixes file types ({', '.join(sorted(kinds))}); use one kind per folder")
    for file in files:
        if file.stat().st_size == 0:
            raise ValueError(f"{file} is empty")
    return kinds.pop(), files


def split_characters(text: str) -> DatasetDict:
    """The first 90% of the characters for training, the rest for validation (as the named `shakespeare` source)."""
    if not text.strip():
        raise ValueError("the corpus has no text")
    cut = int(len(text) * (1 - VALIDATION_FRACTION))
    return DatasetDict(train=Dataset.from_dict({"text": [text[:cut]]}),
                       validation=Dataset.from_dict({"text": [text[cut:]]}))


def load_corpus(spec: str, text_column: str = "text", seed: int = 0) -> DatasetDict:
    """`train` and `validation` splits with a `text` column, from a named source, a local path or a Hub dataset.

    Plain text (a file, or a folder of *.txt in sorted order) is split by characters, 90/10; tabular files and Hub
    datasets keep their own validation split, or hold out a seeded 10% of rows.
    """
    if spec in LOADERS:
        return LOADERS[spec]()
    path = Path(spec)
    if path.exists():
        builder, files = local_files(path)
        if builder == "text":
            return split_characters("".join(read_text_file(f) for f in files))
        dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train")
        return with_validation(select_text(dataset, text_column, spec), seed)
    if not looks_like_hub_id(spec):
        raise FileNotFoundError(f"{spec}: no such file or folder, and not a named corpus ({', '.join(LOADERS)})")
    hub = load_hub_dataset(spec, f"a named corpus ({', '.join(LOADERS)}) or a local path")
    if "validation" in hub:
        return DatasetDict(train=select_text(hub["train"], text_column, spec),
                           validation=select_text(hub["validation"], text_column, spec))
    return with_validation(select_text(hub["train"], text_column, spec), seed)


def load_hub_dataset(spec: str, instead: str) -> DatasetDict:
    """`datasets.load_dataset(spec)`, any failure reported as one ValueError that says what else `spec` is not."""
    try:
        return load_dataset(spec)
    except Exception as error:  # noqa: BLE001 - the Hub client raises many types; all mean "cannot load"
        raise ValueError(f"{spec!r} is not {instead}, and loading it as a Hub dataset failed: {error}") from error


def looks_like_hub_id(spec: str) -> bool:
    """`name` or `owner/name`: not absolute or relative, no file suffix (otherwise it is a missing local path)."""
    return (not spec.startswith(("/", ".", "~")) and spec.count("/") <= 1 and Path(spec).suffix not in BUILDERS
            and spec.replace("/", "").replace("-", "").replace("_", "").replace(".", "").isalnum())


def select_text(dataset: Dataset, text_column: str, where: str) -> Dataset:
    if text_column not in dataset.column_names:
        raise ValueError(f"{where}: no column {text_column!r}; its columns are {dataset.column_names}")
    dataset = dataset.select_columns([text_column]).rename_column(text_column, "text") if text_column != "text" \
        else dataset.select_columns(["text"])
    return dataset.filter(lambda row: bool(row["text"] and row["text"].strip()))


def with_validation(dataset: Dataset, seed: int) -> DatasetDict:
    if len(dataset) < 2:
        raise ValueError(f"need at least 2 non-empty texts to hold out a validation split, got {len(dataset)}")
    split = dataset.train_test_split(test_size=VALIDATION_FRACTION, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


def pieces_of_documents(batch: dict[str, list[str]]) -> dict[str, list]:
    """Explode documents into pieces, remembering which piece ends a document (it gets `<|endoftext|>`)."""
    pieces, ends = [], []
    for text in batch["text"]:
        parts = list(pieces_of(text, lines_per_piece=100))
        pieces.extend(parts)
        ends.extend([False] * (len(parts) - 1) + [True])
    return {"piece": pieces, "ends_document": ends}


def tokenize_lines(dataset: Dataset | IterableDataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["piece"], add_special_tokens=False)["input_ids"]
        return {"ids": [i + [tokenizer.eos_token_id] if end else i for i, end in zip(ids, batch["ends_document"])]}

    columns = dataset.column_names or ["text"]
    pieces = dataset.map(pieces_of_documents, batched=True, remove_columns=columns)
    return pieces.map(tokenize, batched=True, batch_size=64, remove_columns=["piece", "ends_document"])


def flat_tokens(tokenized: Dataset) -> np.ndarray:
    column = tokenized.data.column("ids").combine_chunks()
    return column.flatten().to_numpy().astype(np.int64)


def pack_blocks(tokens: np.ndarray, block_size: int, where: str) -> Dataset:
    """Consecutive, non-overlapping blocks; the tail shorter than a block is dropped."""
    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"{where} has {len(tokens)} tokens, fewer than one block of {block_size}; give more text or a smaller "
            "context_length"
        )
    return Dataset.from_dict({"input_ids": tokens[: n_blocks * block_size].reshape(n_blocks, block_size)})


def evaluation_windows(tokens: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Windows of `block_size` tokens overlapping by one, so every token after the first is scored exactly once."""
    if len(tokens) < 2:
        raise ValueError(f"the validation split has {len(tokens)} tokens; at least 2 are needed to score one")
    stride = block_size - 1
    return [tokens[start : start + block_size] for start in range(0, len(tokens) - 1, stride)]


def token_byte_lengths(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """UTF-8 bytes each token stands for: byte-level BPE spells one byte per character; special tokens add none."""
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    for token, index in tokenizer.get_vocab().items():
        if index not in special:
            lengths[index] = len(token) if all(c in CHAR_TO_BYTE for c in token) else len(token.encode("utf-8"))
    return lengths


def streaming_blocks(files: list[Path], builder: str, tokenizer: PreTrainedTokenizerBase, block_size: int,
                     text_column: str) -> Iterator[dict[str, list[int]]]:
    """Blocks tokenised and packed on the fly from an `IterableDataset`: no preprocessing pass, memory bounded by the
    largest document. A .txt file is one document, as without streaming (shard big corpora into many files)."""
    options = {"sample_by": "document"} if builder == "text" else {}
    stream = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **options)
    if builder != "text":  # a stream does not know its columns up front, so select_text cannot check them
        stream = stream.select_columns([text_column]).rename_column(text_column, "text") \
            if text_column != "text" else stream.select_columns(["text"])
    buffer: list[int] = []
    for row in tokenize_lines(stream, tokenizer):
        buffer.extend(row["ids"])
        while len(buffer) >= block_size:
            yield {"input_ids": buffer[:block_size]}
            buffer = buffer[block_size:]
