"""The one atomic writer: a reader (or a run killed at any moment) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from sovtune.errors import SovtuneError


class DeletionRefused(SovtuneError):
    """A folder or file would be deleted or replaced although it may hold what sovtune did not write."""


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


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


def deletion_hazard(path: Path, inputs: Iterable[tuple[str, Path]] = ()) -> str | None:
    """Why deleting or replacing `path` could lose something sovtune did not write; None when no rule applies.

    Never through a symbolic link; never the file-system root, the home folder or the working directory, nor a
    folder holding one of them or one of `inputs` (what the command reads, named: ("data.train", path), ...).
    Callers also check that the folder is theirs to replace (a run directory's marker, a merged model's report).
    """
    path = Path(path)
    if path.is_symlink():
        return "it is a symbolic link (sovtune never deletes through one)"
    target = _real(path)

    def holds(inner: Path) -> bool:
        return inner == target or target in inner.parents

    if target == Path(target.anchor):
        return "it is the file-system root"
    home = os.path.expanduser("~")
    if home != "~" and holds(_real(home)):
        return "it is your home folder" if _real(home) == target else "it holds your home folder"
    if holds(_real(os.getcwd())):
        return "it is the working directory" if _real(os.getcwd()) == target else "it holds the working directory"
    for what, item in inputs:
        if holds(_real(item)):
            return f"it holds {what} ({item})"
    return None


class OutputUnwritable(SovtuneError):
    """A command's output folder cannot be created where the command line points."""


def make_output_dir(folder: Path, what: str) -> None:
    """mkdir -p for a command's output (`what` it holds, for the message): a place that cannot hold a folder (under a
    file, read-only, full) is one line, not an OSError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "it is a file, not a folder" if folder.is_file() else exc.strerror or str(exc)
        raise OutputUnwritable(
            f"{folder}: cannot write {what} there ({reason}); choose a writable place for it"
        ) from None


def check_output_place(path: Path, what: str) -> None:
    """Refuse early, before any work, an output path under a file (its nearest existing ancestor is not a folder)."""
    above = next((folder for folder in Path(path).parents if os.path.lexists(folder)), None)
    if above is not None and not above.is_dir():
        raise OutputUnwritable(
            f"{path}: cannot write {what} there ({above} is a file, not a folder); choose a writable place for it"
        )


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
