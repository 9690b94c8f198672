"""`sovtune run`: data -> model -> train -> evaluate -> publish, each stage reading what the last one wrote."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovtune.recipe import Recipe


@dataclass
class RunResult:
    run_dir: Path
    stages: dict[str, Any] = field(default_factory=dict)


def run(
    recipe: Recipe,
    resume: bool = False,
    overwrite: bool = False,
    console: Any = None,
    force: bool = False,
    resume_command: str | None = None,
) -> RunResult:
    """The whole job for one recipe: train, evaluate against the base, publish when the recipe says so."""
    from sovtune.safety import RunLock
    from sovtune.training import is_main_process

    # One writer for the whole job (train's own lock nests inside): a second run cannot slip in before eval.
    with RunLock(recipe.run_dir, enabled=is_main_process()):
        return _run(recipe, resume, overwrite, console, force, resume_command)


def _run(recipe: Recipe, resume: bool, overwrite: bool, console: Any, force: bool, resume_command: str | None) -> RunResult:
    from sovtune.audit import audited
    from sovtune.training import is_main_process, train

    result = RunResult(run_dir=recipe.run_dir)
    if is_main_process():  # broken eval or publish settings fail now, not after training
        from sovtune.hub import check_push_settings

        check_push_settings(recipe.hub)
        if recipe.eval.enabled:
            from sovtune.evaluation import check_eval

            for warning in check_eval(recipe).warnings:
                if console is not None:
                    console.print(f"warning: {warning}", markup=False)
    with audited("train", recipe, destination=str(result.run_dir)):
        result.stages["train"] = train(
            recipe, resume=resume, overwrite=overwrite, console=console, force=force, resume_command=resume_command
        )
    if recipe.eval.enabled and is_main_process():
        from sovtune.evaluation import evaluate

        # Raises GateFailed (exit 3) after writing the report, so a failing adapter is never published.
        with audited("eval", recipe, destination=str(result.run_dir)):
            result.stages["evaluate"] = evaluate(
                recipe, run_dir=result.run_dir, adapter_dir=result.stages["train"].adapter_dir, console=console
            )
    if recipe.hub.push and is_main_process():
        from sovtune.hub import push_run

        # Reached only when every gate passed (evaluate raises GateFailed otherwise).
        with audited("push", recipe, destination=recipe.hub.repo):
            log = (lambda line: console.print(line, markup=False)) if console is not None else None
            result.stages["push"] = push_run(result.run_dir, hub=recipe.hub, log=log)
    return result
