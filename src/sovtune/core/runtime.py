"""Where this process runs: its rank and world size in a distributed launch, and its compute device."""

from __future__ import annotations

import os
from typing import Any


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or a single process): the only writer of the run directory, the audit log and the console."""
    return rank() == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def sharded_training() -> bool:
    """Launched by accelerate with FSDP or DeepSpeed (the launcher exports these switches to every process)."""
    return any(
        os.environ.get(name, "false").lower() == "true" for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def device() -> Any:
    """The torch device this process computes on: its CUDA GPU, else the CPU (torch imported only when asked)."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
