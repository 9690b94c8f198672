"""The Python API the CLI is thin over: `train` and `run` a recipe, `verify` a run directory or bundle.

`run` is data -> model -> train -> evaluate -> publish, each stage reading what the last one wrote to the run
directory and each recording its own audit event.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sovtune import model as models
from sovtune import preflight, training
from sovtune.audit import audited
from sovtune.config import Recipe
from sovtune.core.runtime import is_main_process
from sovtune.evaluation import HeldOut, evaluate
from sovtune.inputs import prepare_recipe_data
from sovtune.publish.bundle import verify_bundle
from sovtune.publish.hub import push_run
from sovtune.run.lock import RunLock
from sovtune.run.signals import resume_command
from sovtune.run.verify import VerifyFailed, VerifyResult, verify_run_dir

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    stages: dict[str, Any] = field(default_factory=dict)


def train(
    recipe: Recipe, resume: bool = False, overwrite: bool = False, force: bool = False, overrides: Sequence[str] = ()
) -> training.TrainResult:
    """Train the recipe's adapter into its run directory (`sovtune train`); `overrides` are the --set options a
    stopped run repeats in the command that resumes it."""
    with audited("train", recipe, destination=str(recipe.run_dir)):
        return training.train(recipe, resume, overwrite, force, resume_command(recipe, "train", overrides))


def run(
    recipe: Recipe, resume: bool = False, overwrite: bool = False, force: bool = False, overrides: Sequence[str] = ()
) -> RunResult:
    """The whole job for one recipe: check, train, evaluate against the base, publish when the recipe says so."""
    # One writer for the whole job (train's own lock nests inside): a second run cannot slip in before eval.
    with RunLock(recipe.run_dir, enabled=is_main_process()):
        return _run(recipe, resume, overwrite, force, resume_command(recipe, "run", overrides))


def _run(recipe: Recipe, resume: bool, overwrite: bool, force: bool, resume_line: str) -> RunResult:
    result = RunResult(run_dir=recipe.run_dir)
    if is_main_process():  # broken eval or publish settings fail now, not after training
        tokenizer = models.load_tokenizer(recipe)
        for warning in preflight.before_training(recipe, tokenizer, prepare_recipe_data(recipe, tokenizer)):
            log.warning("%s", warning)
    with audited("train", recipe, destination=str(result.run_dir)):
        result.stages["train"] = training.train(recipe, resume, overwrite, force, resume_line)
    if recipe.eval.enabled and is_main_process():
        # Raises GateFailed (exit 3) after writing the report, so a failing adapter is never published.
        with audited("eval", recipe, destination=str(result.run_dir)):
            result.stages["evaluate"] = evaluate(
                recipe,
                run_dir=result.run_dir,
                adapter_dir=result.stages["train"].adapter_dir,
                held_out=HeldOut.from_run(result.run_dir),
                overwrite=True,  # the run writes its own report: one left by an earlier run of it is stale
            )
    if recipe.hub.push and is_main_process():
        # Reached only when every gate passed (evaluate raises GateFailed otherwise).
        with audited("push", recipe, destination=recipe.hub.repo):
            result.stages["push"] = push_run(result.run_dir, hub=recipe.hub)
    return result


def verify(target: str | Path, strict: bool = False) -> VerifyResult:
    """Recompute every hash of a run directory or an exported bundle; `VerifyFailed` lists what differs.

    Files outside the run (data, a local base model) are checked where they exist; `strict` also fails when absent.
    """
    target = Path(target)
    if target.is_file() and tarfile.is_tarfile(target):
        result = verify_bundle(target)
    elif target.is_dir():
        result = verify_run_dir(target, strict)
    else:
        raise VerifyFailed(f"{target}: neither a run directory nor a bundle (.tar); give RUN_DIR or BUNDLE")
    if not result.ok:
        raise VerifyFailed(result.describe() + "; the files changed after they were recorded")
    return result
