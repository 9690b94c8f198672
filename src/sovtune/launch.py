"""`sovtune launch`: build the `accelerate launch ... -m sovtune train RECIPE` command for N GPUs and a strategy,
print it, and run it. A thin convenience: accelerate does the launching, sovtune only picks and checks the config."""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sovtune.config import Recipe
from sovtune.errors import SovtuneError

log = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp", "deepspeed", "deepspeed-zero2"]
STRATEGY_CONFIGS: dict[str, str] = {
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "deepspeed": "deepspeed-zero3.yaml",
    "deepspeed-zero2": "deepspeed-zero2.yaml",
}
FSDP_QLORA_CONFIG = "fsdp-qlora.yaml"
DEEPSPEED_JSON = {"deepspeed": "zero3.json", "deepspeed-zero2": "zero2.json"}
SHARDED = ("fsdp", "deepspeed", "deepspeed-zero2")


class LaunchError(SovtuneError):
    """The launch cannot start (bad strategy for the recipe, missing config or package) or a process failed."""


def configs_dir() -> Path:
    """configs/ of the checkout: $SOVTUNE_CONFIGS, ./configs, or the repository this package was installed from."""
    candidates = [Path(os.environ["SOVTUNE_CONFIGS"])] if os.environ.get("SOVTUNE_CONFIGS") else []
    candidates += [Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"]
    for folder in candidates:
        if (folder / "accelerate" / STRATEGY_CONFIGS["ddp"]).is_file():
            return folder
    raise LaunchError(
        "no configs/accelerate/ folder found (looked in $SOVTUNE_CONFIGS, ./configs and the sovtune checkout); "
        "run from the repository root, set SOVTUNE_CONFIGS, or pass --config-file"
    )


def check_strategy(recipe: Recipe, strategy: str) -> None:
    """Combinations accelerate would only reject after loading the model (or that would silently not shard)."""
    quant = recipe.quantization
    if strategy not in STRATEGY_CONFIGS:
        raise LaunchError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGY_CONFIGS)}")
    if strategy in SHARDED and quant.mode == "8bit":
        raise LaunchError(
            f"--strategy {strategy}: 8-bit (LLM.int8) weights cannot be sharded; use quantization.mode=4bit with "
            "quantization.storage_dtype=bfloat16, or --strategy ddp"
        )
    if strategy in SHARDED and quant.mode == "4bit":
        if quant.storage_dtype == "uint8":
            raise LaunchError(
                f"--strategy {strategy} with 4-bit weights: FSDP/ZeRO-3 shard only float tensors, but "
                "quantization.storage_dtype is uint8; add --set quantization.storage_dtype=bfloat16 "
                "(and model.dtype: bfloat16), or use --strategy ddp"
            )
        if recipe.model.dtype != quant.storage_dtype:
            raise LaunchError(
                f"--strategy {strategy} with 4-bit weights: model.dtype ({recipe.model.dtype}) must equal "
                f"quantization.storage_dtype ({quant.storage_dtype}) so every sharded tensor has one dtype; "
                f"set model.dtype: {quant.storage_dtype}"
            )
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(
            f"--strategy {strategy}: the deepspeed package is not installed; pip install -e '.[deepspeed]'"
        )


def config_file_for(recipe: Recipe, strategy: str) -> Path:
    name = (
        FSDP_QLORA_CONFIG if strategy == "fsdp" and recipe.quantization.mode == "4bit" else STRATEGY_CONFIGS[strategy]
    )
    return configs_dir() / "accelerate" / name


@dataclass
class LaunchCommand:
    shown: str  # what a person would type
    argv: list[str]  # the same, through this interpreter, so the job runs in this environment


def build_command(
    recipe_path: Path,
    recipe: Recipe,
    gpus: int,
    strategy: str = "ddp",
    overrides: list[str] | tuple[str, ...] = (),
    config_file: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> LaunchCommand:
    """The accelerate command: config for the strategy, N processes, then `-m sovtune train` with the same flags."""
    if gpus < 1:
        raise LaunchError(f"--gpus {gpus}: needs at least 1")
    check_strategy(recipe, strategy)
    train_args = ["train", str(recipe_path)]
    for item in overrides:
        train_args += ["--set", item]
    train_args += (["--resume"] if resume else []) + (["--overwrite"] if overwrite else [])
    if strategy == "ddp" and gpus == 1 and config_file is None:
        # Data parallelism over one GPU is plain training (accelerate rejects a one-process multi-GPU config).
        return LaunchCommand("sovtune " + shlex.join(train_args), [sys.executable, "-m", "sovtune", *train_args])
    config = Path(config_file) if config_file else config_file_for(recipe, strategy)
    if not config.is_file():
        raise LaunchError(f"--config-file {config}: file not found")
    args = ["--config_file", str(config), "--num_processes", str(gpus)]
    if strategy in DEEPSPEED_JSON and config_file is None:
        # The yaml names the json relative to the repository root; an absolute path works from anywhere.
        args += ["--deepspeed_config_file", str(configs_dir() / "deepspeed" / DEEPSPEED_JSON[strategy])]
    args += ["-m", "sovtune", *train_args]
    return LaunchCommand(
        "accelerate launch " + shlex.join(args),
        [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *args],
    )


def check_devices(gpus: int) -> None:
    """Refuse more processes than CUDA GPUs; without CUDA the processes run on the CPU (gloo), said out loud."""
    import torch

    if torch.cuda.is_available():
        found = torch.cuda.device_count()
        if gpus > found:
            raise LaunchError(
                f"--gpus {gpus}: this machine has {found} CUDA GPU(s); lower --gpus, or for several nodes use "
                "scripts/slurm_multinode.sh"
            )
    else:
        cores = os.cpu_count() or 1
        if gpus > cores:  # each process loads the model: more than the cores starves the machine
            raise LaunchError(
                f"--gpus {gpus}: no CUDA GPU here, so the processes would run on this machine's {cores} CPU core(s) "
                f"(for testing only); lower --gpus to at most {cores}"
            )
        log.info("no CUDA GPU here: the %d process(es) run on the CPU (gloo), for testing only", gpus)


def run_command(command: LaunchCommand) -> int:
    """Run accelerate; a failing process makes torchrun stop the others, so this returns instead of hanging."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # ranks' lines arrive in order with the launcher's
    return subprocess.run(command.argv, env=env, check=False).returncode


def launch(
    recipe_path: Path,
    recipe: Recipe,
    gpus: int,
    strategy: str = "ddp",
    overrides: list[str] | tuple[str, ...] = (),
    config_file: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
) -> LaunchCommand:
    command = build_command(recipe_path, recipe, gpus, strategy, overrides, config_file, resume, overwrite)
    log.info("%s", command.shown)
    if dry_run:
        return command
    check_devices(gpus)
    code = run_command(command)
    if code != 0:
        raise LaunchError(
            f"accelerate launch exited with code {code}: a process failed and the others were stopped; its error is "
            f"printed above (lines starting [rankN]); fix it and rerun "
            f"(--resume continues from the last complete checkpoint)"
        )
    return command
