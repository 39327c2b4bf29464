"""Writing output folders so that an interrupted run never leaves one that looks complete."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
