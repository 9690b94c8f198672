"""`sovtune doctor`: what matters for training on this machine, each problem with the command that fixes it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from sovtune import offline
from sovtune.config import check_endpoint
from sovtune.publish.hub import probe

REQUIRED_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "huggingface_hub")
MIN_FREE_DISK_GB = 5.0


@dataclass
class Row:
    item: str
    value: str
    status: str  # ok | warn | missing
    fix: str = ""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def diagnose(run_root: Path = Path("runs"), endpoint: str | None = None) -> list[Row]:
    """Every row of `sovtune doctor`. The hub named by `endpoint` (else $HF_ENDPOINT) is probed; none is, if neither
    is set: sovtune never contacts a hub it was not given."""
    rows = [
        Row(
            "python",
            platform.python_version(),
            "ok" if sys.version_info >= (3, 10) else "missing",
            "" if sys.version_info >= (3, 10) else "install Python 3.10 or newer",
        )
    ]
    for package in REQUIRED_PACKAGES:
        version = _version(package)
        rows.append(
            Row(
                package,
                version or "not installed",
                "ok" if version else "missing",
                "" if version else 'pip install -e ".[dev]"',
            )
        )
    rows += _torch_rows()
    rows += _optional_rows()
    rows.append(_disk_row(run_root))
    rows += _hub_rows(endpoint or os.environ.get("HF_ENDPOINT"))
    return rows


def _torch_rows() -> list[Row]:
    try:
        import torch
    except ImportError:
        return []
    cuda_build = torch.version.cuda
    rows = [
        Row(
            "torch build",
            f"CUDA {cuda_build}" if cuda_build else "CPU only",
            "ok" if cuda_build else "warn",
            "" if cuda_build else "for GPUs: pip install torch (the default Linux wheel is a CUDA build)",
        )
    ]
    if not torch.cuda.is_available():
        rows.append(
            Row(
                "GPUs",
                "none visible (training runs on the CPU: tiny models only)",
                "warn",
                "check nvidia-smi and CUDA_VISIBLE_DEVICES" if cuda_build else "",
            )
        )
        return rows
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        rows.append(Row(f"GPU {index}", f"{name}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free", "ok"))
    bf16 = torch.cuda.is_bf16_supported()
    rows.append(Row("bf16", "supported" if bf16 else "not supported (fp16 will be used)", "ok" if bf16 else "warn"))
    return rows


def _optional_rows() -> list[Row]:
    rows = []
    bnb = _version("bitsandbytes")
    if bnb:
        backend = "CUDA" if _cuda_available() else "CPU"
        rows.append(Row("bitsandbytes", f"{bnb} ({backend} backend: 4-bit QLoRA available)", "ok"))
    else:
        rows.append(Row("bitsandbytes", "not installed: no QLoRA", "warn", "pip install bitsandbytes"))
    flash = _version("flash-attn") or _version("flash_attn")
    optional = (
        ("flash-attention", flash, "not installed (SDPA is used)", "flash-attn"),
        ("liger-kernel", _version("liger-kernel"), "not installed (fused kernels off)", "liger"),
    )
    for item, found, absent, extra in optional:
        fix = "" if found or not _cuda_available() else f'pip install -e ".[{extra}]"'
        rows.append(Row(item, found or absent, "ok" if found else "warn", fix))
    return rows


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _disk_row(run_root: Path) -> Row:
    probe = run_root if run_root.exists() else Path.cwd()
    free_gb = shutil.disk_usage(probe).free / 1e9
    ok = free_gb >= MIN_FREE_DISK_GB
    return Row(
        f"free disk under {run_root}",
        f"{free_gb:.1f} GB",
        "ok" if ok else "missing",
        "" if ok else f"free at least {MIN_FREE_DISK_GB:.0f} GB or set output.dir elsewhere",
    )


def _hub_rows(endpoint: str | None) -> list[Row]:
    offline_on = offline.is_active()
    try:
        from huggingface_hub import get_token

        has_token = get_token() is not None  # the value itself is never shown
    except ImportError:
        has_token = bool(os.environ.get("HF_TOKEN"))
    rows = [
        Row(
            "hub token",
            "set" if has_token else "not set (push/private pulls need one)",
            "ok" if has_token else "warn",
            "" if has_token else "export HF_TOKEN=... or hf auth login",
        ),
        Row("offline mode", offline.describe() if offline_on else "off", "ok"),
    ]
    if not endpoint:
        return [Row("hub endpoint", "not set: not probed (push and pull need --endpoint or HF_ENDPOINT)", "ok"), *rows]
    try:
        status, text = probe(check_endpoint(endpoint))
    except ValueError as exc:
        return [Row("hub endpoint", endpoint, "warn", str(exc)), *rows]
    return [Row("hub endpoint", f"{endpoint}: {text}", status), *rows]


def healthy(rows: list[Row]) -> bool:
    return not any(row.status == "missing" for row in rows)
