"""One writer per run directory: an flock'ed lock file beside it that names its owner."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovtune.core.files import make_dirs
from sovtune.core.rundir import RunDir
from sovtune.core.secrets import redact_secrets
from sovtune.errors import SovtuneError

log = logging.getLogger(__name__)


class RunLocked(SovtuneError):
    """Another process is writing the same run directory."""


class RunDirUnwritable(SovtuneError):
    """The run directory (or its lock file) cannot be created where output.dir points."""


def lock_path(run_dir: Path) -> Path:
    """Beside the run directory, not inside it: `--overwrite` deletes the directory while the lock is held."""
    return RunDir(run_dir).lock_file


@dataclass
class LockOwner:
    pid: int
    host: str
    started_at: str
    process_started: float | None = None
    command: str = ""

    def alive(self) -> bool:
        """Whether the owner still runs (same host only; a reused pid has a different start time)."""
        if self.host != socket.gethostname():
            return False
        import psutil

        try:
            created = psutil.Process(self.pid).create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False
        return self.process_started is None or abs(created - self.process_started) < 1.0

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started_at}"


def _read_owner(path: Path) -> LockOwner | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return LockOwner(**{key: value[key] for key in LockOwner.__dataclass_fields__ if key in value})
    except (OSError, ValueError, TypeError, KeyError):
        return None  # empty or half-written by an owner that died while writing it


_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth (pipeline.run wraps train)
_held_guard = threading.Lock()


class RunLock:
    """Exclusive lock for writing a run directory: an flock'ed file beside it naming the owner.

    The kernel drops an flock when its process dies (even by SIGKILL), so a lock left behind by a dead run is
    taken over; the pid and start time in the file name the owner in the refusal and catch the case of a file
    system whose flock is a no-op (the owner is then checked by pid). Reentrant within one process.
    """

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self.enabled = enabled
        self._fd: int | None = None
        self._created: list[Path] = []
        self._nested = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if not self.enabled:
            return
        with _held_guard:
            if self.path in _held:
                _held[self.path] += 1
                self._nested = True
                return
        try:
            self._created = make_dirs(self.path.parent)
        except OSError as exc:
            self._unwritable(exc)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self._unwritable(exc)
            if not self._lock_fd(fd):
                continue
            previous = _read_owner(self.path)
            if previous is not None and previous.alive():
                os.close(fd)
                self._refuse(previous)
            if previous is not None:
                log.warning(
                    "%s: taking over the lock of a run that ended without releasing it (%s)",
                    self.run_dir,
                    previous.describe(),
                )
            try:
                self._write_owner(fd)
            except OSError as exc:  # a full disk or a read-only file system, before anything else was written
                os.close(fd)
                self.path.unlink(missing_ok=True)
                self._unwritable(exc)
            self._fd = fd
            with _held_guard:
                _held[self.path] = 1
            return
        self._refuse(_read_owner(self.path))

    def _lock_fd(self, fd: int) -> bool:
        """flock the file; False (fd closed) if the file at the path was replaced meanwhile and must be reopened."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(self.path)
            os.close(fd)
            self._refuse(owner)
        except OSError:
            pass  # no flock on this file system: the pid check in `acquire` is the guard
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner unlinked it while releasing: lock the new file instead
            os.close(fd)
        return same

    def _write_owner(self, fd: int) -> None:
        import psutil

        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "process_started": psutil.Process().create_time(),
            "command": redact_secrets(" ".join(shlex.quote(arg) for arg in sys.argv)),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)

    def _unwritable(self, exc: OSError) -> None:
        self._remove_created_dirs()
        raise RunDirUnwritable(
            f"{self.run_dir}: cannot write there ({exc.strerror or exc}: {exc.filename or self.path}); "
            "set output.dir to a writable folder (--set output.dir=...)"
        ) from None

    def _refuse(self, owner: LockOwner | None) -> None:
        self._remove_created_dirs()
        who = owner.describe() if owner else "another process"
        raise RunLocked(
            f"{self.run_dir}: another sovtune run ({who}) is writing this run directory; wait for it to finish "
            f"or stop it, or write elsewhere with --set output.dir=... (lock file: {self.path})"
        )

    def release(self) -> None:
        if not self.enabled:
            return
        with _held_guard:
            if self._nested:
                _held[self.path] -= 1
                self._nested = False
                return
            if self._fd is None:
                return
            _held.pop(self.path, None)
        # Unlink while still holding the flock, so no one locks a file that is about to disappear.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        """Directories made only to hold the lock are removed again if nothing else was written into them."""
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []
