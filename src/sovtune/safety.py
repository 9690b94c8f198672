"""Run safety: one writer per run directory, atomic writes, complete-or-absent checkpoints, a disk check,
a clean stop on SIGINT/SIGTERM, a clear failure on a full disk, resume fingerprints and secret redaction.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sovtune.errors import SovtuneError

if TYPE_CHECKING:
    from sovtune.data import PreparedData
    from sovtune.recipe import Recipe

log = logging.getLogger(__name__)


class RunLocked(SovtuneError):
    """Another process is writing the same run directory."""


class RunDirUnwritable(SovtuneError):
    """The run directory (or its lock file) cannot be created where output.dir points."""


class DiskSpaceError(SovtuneError):
    """Not enough free disk for the checkpoints, or the disk filled up during the run."""


class ResumeRefused(SovtuneError):
    """The recipe or the data changed since the run started, so resuming would not continue the same run."""


class Interrupted(SovtuneError):
    """Training was stopped by SIGINT/SIGTERM after saving a checkpoint; exit code 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------------------------
# Secrets: never in a file we write or a line we print


# Environment variables whose names say they hold a credential; their values are redacted wherever they appear.
# Whole name parts only: HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, but not TOKENIZERS_PARALLELISM or GIT_AUTHOR_NAME.
_SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIALS?|AUTH)(_|$)", re.I
)
_MIN_SECRET_LENGTH = 8  # shorter values (flags such as HF_HUB_DISABLE_IMPLICIT_TOKEN=1) are not credentials


def secret_env_values() -> dict[str, str]:
    """Values of credential-looking environment variables, longest first (so no value hides part of another)."""
    found = {
        name: value
        for name, value in os.environ.items()
        if _SECRET_NAME.search(name) and len(value) >= _MIN_SECRET_LENGTH and value.lower() not in ("true", "false")
    }
    return dict(sorted(found.items(), key=lambda item: -len(item[1])))


def redact_secrets(text: str) -> str:
    """`text` with credential env values and recognisable tokens (hf_..., ghp_..., sk-...) replaced by a marker."""
    for name, value in secret_env_values().items():
        if value in text:
            text = text.replace(value, f"[REDACTED:{name}]")
    from sovtune import scan

    findings = [finding for finding in scan.find(text) if finding.category == scan.SECRET]
    for finding in reversed(findings):
        text = text[: finding.start] + scan.placeholder(finding.kind) + text[finding.end :]
    return text


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a run killed at any moment) sees the old file or the new one, never half of one


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
    fsync_dir(folder)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# One writer per run directory


def lock_path(run_dir: Path) -> Path:
    """Beside the run directory, not inside it: `--overwrite` deletes the directory while the lock is held."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.parent / f".{run_dir.name}.lock"


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
            self._created = _make_dirs(self.path.parent)
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
                log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", self.run_dir, previous.describe())
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
        import fcntl

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


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
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


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: complete or absent


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name[len("checkpoint-") :]
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def checkpoint_is_complete(path: Path) -> bool:
    """A checkpoint whose trainer_state.json is whole and names its step.

    transformers' `Trainer._save_checkpoint` writes the model, optimizer, scheduler and RNG state first and
    `trainer_state.json` last (tests/test_crash_safety.py checks this against the installed source); the state
    file itself is written in place, so a run killed while writing it leaves a file that does not parse.
    """
    step = checkpoint_step(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return step is not None and isinstance(state, dict) and state.get("global_step") == step


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted((path for path in found if checkpoint_is_complete(path)), key=lambda path: checkpoint_step(path) or 0)


def discard_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Delete checkpoint folders a killed run or a full disk left half-written; return what was removed.

    The trainer rotates checkpoints by modification time, so a stale half-written folder would otherwise
    count as the newest one and could get a complete checkpoint deleted in its place.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if path.is_dir() and checkpoint_step(path) is not None and not checkpoint_is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Disk space: checked before training, and a full disk during the run answered clearly


# Optimizer state bytes per trainable parameter (AdamW keeps two fp32 moments; 8-bit AdamW two bytes).
OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "adafactor": 4,
    "sgd": 0,
}
CHECKPOINT_OVERHEAD_BYTES = 1 << 20  # scheduler, RNG, trainer state, training args
SAFETY_MARGIN = 1.2


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def tokenizer_bytes(tokenizer: Any) -> int:
    """Size of the saved tokenizer (every checkpoint and the adapter carry a copy)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def checkpoint_size_estimate(model: Any, optimizer: str, tokenizer_size: int = 0) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the final adapter) from the trainable parameters and the optimizer."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    weights = sum(parameter.numel() * parameter.element_size() for parameter in trainable)
    numel = sum(parameter.numel() for parameter in trainable)
    state = numel * OPTIMIZER_STATE_BYTES.get(optimizer, 8)
    adapter = weights + tokenizer_size
    return adapter + state + CHECKPOINT_OVERHEAD_BYTES, adapter


