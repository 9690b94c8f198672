"""sovtune: sovereign LoRA/QLoRA fine-tuning with evidence of what the adapter gained.

The Python API (`load_recipe`, `train`, `evaluate`, `run`) is what the CLI itself calls. Heavy modules are
imported lazily so `import sovtune` and `sovtune --help` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_recipe": "sovtune.recipe",
    "Recipe": "sovtune.recipe",
    "SovtuneError": "sovtune.errors",
    "train": "sovtune.training",
    "evaluate": "sovtune.evaluation",
    "run": "sovtune.pipeline",
    "check": "sovtune.preflight",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'sovtune' has no attribute {name!r}")
