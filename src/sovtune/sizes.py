"""Bytes of training state: the optimizer state of trainable tensors (one table for the planner and the disk check),
and sizes as people read them."""

from __future__ import annotations

import math

BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps optimizer state of smaller tensors in 32 bit
BNB_8BIT_OPT_BLOCK = 2048


def optimizer_state_bytes(tensors: list[tuple[int, int]], optimizer: str) -> int:
    """Optimizer state of trainable tensors given as (elements, bytes per element), for `train.optimizer`.

    AdamW keeps two moments in the parameter's dtype (32-bit paged AdamW at least fp32), 8-bit AdamW two bytes plus
    block constants (tensors below bitsandbytes' minimum size stay 32-bit), Adafactor at most one fp32 value per
    element (its factored moments of a matrix are rows + cols), SGD without momentum nothing.
    """
    total = 0
    for elements, param_bytes in tensors:
        if optimizer in ("adamw_8bit", "paged_adamw_8bit") and elements >= BNB_8BIT_MIN_SIZE:
            total += 2 * elements + 2 * 4 * math.ceil(elements / BNB_8BIT_OPT_BLOCK)
        elif optimizer == "sgd":
            total += 0
        elif optimizer == "adafactor":
            total += 4 * elements
        elif optimizer.startswith("paged_adamw_32"):
            total += 2 * max(param_bytes, 4) * elements
        else:
            total += 2 * param_bytes * elements
    return total


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
