"""Distributed training through `accelerate launch -m sovtune train`: two-process DDP on the CPU (gloo) gives the
single-process adapter with one writer and one shard per rank, and a failing rank ends the job instead of hanging.
FSDP, FSDP + QLoRA and DeepSpeed runs need two CUDA GPUs and skip cleanly elsewhere."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import qa_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
# fp32 on the CPU: the runs differ only in the order of floating-point reductions (gloo sums two partial
# gradients; padding to another length changes matmul blocking), ~1e-7 relative per operation; after 3 AdamW
# steps at lr 1e-2 the adapters measured 9e-8 apart. 1e-5 keeps a 100x margin, while the smallest real change
# (another batch composition per step, see `half`) moves the weights by ~2e-2.
WEIGHT_TOLERANCE = 1e-5


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def _write_recipe(folder: Path, model_dir: Path, name: str, batch_size: int, **extra: dict) -> Path:
    recipe = {
        "name": name,
        "model": {"name_or_path": str(model_dir), **extra.get("model", {})},
        "adapter": {"r": 4, "dropout": 0.0},  # no dropout: the runs must be deterministic to be comparable
        "data": {"train": str(folder / "train.jsonl"), "format": "messages", "max_length": 64, "eval_fraction": 0.25},
        "train": {
            "max_steps": 3,
            "batch_size": batch_size,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 100,
            "eval_steps": 3,
            "gradient_checkpointing": False,
            "seed": 0,
            **extra.get("train", {}),
        },
        "output": {"dir": str(folder / "runs" / name)},
    }
    if "quantization" in extra:
        recipe["quantization"] = extra["quantization"]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _accelerate_launch(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def _log_history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "train_metrics.json").read_text(encoding="utf-8"))["log_history"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """One process with batch 4, two DDP processes with batch 2 each (same global batch), one process with batch 2."""
    from sovtune.config import load_recipe
    from sovtune.training import train

    folder = tmp_path_factory.mktemp("ddp")
    write_jsonl(folder / "train.jsonl", qa_rows(24))
    single = _write_recipe(folder, tiny_model_dir, "single", 4)
    ddp = _write_recipe(folder, tiny_model_dir, "ddp", 2)
    half = _write_recipe(folder, tiny_model_dir, "half", 2)
    torch.set_num_threads(1)
    train(load_recipe(single))
    train(load_recipe(half))
    started = time.time()
    launched = _accelerate_launch(
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "-m",
        "sovtune",
        "train",
        str(ddp),
        env=_env(CUDA_VISIBLE_DEVICES=""),
    )
    return {
        "single": folder / "runs" / "single",
        "ddp": folder / "runs" / "ddp",
        "half": folder / "runs" / "half",
        "launched": launched,
        "seconds": time.time() - started,
    }


def test_ddp_run_completes_with_one_writer(runs: dict):
    launched, run_dir = runs["launched"], runs["ddp"]
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "effective batch 4 = 2 per device x 1 accumulation x 2 process(es)" in launched.stdout
    adapters = [p.parent for p in run_dir.rglob("adapter_config.json") if "checkpoints" not in p.parts]
    assert adapters == [run_dir / "adapter"]
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]
    # Rank 1 writes nothing: the JSON-lines log holds exactly the lines of the single-process run.
    lines = {
        name: (runs[name] / "logs" / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
        for name in ("single", "ddp")
    }
    assert len(lines["ddp"]) == len(lines["single"]) > 0


def test_ddp_adapter_matches_single_process_with_the_same_global_batch(runs: dict):
    assert runs["launched"].returncode == 0
    single, ddp, half = _adapter(runs["single"]), _adapter(runs["ddp"]), _adapter(runs["half"])
    assert _max_difference(single, ddp) <= WEIGHT_TOLERANCE
    # Had both ranks read the same shard, DDP would have trained exactly like one process with batch 2:
    assert _max_difference(ddp, half) > 100 * WEIGHT_TOLERANCE
    # The per-step training losses agree too (each logged once, by the main process).
    losses = {name: [h["loss"] for h in _log_history(runs[name]) if "loss" in h] for name in ("single", "ddp")}
    assert losses["ddp"] == pytest.approx(losses["single"], abs=1e-5)


def test_ddp_eval_loss_matches_single_process(runs: dict):
    assert runs["launched"].returncode == 0
    evals = {name: [h["eval_loss"] for h in _log_history(runs[name]) if "eval_loss" in h] for name in ("single", "ddp")}
    assert evals["single"] and evals["ddp"] == pytest.approx(evals["single"], abs=1e-5)


FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":  # injected by tests/test_distributed.py: rank 1 dies in its second step
    import transformers.trainer as _trainer
    _step = _trainer.Trainer.training_step
    def _failing(self, *args, **kwargs):
        if self.state.global_step >= 1:
            raise RuntimeError("injected failure on rank 1")
        return _step(self, *args, **kwargs)
    _trainer.Trainer.training_step = _failing
"""


