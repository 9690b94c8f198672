"""The run directory itself: created for a new run, continued by --resume, replaced only with --overwrite.

`--overwrite` replaces only a folder sovtune created as a run directory (it holds `RunDir.MARKER`), never through a
symbolic link, never the root, the home folder, the working directory or a folder holding the recipe's inputs; and
only once the recipe, data and model have been read and checked (`replace_run_dir`, called just before writing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sovtune.config import Recipe
from sovtune.core.files import deletion_hazard, fsync_dir
from sovtune.core.rundir import RunDir
from sovtune.core.runtime import is_main_process
from sovtune.errors import SovtuneError
from sovtune.run.checkpoints import last_checkpoint


class RunDirError(SovtuneError):
    """The run directory is in a state that would lose or mix up results."""


def check_run_dir(recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber a finished or interrupted run unless asked, and anything that is not a run even when asked;
    return the checkpoint to resume from. Deletes nothing (see `replace_run_dir`)."""
    run = RunDir(recipe.run_dir)
    if run.path.is_symlink() and (overwrite or not run.path.is_dir()):
        raise RunDirError(
            f"{run.path}: output.dir is a symbolic link; sovtune never replaces or deletes through one; "
            "set output.dir to the real folder"
        )
    if run.path.exists() and not run.path.is_dir():
        raise RunDirError(f"{run.path}: output.dir is a file, not a folder; choose another --set output.dir=...")
    checkpoint = last_checkpoint(run.path)
    if resume:
        if checkpoint is None:
            raise RunDirError(f"{run.path}: no complete checkpoint to resume from; run without --resume")
        return checkpoint
    if not is_main_process() or not (run.path.exists() and any(run.path.iterdir())):
        return None  # other ranks would see the folder rank 0 just made
    if not overwrite:
        if not run.is_run():
            raise RunDirError(
                f"{run.path}: output.dir holds files sovtune did not write (no {RunDir.MARKER} marker), so it "
                "is neither continued nor replaced; choose another --set output.dir=..."
            )
        action = "continue it with --resume" if checkpoint else "pass --overwrite to replace it"
        raise RunDirError(f"{run.path}: already holds a run; {action}, or choose another --set output.dir=...")
    hazard = deletion_hazard(run.path, recipe.local_inputs())
    if hazard is None and not run.is_run():
        hazard = (
            f"it is not a sovtune run directory (no {RunDir.MARKER} marker; a run made by an older sovtune has "
            "none: delete it yourself if it is one)"
        )
    if hazard is not None:
        raise RunDirError(
            f"{run.path}: --overwrite refused, nothing was deleted: {hazard}; choose another --set output.dir=..."
        )
    return None


def replace_run_dir(recipe: Recipe, overwrite: bool) -> Path:
    """Create the run directory (and its marker); with `overwrite`, replace the run there first. Call it after the
    recipe, data and model were checked and loaded, so a bad input never costs a previous run."""
    run = RunDir(recipe.run_dir)
    if overwrite and run.path.is_dir() and any(run.path.iterdir()):
        check_run_dir(recipe, resume=False, overwrite=True)  # again: the folder may have changed meanwhile
        # Renamed aside first: a run killed during the deletion leaves a hidden folder, not a half-deleted run.
        doomed = run.path.with_name(f".{run.path.name}.replaced-{os.getpid()}")
        os.replace(run.path, doomed)
        fsync_dir(run.path.parent)
        shutil.rmtree(doomed)
    run.path.mkdir(parents=True, exist_ok=True)
    run.mark()
    return run.path
