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


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False, console: Any = None) -> RunResult:
    """The whole job for one recipe. Later stages are added here as they exist (evaluate, publish)."""
    from sovtune.train import is_main_process, train

    result = RunResult(run_dir=recipe.run_dir)
    result.stages["train"] = train(recipe, resume=resume, overwrite=overwrite, console=console)
    if recipe.eval.enabled and is_main_process():
        from sovtune.evaluate import evaluate

        # Raises GateFailed (exit 3) after writing the report, so a failing adapter is never published.
        result.stages["evaluate"] = evaluate(
            recipe, run_dir=result.run_dir, adapter_dir=result.stages["train"].adapter_dir, console=console
        )
    return result
