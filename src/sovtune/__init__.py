"""sovtune: sovereign LoRA/QLoRA fine-tuning with evidence of what the adapter gained.

The Python API (`load_recipe`, `train`, `evaluate`, `run`) is what the CLI itself calls. Heavy modules are
imported lazily so `import sovtune` and `sovtune --help` stay fast.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, importing bitsandbytes (peft does) logs a warning that it could not fetch an optional CPU
# kernel from the Hugging Face hub through the `kernels` package. sovtune never loads code from a hub at run time, so
# the notice can only be noise, and it broke the one-line error contract of every command. Errors still show.
BNB_HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
logging.getLogger(BNB_HUB_KERNEL_LOGGER).setLevel(logging.ERROR)

_API = {
    "load_recipe": "sovtune.config",
    "Recipe": "sovtune.config",
    "SovtuneError": "sovtune.errors",
    "train": "sovtune.pipeline",
    "evaluate": "sovtune.evaluation",
    "run": "sovtune.pipeline",
    "verify": "sovtune.pipeline",
    "check": "sovtune.preflight",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'sovtune' has no attribute {name!r}")
