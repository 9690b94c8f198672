"""The one atomic writer: a reader (or a run killed at any moment) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX needs the directory itself synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder written by a library (peft, tokenizers) before it is renamed into place."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(Path(folder))


def temporary_sibling(path: Path, suffix: str = "tmp") -> Path:
    """A hidden name beside `path` for staging it (same folder, so the final rename stays on one file system)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{suffix}")


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync a file in place: for staging files that are renamed into place afterwards."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary sibling of `path`, flushed to disk and renamed over `path` when the block ends
    without an error (tmp + fsync + rename + fsync of the folder); removed otherwise. Its `.name` is the temporary
    file, so the block can check what it wrote before it becomes `path`."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writers(paths: Iterable[Path]) -> Iterator[dict[Path, Path]]:
    """Temporary siblings for several files that belong together (a report and its chart): the block writes them
    (fsync'd by `write_synced` or flushed by the writer), and all are renamed into place only if it succeeds."""
    staged = {Path(path): temporary_sibling(Path(path)) for path in paths}
    try:
        yield staged
        for path, tmp in staged.items():
            os.replace(tmp, path)
        for folder in {path.parent for path in staged}:
            fsync_dir(folder)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def replace_dir(staged: Path, final: Path) -> None:
    """Swap a fully written (and synced) folder into place: `final` is the old folder or the new one, never a mix."""
    staged, final = Path(staged), Path(final)
    old = final.with_name(f".{final.name}.old")  # the run directory has one writer (its lock), so no pid is needed
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
    folder = Path(folder)
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        created.append(path)
    return created
