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
    from sovtune.train import train

    result = RunResult(run_dir=recipe.run_dir)
    result.stages["train"] = train(recipe, resume=resume, overwrite=overwrite, console=console)
    return result
