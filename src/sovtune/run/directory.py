"""The run directory itself: created for a new run, continued by --resume, replaced only with --overwrite."""

from __future__ import annotations

import shutil
from pathlib import Path

from sovtune.core.runtime import is_main_process
from sovtune.errors import SovtuneError
from sovtune.run.checkpoints import last_checkpoint


class RunDirError(SovtuneError):
    """The run directory is in a state that would lose or mix up results."""


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber a finished or interrupted run unless asked; return the checkpoint to resume from."""
    checkpoint = last_checkpoint(run_dir)
    if resume:
        if checkpoint is None:
            raise RunDirError(f"{run_dir}: no complete checkpoint to resume from; run without --resume")
        return checkpoint
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if occupied and not overwrite and is_main_process():  # other ranks would see the folder rank 0 just made
        action = "continue it with --resume" if checkpoint else "pass --overwrite to replace it"
        raise RunDirError(f"{run_dir}: already holds a run; {action}, or choose another --set output.dir=...")
    if occupied and overwrite and is_main_process():
        shutil.rmtree(run_dir)
    return None
