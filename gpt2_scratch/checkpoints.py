"""Checkpoints that a kill, a full disk or a damaged copy cannot pass off as good.

A checkpoint is `accelerator.save_state` (model, optimizers, schedulers, every process's RNG state) plus the loop's
progress, written into a hidden folder, then a manifest of every file (size and sha256) written last, then one rename
into place. Resuming checks the files against the manifest first: `latest` takes the newest checkpoint that verifies
and says which newer ones it skipped and why; a damaged checkpoint named explicitly is refused in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from accelerate import Accelerator
from safetensors import SafetensorError

PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed from: one line for the user, exit status 2."""


def write_manifest(folder: Path) -> None:
    """List every file of `folder` with its size and sha256, after making sure each is on disk (a crash after the
    rename must not leave a manifest vouching for data still in the page cache)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
            files[path.relative_to(folder).as_posix()] = {
                "size": os.fstat(handle.fileno()).st_size, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
    partial = folder / f".{MANIFEST_FILE}.partial"
    with partial.open("w") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(folder / MANIFEST_FILE)


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when every file its manifest lists is there, whole and unchanged."""
    if not folder.is_dir():
        return "no such folder"
    if not (folder / MANIFEST_FILE).is_file():
        return f"no {MANIFEST_FILE} (its save was interrupted, or it was not written by this version)"
    try:
        listed = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in listed.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST_FILE} is unreadable"
    if not any(name == PROGRESS_FILE for name, _, _ in entries):
        return f"its manifest does not list {PROGRESS_FILE}"
    for name, size, sha256 in entries:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes where the manifest says {size:,} (truncated?)"
        with path.open("rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != sha256:
                return f"{name} differs from the sha256 in the manifest (corrupted)"
    return None


def checkpoints_newest_first(output_dir: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def find_latest(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a line for each newer one that did not."""
    skipped = []
    for path in checkpoints_newest_first(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"skipped {path.name}: {problem}")
    return None, skipped


def latest_checkpoint(output_dir: Path) -> Path | None:
    return find_latest(output_dir)[0]


def resolve_checkpoint(output_dir: Path, where: str) -> tuple[Path, list[str]]:
    """The checkpoint `--resume_from_checkpoint where` means ('latest' or a folder), verified, with what `latest`
    skipped on the way; CheckpointError when there is none to resume from."""
    if where == "latest":
        found, skipped = find_latest(output_dir)
        if found is None:
            raise CheckpointError(f"--resume_from_checkpoint latest: no intact checkpoint in {output_dir}"
                                  + (f" ({'; '.join(skipped)})" if skipped else ""))
        return found, skipped
    problem = checkpoint_problem(Path(where))
    if problem is not None:
        others = [p.name for p in checkpoints_newest_first(Path(where).parent) if checkpoint_problem(p) is None]
        beside = f"intact beside it: {', '.join(others)}" if others else "no intact checkpoint beside it"
        raise CheckpointError(f"--resume_from_checkpoint {where}: {problem}; {beside}")
    return Path(where), []


class TiedHeadNotice(logging.Filter):
    """Accelerate's notice, at every save, that it left out `out_head.weight`: it is `tok_emb.weight` (tied), and
    loading ties it again (the resume tests hold the weights bitwise). Any other tensor it leaves out is still said."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor {'out_head.weight'} while saving" not in record.getMessage()  # "[RANK n] ..."


@contextlib.contextmanager
def tied_head_saved_quietly() -> Iterator[None]:
    notices, notice = logging.getLogger("accelerate.utils.other"), TiedHeadNotice()
    notices.addFilter(notice)
    try:
        yield
    finally:
        notices.removeFilter(notice)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, progress: dict) -> Path:
    """Every process saves its part into a hidden folder; the main process adds the progress file and the manifest,
    then renames the folder into place: a kill at any moment leaves either no checkpoint-N or a complete one."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with tied_head_saved_quietly():
            accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / PROGRESS_FILE).write_text(json.dumps(progress))
            write_manifest(partial)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
    except (OSError, SafetensorError) as error:  # a full disk, a quota: say so and what is still good
        shutil.rmtree(partial, ignore_errors=True)
        intact = latest_checkpoint(output_dir)
        raise CheckpointError(f"writing {final} failed ({getattr(error, 'strerror', None) or error}); "
                              + (f"{intact.name} is intact and resumable" if intact else "no checkpoint is intact")
                              ) from None
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: Path) -> dict:
    """Load a verified checkpoint's state into the prepared objects; returns its progress. A checkpoint of another
    model or optimizer (different arguments) is refused in one line rather than a size-mismatch traceback."""
    try:
        accelerator.load_state(str(folder))
    except (RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"--resume_from_checkpoint {folder}: it does not fit this run's model or optimizer "
                              f"(resume with the arguments it was trained with): {first}") from None
    return json.loads((folder / PROGRESS_FILE).read_text())
