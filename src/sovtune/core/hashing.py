"""SHA-256 of bytes, text, streams and files, the verifiable file records built from them, and the UTC timestamps
records carry."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterable

_CHUNK = 1 << 20
# A file record names its path relative to the run directory (root "run") or absolutely (root "absolute").
RUN_ROOT, ABSOLUTE_ROOT = "run", "absolute"


def now() -> str:
    """UTC, seconds, ISO 8601 with a Z: the timestamp of every record sovtune writes."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_stream(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def file_entry(path: Path, run_dir: Path | None = None) -> dict[str, Any]:
    """A verifiable record: run-relative when the file lives in the run directory, else absolute."""
    path = Path(path)
    resolved = path.resolve()
    if run_dir is not None and resolved.is_relative_to(Path(run_dir).resolve()):
        shown, root = resolved.relative_to(Path(run_dir).resolve()).as_posix(), RUN_ROOT
    else:
        shown, root = str(resolved), ABSOLUTE_ROOT
    return {"path": shown, "root": root, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def tree_entries(folder: Path, run_dir: Path | None = None, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Entries for the files of a folder (recursively, hidden and temporary files left out), or only `names`."""
    folder = Path(folder)
    if names is not None:
        files = [folder / name for name in names if (folder / name).is_file()]
    else:
        files = [
            path
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        ]
    return [file_entry(path, run_dir) for path in files]