def test_failing_rank_ends_the_job_with_a_clear_error(tmp_path: Path, tiny_model_dir: Path):
    """Rank 1 raises while rank 0 waits in the gradient all-reduce: torchrun stops rank 0 and `sovtune launch`
    ends with one error line, long before the 30-minute process-group timeout, and no adapter is written."""
    write_jsonl(tmp_path / "train.jsonl", qa_rows(24))
    recipe = _write_recipe(tmp_path, tiny_model_dir, "failing", 2)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_ON_RANK_1, encoding="utf-8")
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "sovtune", "launch", str(recipe), "--gpus", "2"],
        cwd=ROOT,
        env=_env(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(inject)),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "injected failure on rank 1" in output
    assert "error: accelerate launch exited with code 1: a process failed and the others were stopped" in output
    assert time.time() - started < 300
    assert not (tmp_path / "runs" / "failing" / "adapter").exists()


# --- GPU-only: sharded strategies ------------------------------------------------------------------------------


def _sovtune_launch(recipe: Path, strategy: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sovtune", "launch", str(recipe), "--gpus", "2", "--strategy", strategy],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture
def gpu_recipes(tmp_path: Path, tiny_model_dir: Path):
    write_jsonl(tmp_path / "train.jsonl", qa_rows(24))

    def make(name: str, **extra: dict) -> Path:
        return _write_recipe(tmp_path, tiny_model_dir, name, 2, model={"dtype": "bfloat16"}, **extra)

    return make


@pytest.mark.requires_cuda
@two_gpus
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_training_matches_ddp_on_two_gpus(gpu_recipes, strategy: str):
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    reference = _sovtune_launch(gpu_recipes("ddp-gpu"), "ddp")
    sharded_recipe = gpu_recipes(f"{strategy}-gpu")
    sharded = _sovtune_launch(sharded_recipe, strategy)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    run_dir = sharded_recipe.parent / "runs" / f"{strategy}-gpu"
    assert [p.parent for p in run_dir.rglob("adapter_config.json") if "checkpoints" not in p.parts] == [
        run_dir / "adapter"
    ]
    # bf16 compute: 3 updates of lr 1e-2 agree to ~1e-3 between strategies; a wrong shard or a stale
    # (unsaved, zero-initialised B) adapter is off by the size of the update itself (~1e-2).
    assert _max_difference(_adapter(sharded_recipe.parent / "runs" / "ddp-gpu"), _adapter(run_dir)) < 5e-3


@pytest.mark.requires_cuda
@two_gpus
def test_fsdp_qlora_on_two_gpus(gpu_recipes):
    """QLoRA with FSDP: 4-bit weights stored as bf16 are sharded; the saved adapter reloads in plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = gpu_recipes("fsdp-qlora", quantization={"mode": "4bit", "storage_dtype": "bfloat16"})
    result = _sovtune_launch(recipe, "fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp-qlora.yaml" in result.stdout
    adapter_dir = recipe.parent / "runs" / "fsdp-qlora" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(yaml.safe_load(recipe.read_text())["model"]["name_or_path"])
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero initialisation
