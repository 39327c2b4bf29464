"""Training text, everywhere through `datasets`: a named source, local files, or a Hub dataset → token blocks.

Pretraining tokenises each corpus once into a memory-mapped token store (`token_store`) and reads `TokenBlocks`
from it. Documents are cut into pieces at places where GPT-2's splitter separates anyway and tokenised in batches
(`tokenizers` encodes a batch of strings on all cores; one multi-megabyte string goes on one core at a small
fraction of the speed); the ids equal those of each whole document. Each document ends with `<|endoftext|>`; the
blocks are consecutive `block_size` slices of all tokens (GPT-2's packing). `--streaming` tokenises on the fly.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset
from transformers import PreTrainedTokenizerBase

from .bpe import CHAR_TO_BYTE
from .sources import LOADERS
from .token_store import cut_pieces, encoded, file_chunks
from .tokenizer import pieces_of, read_text_file


def add_data_arguments(parser: argparse.ArgumentParser, default: str, named: Iterable[str],
                       files: str) -> argparse._ArgumentGroup:
    """The data arguments of transformers' example scripts (run_clm.py, run_classification.py): `--dataset_name` (one
    of our `named` sources, or a Hub dataset) with `--dataset_config_name`, or local `--train_file`s; optional
    `--validation_file`s and `--test_file`s. `--dataset` (a name or files) is this project's older spelling.
    `check_data_arguments` settles them after parsing."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=None,
                      help=f"a named source ({', '.join(named)}) or a Hub dataset; default {default} when no "
                           "--train_file is given")
    data.add_argument("--dataset_config_name", default=None, help="the configuration of the Hub dataset, if it has "
                                                                  "several")
    data.add_argument("--train_file", nargs="+", default=None, help=f"local training data: {files}")
    data.add_argument("--validation_file", nargs="+", default=None,
                      help="local validation data, instead of holding out part of the training data")
    data.add_argument("--test_file", nargs="+", default=None, help="local test data, scored once after training")
    data.add_argument("--dataset", nargs="+", default=None, metavar="NAME_OR_FILE",
                      help="older spelling: a name acts as --dataset_name, files as --train_file")
    parser.set_defaults(default_dataset=default)
    return data


def check_data_arguments(args: argparse.Namespace) -> None:
    """Resolve `--dataset` into `--dataset_name` or `--train_file`, refuse two sources, fill in the default."""
    older, default = vars(args).pop("dataset", None), vars(args).pop("default_dataset", None)
    if older:
        if args.dataset_name or args.train_file:
            raise ValueError("--dataset is the older spelling of --dataset_name / --train_file; give only one")
        if len(older) == 1 and not Path(older[0]).exists() and looks_like_hub_id(older[0]):
            args.dataset_name = older[0]
        else:
            args.train_file = older
    if args.dataset_name and args.train_file:
        raise ValueError(f"--dataset_name {args.dataset_name} and --train_file {' '.join(args.train_file)} are two "
                         "sources of training data; give one")
    if not args.train_file:
        args.dataset_name = args.dataset_name or default
    if args.dataset_config_name and not args.dataset_name:
        raise ValueError("--dataset_config_name chooses a configuration of a --dataset_name; local files have none")


def data_stem(args: argparse.Namespace) -> str:
    """The training data's name as a repository name would end: `owner/name` → name, `dir/file.txt` → file."""
    return Path(args.train_file[0] if args.train_file else args.dataset_name).stem


def data_name(args: argparse.Namespace) -> str:
    """The training data in a few words, for model cards and messages."""
    if args.train_file:
        return ", ".join(Path(f).name for f in args.train_file)
    return args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")


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


def local_files_of(specs: list[str], where: str) -> tuple[str, list[Path]]:
    """`local_files` of several files or folders, which must hold one kind of file between them."""
    builders, files = set(), []
    for spec in specs:
        if not Path(spec).exists():
            raise FileNotFoundError(f"{where} {spec}: no such file or folder")
        builder, found = local_files(Path(spec))
        builders.add(builder)
        files += found
    if len(builders) > 1:
        raise ValueError(f"{where} {' '.join(specs)}: mixes file types ({', '.join(sorted(builders))}); use one kind")
    return builders.pop(), files


def local_texts(specs: list[str], text_column: str, where: str) -> tuple[str, Dataset]:
    """The builder and a `text` dataset of local files: plain text is one document (files joined in order),
    tabular files give one row per non-empty text."""
    builder, files = local_files_of(specs, where)
    if builder == "text":
        return builder, Dataset.from_dict({"text": ["".join(read_text_file(f) for f in files)]})
    dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train")
    return builder, select_text(dataset, text_column, " ".join(specs))


