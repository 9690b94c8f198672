"""Checkpoints complete or absent, free disk checked before training, and a full disk answered in one line."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from sovtune.config import Recipe
from sovtune.core.rundir import RunDir
from sovtune.errors import SovtuneError
from sovtune.model import PICKLE_SUFFIXES
from sovtune.sizes import human_bytes, optimizer_state_bytes


class DiskSpaceError(SovtuneError):
    """Not enough free disk for the checkpoints, or the disk filled up during the run."""


class CheckpointRefused(SovtuneError):
    """A checkpoint holds something `--resume` must not load."""


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
    except (OSError, ValueError, RecursionError):
        return False
    return step is not None and isinstance(state, dict) and state.get("global_step") == step


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = RunDir(run_dir).checkpoints_dir
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted((path for path in found if checkpoint_is_complete(path)), key=lambda path: checkpoint_step(path) or 0)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: its trainer state, which the trainer writes last, is whole."""
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def discard_incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Delete checkpoint folders a killed run or a full disk left half-written; return what was removed.

    The trainer rotates checkpoints by modification time, so a stale half-written folder would otherwise
    count as the newest one and could get a complete checkpoint deleted in its place.
    """
    folder = RunDir(run_dir).checkpoints_dir
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if path.is_dir() and checkpoint_step(path) is not None and not checkpoint_is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# The trainer's state files, pickles all: transformers loads them with torch.load(weights_only=True).
TRAINER_STATE_FILES = re.compile(r"optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth")
# Written by transformers before sovtune replaced it with training_args.json; --resume never loads it.
PICKLED_TRAINING_ARGS = "training_args.bin"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_checkpoint_files(checkpoint: Path) -> None:
    """What `--resume` loads from a checkpoint, checked first: a checkpoint is input too (copied from elsewhere,
    or changed since it was written), and its state files are pickles, which can run code when loaded.

    The adapter must be safetensors, no link may point out of the folder, and the only pickles are the trainer's
    state files, holding tensors and plain values. transformers 5 loads those with torch's weights-only unpickler;
    this does not rely on it: each pickle's globals are read statically first (torch's
    get_unsafe_globals_in_checkpoint disassembles the pickle and runs nothing) and must be ones weights-only loading
    allows, plus the numpy types of the RNG state (transformers' own allow-list, `safe_globals`).
    """
    import torch
    from transformers.trainer_pt_utils import safe_globals

    checkpoint = Path(checkpoint)
    for path in sorted(checkpoint.rglob("*")):
        name = path.relative_to(checkpoint).as_posix()
        if path.is_symlink():
            raise CheckpointRefused(f"{path}: a symbolic link in a checkpoint; --resume loads only the files in it")
        if not path.name.endswith(PICKLE_SUFFIXES) or name == PICKLED_TRAINING_ARGS or not path.is_file():
            continue
        if not TRAINER_STATE_FILES.fullmatch(name):
            raise CheckpointRefused(
                f"{path}: a pickle file the trainer does not write, and pickles can run code when loaded: remove the "
                "checkpoint, or start without --resume"
            )
        try:
            with safe_globals():
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            raise CheckpointRefused(
                f"{path}: not a torch.save file ({str(exc)[:120]}); it was not written by the trainer: remove the "
                "checkpoint, or start without --resume"
            ) from None
        if unsafe:
            raise CheckpointRefused(
                f"{path}: refers to {', '.join(sorted(unsafe)[:3])}, not only tensors and plain values; the trainer "
                "did not write it and loading it could run code: remove the checkpoint, or start without --resume"
            )
    if not (checkpoint / ADAPTER_WEIGHTS).is_file() or (checkpoint / ADAPTER_WEIGHTS).is_symlink():
        raise CheckpointRefused(
            f"{checkpoint}: no {ADAPTER_WEIGHTS} (--resume loads adapter weights from safetensors only); remove the "
            "checkpoint to resume from an earlier one, or start without --resume"
        )


CHECKPOINT_OVERHEAD_BYTES = 1 << 20  # scheduler, RNG, trainer state, training args
SAFETY_MARGIN = 1.2


def tokenizer_bytes(tokenizer: Any) -> int:
    """Size of the saved tokenizer (every checkpoint and the adapter carry a copy)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def checkpoint_size_estimate(model: Any, optimizer: str, tokenizer_size: int = 0) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the final adapter) from the trainable parameters and the optimizer."""
    trainable = [
        (parameter.numel(), parameter.element_size()) for parameter in model.parameters() if parameter.requires_grad
    ]
    weights = sum(elements * size for elements, size in trainable)
    state = optimizer_state_bytes(trainable, optimizer)
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
            kept = (
                f"the last complete checkpoint {complete[-1]} is kept; "
                f"free space, then resume with: {self.resume_command}"
            )
        else:
            kept = "no checkpoint was complete yet; free space and start the run again"
        raise DiskSpaceError(
            f"{self.run_dir}: the disk filled up while writing ({human_bytes(free)} left on {where}); {kept}"
        ) from None
