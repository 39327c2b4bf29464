"""Byte-level BPE tokenizers built on the `tokenizers` library: train your own, or load OpenAI's GPT-2 BPE.

Both are transformers `PreTrainedTokenizerFast` objects with GPT-2's layout: the byte alphabet and the merges, then
the single special token `<|endoftext|>` at the **last** id (50256 in GPT-2), which is bos, eos and padding.

Saved settings. Every tokenizer the project writes carries stock GPT-2's settings, so tools that read GPT-2 folders
(CTranslate2, lm-eval, TRL, vLLM) take it as they take OpenAI's: `<|endoftext|>` as bos, eos, padding and unknown
token, `model_max_length` = the model's context, and `tokenizer_class` "GPT2Tokenizer" when the pipeline is GPT-2's
own. A tokenizer with its own pre-tokenisation (isolated spaces, split digits) is saved as "TokenizersBackend", which
reads `tokenizer.json` as it is: transformers' GPT2Tokenizer rebuilds GPT-2's pre-tokeniser and would split text
differently.

Padding policy. GPT-2 has no padding token, so we pad with `<|endoftext|>` (the vocabulary stays exactly GPT-2's)
and always pass an attention mask. Labels are masked from the attention mask, never by token id
(see `causal_lm_labels`): an `<|endoftext|>` that ends a real sequence stays a training target, so the model learns
to stop, while the padding after it is ignored. (transformers' `DataCollatorForLanguageModeling` masks every token
equal to the pad id, which would hide every end-of-text from the loss.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .files import replace_dir_atomically
from .sources import fetch

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "encoder.json")  # any one of them makes a tokenizer folder
BYTE_ALPHABET_SIZE = 256
VERY_LARGE = int(1e30)  # transformers' "no limit" for model_max_length


def byte_level(model: models.BPE, isolate_spaces: bool = False, split_digits: bool = False) -> Tokenizer:
    """A Tokenizer around `model` with GPT-2's pre-tokenisation regex and byte-to-unicode mapping.

    GPT-2 glues a space to the word after it, so "cat" after a newline and " cat" after a space are unrelated tokens;
    `isolate_spaces` makes every space its own token, so a word has one token wherever it stands (copying it is
    then an identity). `split_digits` gives each digit its own token, so numbers are written digit by digit.
    """
    tokenizer = Tokenizer(model)
    steps = [pre_tokenizers.Split(" ", behavior="isolated")] if isolate_spaces else []
    steps += [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*steps, gpt2_split]) if steps else gpt2_split
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tokenizer


def splits_like_gpt2(tokenizer: Tokenizer) -> bool:
    """GPT-2's pre-tokeniser and decoder, exactly: what transformers' GPT2Tokenizer rebuilds when it loads a folder."""
    pre = tokenizer.pre_tokenizer
    return (isinstance(pre, pre_tokenizers.ByteLevel) and not pre.add_prefix_space and pre.use_regex
            and isinstance(tokenizer.decoder, decoders.ByteLevel) and tokenizer.normalizer is None)


def wrap(tokenizer: Tokenizer, model_max_length: int = VERY_LARGE) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around `tokenizer` with stock GPT-2's settings (see the module's docstring)."""
    stock = GPT2Tokenizer if splits_like_gpt2(tokenizer) else PreTrainedTokenizerFast
    return stock(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def with_stock_settings(tokenizer: PreTrainedTokenizerBase, model_max_length: int) -> PreTrainedTokenizerFast:
    """`tokenizer` (same ids, same pipeline) with stock GPT-2's saved settings and the model's context: what every
    folder the project writes holds, even when the tokenizer came from an older folder or elsewhere."""
    if ENDOFTEXT not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no {ENDOFTEXT} token; a GPT-2 tokenizer needs it as bos, eos and padding")
    return wrap(tokenizer.backend_tokenizer, model_max_length)


def with_endoftext_last(trained: Tokenizer) -> Tokenizer:
    """The `tokenizers` trainer puts special tokens first; move `<|endoftext|>` to the last id, as GPT-2 has it."""
    model = json.loads(trained.to_str())["model"]
    vocab = {token: i - 1 for token, i in model["vocab"].items() if token != ENDOFTEXT}
    vocab[ENDOFTEXT] = len(vocab)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    rebuilt = byte_level(models.BPE(vocab=vocab, merges=merges))
    rebuilt.pre_tokenizer = trained.pre_tokenizer
    return rebuilt


def safe_cut(before: str, after: str) -> bool:
    """A single newline between two non-space characters: GPT-2's splitter separates there anyway."""
    return before.endswith("\n") and len(before) > 1 and not before[-2].isspace() and after[:1].strip() != ""


def pieces_of(text: str, lines_per_piece: int = 1000) -> Iterator[str]:
    """Cut a document into pieces of about `lines_per_piece` lines, only at safe cuts, so the pieces tokenize
    exactly like the whole text while `tokenizers` spreads them over all cores."""
    lines = text.splitlines(keepends=True)
    start = 0
    for i in range(1, len(lines)):
        if i - start >= lines_per_piece and safe_cut(lines[i - 1], lines[i]):
            yield "".join(lines[start:i])
            start = i
    yield "".join(lines[start:])


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (invalid byte at offset {error.start}); convert it, e.g. with "
            f"`iconv -f latin1 -t utf-8 {path.name}`"
        ) from error