def free_bytes(folder: Path) -> tuple[int, Path]:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free, folder


def check_disk_space(run_dir: Path, model: Any, recipe: Recipe, tokenizer: Any = None) -> int:
    """Refuse to start when the checkpoints the run will keep (plus the one being written) cannot fit."""
    per_checkpoint, adapter = checkpoint_size_estimate(
        model, recipe.train.optimizer, tokenizer_bytes(tokenizer) if tokenizer is not None else 0
    )
    existing = len(complete_checkpoints(run_dir))
    # The trainer writes a new checkpoint before rotating the oldest away: limit + 1 exist for a moment.
    new_checkpoints = max(1, recipe.train.save_total_limit + 1 - existing)
    needed = int((new_checkpoints * per_checkpoint + adapter) * SAFETY_MARGIN)
    free, where = free_bytes(run_dir)
    if free < needed:
        raise DiskSpaceError(
            f"{run_dir}: about {human_bytes(needed)} of free disk needed ({new_checkpoints} checkpoint(s) of "
            f"{human_bytes(per_checkpoint)} + the adapter), only {human_bytes(free)} free on {where}; free space, "
            "lower train.save_total_limit, or write the run elsewhere with --set output.dir=..."
        )
    return needed


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28", "os error 122")
# torch.save's zip writer reports a failed write without the OS reason ("unexpected pos 576 vs 534" after an
# iostream error on a full tmpfs); it is a full disk when little space is left.
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos", "iostream error")
LOW_SPACE_BYTES = 64 << 20


def is_disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if any(marker in text for marker in _DISK_FULL_TEXT):
            return True
        if folder is not None and any(marker in text for marker in _TORCH_WRITE_FAILED):
            return free_bytes(folder)[0] < LOW_SPACE_BYTES
        current = current.__cause__ or current.__context__
    return False