def load_corpus(spec: str, text_column: str = "text", seed: int = 0, config: str | None = None) -> DatasetDict:
    """`train` and `validation` splits with a `text` column, from a named source, a local path or a Hub dataset
    (`config`: its configuration).

    Plain text (a file, or a folder of *.txt in sorted order) is split by characters, 90/10; tabular files and Hub
    datasets keep their own validation split, or hold out a seeded 10% of rows.
    """
    if spec in LOADERS:
        if config:
            raise ValueError(f"the named corpus {spec} has no configurations; drop --dataset_config_name")
        return LOADERS[spec]()
    if Path(spec).exists() and not config:  # with a configuration, a folder is a clone of a Hub dataset
        builder, texts = local_texts([spec], text_column, "")
        return split_characters(texts["text"][0]) if builder == "text" else with_validation(texts, seed)
    if not looks_like_hub_id(spec) and not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such file or folder, and not a named corpus ({', '.join(LOADERS)})")
    hub = load_hub_dataset(spec, f"a named corpus ({', '.join(LOADERS)}) or a local path", config)
    if "validation" in hub:
        return DatasetDict(train=select_text(hub["train"], text_column, spec),
                           validation=select_text(hub["validation"], text_column, spec))
    return with_validation(select_text(hub["train"], text_column, spec), seed)


def train_corpus(args: argparse.Namespace) -> DatasetDict:
    """train and validation `text` splits from the data arguments (`add_data_arguments`), without the
    --validation_file and --test_file: with a --validation_file, no part of the training data is held out."""
    if args.train_file:
        builder, texts = local_texts(args.train_file, args.text_column, "--train_file")
        if args.validation_file:
            return DatasetDict(train=texts)
        return split_characters(texts["text"][0]) if builder == "text" else with_validation(texts, args.seed)
    return load_corpus(args.dataset_name, args.text_column, args.seed, args.dataset_config_name)


def training_corpus(args: argparse.Namespace) -> DatasetDict:
    """train, validation (and test) `text` splits from the data arguments (`add_data_arguments`): a
    --validation_file replaces the held-out part; a --test_file adds a test split."""
    corpus = train_corpus(args)
    for split in ("validation", "test"):
        files = getattr(args, f"{split}_file")
        if files:
            corpus[split] = local_texts(files, args.text_column, f"--{split}_file")[1]
    return corpus


def load_hub_dataset(spec: str, instead: str, config: str | None = None) -> DatasetDict:
    """`datasets.load_dataset(spec, config)`, any failure reported as one ValueError that says what else `spec` is
    not."""
    try:
        return load_dataset(spec, config)
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


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive, non-overlapping blocks of `block_size` tokens read from `tokens` (a memory-mapped store) when
    asked for; the tail shorter than a block is dropped. A sampler gives the order; each process reads its own."""

    def __init__(self, tokens: np.ndarray, block_size: int, where: str) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.count = len(tokens) // block_size
        if self.count == 0:
            raise ValueError(f"{where} has {len(tokens)} tokens, fewer than one block of {block_size}; give more text "
                             "or a smaller context_length")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.block_size
        return {"input_ids": torch.from_numpy(self.tokens[start : start + self.block_size].astype(np.int64))}


def evaluation_windows(tokens: np.ndarray, block_size: int, limit: int | None = None) -> list[np.ndarray]:
    """The first `limit` (default: all) windows of `block_size` tokens overlapping by one, so every token after the
    first they cover is scored exactly once."""
    if len(tokens) < 2:
        raise ValueError(f"the validation split has {len(tokens)} tokens; at least 2 are needed to score one")
    stride = block_size - 1
    starts = range(0, len(tokens) - 1, stride)
    return [tokens[start : start + block_size] for start in (starts if limit is None else starts[:limit])]


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
    """Blocks tokenised and packed on the fly: no preprocessing pass, no store. Each .txt file is one document, read
    a megabyte at a time as the token store reads it; tabular files stream through an `IterableDataset`, memory
    bounded by the largest row."""
    if builder == "text":
        pieces = itertools.chain.from_iterable(cut_pieces(file_chunks([file])) for file in files)
        batches = (ids for ids, _ in encoded(pieces, tokenizer, np.dtype(np.int64)))
    else:  # a stream does not know its columns up front, so select_text cannot check them
        stream = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
        stream = stream.select_columns([text_column]).rename_column(text_column, "text") \
            if text_column != "text" else stream.select_columns(["text"])
        batches = (np.asarray(row["ids"], dtype=np.int64) for row in tokenize_lines(stream, tokenizer))
    buffer = np.zeros(0, dtype=np.int64)
    for ids in batches:
        buffer = np.concatenate([buffer, ids])
        blocks = len(buffer) // block_size
        for index in range(blocks):
            yield {"input_ids": buffer[index * block_size : (index + 1) * block_size].tolist()}
        buffer = buffer[blocks * block_size :]