def text_files(path: str | Path) -> list[Path]:
    """A text file, or every *.txt file in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"folder {path} has no *.txt files to read")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return [path]


def corpus_texts(corpus: str | Path | Iterable[str] | Dataset, column: str = "text") -> Iterator[str]:
    """Documents from a file or folder path (one per file), an iterable of strings, or a Dataset column."""
    if isinstance(corpus, (str, Path)):
        for file in text_files(corpus):
            yield read_text_file(file)
    elif isinstance(corpus, Dataset):
        if column not in corpus.column_names:
            raise ValueError(f"dataset has no column {column!r}; its columns are {corpus.column_names}")
        yield from corpus[column]
    else:
        yield from corpus


def train_tokenizer(
    corpus: str | Path | Iterable[str] | Dataset,
    vocab_size: int,
    min_frequency: int = 2,
    column: str = "text",
    show_progress: bool = True,
    model_max_length: int = VERY_LARGE,
    isolate_spaces: bool = False,
    split_digits: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE with `vocab_size` tokens (bytes + merges + `<|endoftext|>`).

    `corpus`: a text file, a folder of *.txt files, an iterable of strings, or a `datasets.Dataset` (`column`).
    Merges are learned while the most frequent pair occurs at least `min_frequency` times.
    """
    smallest = BYTE_ALPHABET_SIZE + 1
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {BYTE_ALPHABET_SIZE}-byte alphabet plus {ENDOFTEXT}; "
            f"use at least {smallest}"
        )
    seen_text = False

    def pieces() -> Iterator[str]:
        nonlocal seen_text
        for text in corpus_texts(corpus, column):
            for piece in pieces_of(text):
                seen_text = seen_text or bool(piece.replace(ENDOFTEXT, "").strip())
                # The trainer would count the letters of "<|endoftext|>" as text; it is a separator, never merged.
                yield from piece.split(ENDOFTEXT)

    tokenizer = byte_level(models.BPE(), isolate_spaces, split_digits)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(ENDOFTEXT, special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text can be encoded
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(pieces(), trainer)
    if not seen_text:
        raise ValueError("the corpus is empty: no non-whitespace text to learn merges from")
    return wrap(with_endoftext_last(tokenizer), model_max_length)


def read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def load_gpt2_tokenizer(folder: str | Path | None = None, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """OpenAI's GPT-2 BPE from a folder holding `vocab.json` + `merges.txt` (transformers' format) or
    `encoder.json` + `vocab.bpe` (OpenAI's release); with no folder, from the pinned `gpt2_bpe` data source."""
    if folder is None:
        folder = fetch("gpt2_bpe")
    folder = Path(folder)
    for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (folder / vocab_name).is_file() and (folder / merges_name).is_file():
            vocab = json.loads((folder / vocab_name).read_text(encoding="utf-8"))
            merges = read_merges(folder / merges_name)
            return wrap(byte_level(models.BPE(vocab=vocab, merges=merges)), model_max_length)
    raise FileNotFoundError(
        f"{folder} holds neither vocab.json + merges.txt nor encoder.json + vocab.bpe (GPT-2 BPE files)"
    )


def causal_lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for a padded batch: the ids themselves, -100 exactly where the attention mask marks padding."""
    return input_ids.masked_fill(attention_mask == 0, -100)


@dataclass
class TokenizerReport:
    vocab_size: int
    bytes_per_token: float
    seconds: float


def bytes_per_token(tokenizer: PreTrainedTokenizerFast, documents: Iterable[str]) -> float:
    texts = [piece for text in documents for piece in pieces_of(text)]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    if n_tokens == 0:
        raise ValueError("the validation text is empty; cannot measure bytes per token")
    return n_bytes / n_tokens


def train_and_report(
    train: Iterable[str] | Dataset | str | Path,
    validation: Iterable[str],
    vocab_size: int,
    min_frequency: int,
    out: str | Path,
    isolate_spaces: bool = False,
    split_digits: bool = False,
) -> TokenizerReport:
    """Train, save to `out` (complete or not at all), and measure bytes per token on the validation texts."""
    start = time.perf_counter()
    tokenizer = train_tokenizer(train, vocab_size, min_frequency, isolate_spaces=isolate_spaces,
                                split_digits=split_digits)
    seconds = time.perf_counter() - start
    report = TokenizerReport(len(tokenizer), bytes_per_token(tokenizer, validation), seconds)
    with replace_dir_atomically(out) as tmp:
        tokenizer.save_pretrained(tmp)
    return report


def copy_tokenizer_files(source: Path, dest: Path) -> list[str]:
    """Save the tokenizer of `source`, if it has one, into the model folder `dest` with stock GPT-2's settings and
    `model_max_length` = the context in `dest`'s config.json (and, for GPT-2's pipeline, vocab.json + merges.txt),
    so the converted folder works with AutoTokenizer and with the tools that read GPT-2 folders."""
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