class DiskFullGuard:
    """Turn a full disk during training or saving into one clear line; keep the last complete checkpoint."""

    def __init__(self, run_dir: Path, resume_command: str) -> None:
        self.run_dir = Path(run_dir)
        self.resume_command = resume_command

    def __enter__(self) -> DiskFullGuard:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, traceback: Any) -> bool:
        if exc is None or not isinstance(exc, Exception) or not is_disk_full(exc, self.run_dir):
            return False
        discard_incomplete_checkpoints(self.run_dir)
        for leftover in self.run_dir.glob(".*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        complete = complete_checkpoints(self.run_dir)
        free, where = free_bytes(self.run_dir)
        if complete:
            kept = f"the last complete checkpoint {complete[-1]} is kept; free space, then resume with: {self.resume_command}"
        else:
            kept = "no checkpoint was complete yet; free space and start the run again"
        raise DiskSpaceError(
            f"{self.run_dir}: the disk filled up while writing ({human_bytes(free)} left on {where}); {kept}"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: finish the optimizer step, save a checkpoint, stop, say how to resume


class GracefulStop:
    """Signal handlers for the duration of training; the trainer callback turns a signal into save + stop.

    A second signal restores the previous handler and re-delivers the signal: Ctrl-C twice stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, resume_command: str) -> None:
        self.resume_command = resume_command
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        # os.write: safe from a signal handler, and unbuffered so the user sees it at once.
        os.write(
            2,
            f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this training step, then stopping "
            f"(send it again to stop without saving)\n".encode(),
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stop = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if stop.requested_on_any_rank(args):
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopOnSignal()

    def requested_on_any_rank(self, args: Any) -> bool:
        """In distributed training every rank must stop at the same step, or the next collective hangs."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        import torch

        flag = torch.tensor([1 if self.requested else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM  # another rank got it (torchrun forwards SIGTERM to every worker)
        return bool(flag.item())

    def raise_if_stopped(self, state: Any, run_dir: Path) -> None:
        """After `trainer.train` returns: a stop before the last step is an `Interrupted` with the resume line."""
        if self.signum is None or state.global_step >= state.max_steps:
            return
        checkpoint = Path(run_dir) / "checkpoints" / f"checkpoint-{state.global_step}"
        name = signal.Signals(self.signum).name
        raise Interrupted(
            f"training stopped by {name} at step {state.global_step} of {state.max_steps}; checkpoint saved to "
            f"{checkpoint}; resume with: {self.resume_command}",
            self.signum,
        )


def resume_command(recipe: Recipe, command: str = "train", overrides: tuple[str, ...] | list[str] = ()) -> str:
    """The command line that continues this run."""
    source = recipe.source_path or "RECIPE"
    try:
        relative = os.path.relpath(source)
        source = source if relative.startswith("..") else relative  # short when under the working directory
    except ValueError:
        pass  # another drive (Windows): keep the absolute path
    parts = ["sovtune", command, shlex.quote(source)]
    parts += [f"--set {shlex.quote(item)}" for item in overrides]
    return redact_secrets(" ".join(parts + ["--resume"]))


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint: resuming is only allowed into the same recipe and the same data


FINGERPRINT = "run_fingerprint.json"
# Only what shapes the training trajectory; description, output, eval, hub and sovereignty may change on resume.
TRAINING_SECTIONS = ("schema_version", "model", "quantization", "adapter", "data", "train")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 0.01}} -> {"train.learning_rate": 0.01}; lists of sections get indices."""
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        value = {str(index): item for index, item in enumerate(value)}
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


# Where a data source lives may change (a moved folder); what it holds is compared by content hashes instead.
_DATA_SOURCE_PATH = re.compile(r"^data\.(train\.\d+|eval)\.path$")


def tokens_sha256(items: list[Any]) -> str:
    """Hash of the token ids and labels in order: the data the trainer sees, after template and truncation."""
    from array import array

    digest = hashlib.sha256()
    for item in items:
        digest.update(array("q", item.input_ids).tobytes())
        digest.update(b"|")
        digest.update(array("q", item.labels).tobytes())
        digest.update(b"\n")
    return digest.hexdigest()


def run_fingerprint(recipe: Recipe, data: PreparedData) -> dict[str, Any]:
    """What must not change for a resume to continue the same run: training settings, data files, tokens."""
    from sovtune import provenance

    dumped = recipe.model_dump(mode="json")
    training = json.loads(redact_secrets(json.dumps({key: dumped.get(key) for key in TRAINING_SECTIONS})))
    return {
        "recipe": training,
        "recipe_sha256": hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest(),
        "data_files": {entry["path"]: entry["sha256"] for entry in provenance.data_file_hashes(recipe)},
        "train_tokens_sha256": tokens_sha256(data.train),
        "eval_tokens_sha256": tokens_sha256(data.eval),
    }


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences: training settings first, then the data (by content, wherever it lives)."""
    changes = []
    old_fields, new_fields = _flatten(old.get("recipe", {})), _flatten(new.get("recipe", {}))
    for key in sorted(set(old_fields) | set(new_fields)):
        if _DATA_SOURCE_PATH.match(key):
            continue
        if old_fields.get(key, "<unset>") != new_fields.get(key, "<unset>"):
            changes.append(f"{key}: {old_fields.get(key, '<unset>')!r} -> {new_fields.get(key, '<unset>')!r}")
    old_files, new_files = old.get("data_files", {}), new.get("data_files", {})
    if sorted(map(str, old_files.values())) != sorted(map(str, new_files.values())):
        old_hashes, new_hashes = set(old_files.values()), set(new_files.values())
        for path in sorted(set(old_files) | set(new_files)):
            if path in old_files and path in new_files and old_files[path] != new_files[path]:
                changes.append(f"data file {path} changed")
            elif path in new_files and path not in old_files and new_files[path] not in old_hashes:
                changes.append(f"data file {path} is not the data the run started with")
            elif path in old_files and path not in new_files and old_files[path] not in new_hashes:
                changes.append(f"data file {path} is no longer used")
    if not changes:  # nothing visible changed, yet the tokens did: the tokenizer or its chat template
        for key, what in (("train_tokens_sha256", "training"), ("eval_tokens_sha256", "evaluation")):
            if old.get(key) != new.get(key):
                changes.append(f"the tokenised {what} data differs (the tokenizer or chat template changed)")
    return changes


def check_resume(run_dir: Path, current: dict[str, Any], force: bool) -> list[str]:
    """Refuse to resume into a run whose recipe or data changed, unless forced; return the changes."""
    path = Path(run_dir) / FINGERPRINT
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if force:
            return ["no fingerprint recorded"]
        raise ResumeRefused(
            f"{path}: missing, so sovtune cannot tell whether the recipe and data are unchanged; "
            "pass --force to resume anyway"
        ) from None
    except (OSError, ValueError) as exc:
        raise ResumeRefused(f"{path}: unreadable ({exc}); pass --force to resume anyway") from None
    changes = fingerprint_changes(previous, current)
    if changes and not force:
        shown = "; ".join(changes[:3]) + (f" (+{len(changes) - 3} more)" if len(changes) > 3 else "")
        raise ResumeRefused(
            f"{run_dir}: cannot resume: the recipe or data changed since the run started ({shown}); "
            "resume with the original recipe, data and --set options, or pass --force to resume anyway"
        )
    if changes:
        log.warning("resuming %s with changes (--force): %s", run_dir, "; ".join(changes))
    return changes


def write_fingerprint(run_dir: Path, fingerprint: dict[str, Any], forced_changes: list[str] | None = None) -> None:
    """Record the fingerprint; a forced resume keeps the history of what changed."""
    path = Path(run_dir) / FINGERPRINT
    history: list[Any] = []
    if forced_changes:
        try:
            history = json.loads(path.read_text(encoding="utf-8")).get("forced_resumes", [])
        except (OSError, ValueError):
            history = []
        history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": forced_changes})
    from sovtune.provenance import write_json_atomic

    write_json_atomic(path, {**fingerprint, "forced_resumes": history})


# ---------------------------------------------------------------------------------------------------------------
# Safe loading


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_weight_files(recipe: Recipe) -> None:
    """A local model folder with pickle weights only is refused unless the recipe opts in.

    Unpickling runs arbitrary code; safetensors cannot. (Hub models are held to the same rule by
    `use_safetensors=True` in model.load_base_model.)
    """
    if not recipe.model_is_local or recipe.model.allow_pickle_weights:
        return
    folder = Path(recipe.model_location)
    if not folder.is_dir():
        return
    names = [path.name for path in folder.iterdir() if path.is_file()]
    if any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in names):
        return
    pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES) and "training_args" not in name)
    if pickles:
        from sovtune.model import ModelError

        raise ModelError(
            f"model.name_or_path: {folder} has only pickle weights ({', '.join(pickles[:3])}), which can run "
            "arbitrary code when loaded; convert them to safetensors, or set model.allow_pickle_weights: true "
            "if you trust where they came from"
        )
