"""Training: the only TRL user. Writes checkpoints, logs, metrics and the adapter into the run directory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sovtune import model as models
from sovtune import provenance, safety
from sovtune.data import PreparedData, prepare_data
from sovtune.errors import SovtuneError
from sovtune.licence import check_licence
from sovtune.recipe import Recipe
from sovtune.speed import SpeedPlan, announce_plan, plan_speed

log = logging.getLogger(__name__)


class RunDirError(SovtuneError):
    """The run directory is in a state that would lose or mix up results."""


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: its trainer state, which the trainer writes last, is whole."""
    complete = safety.complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber a finished or interrupted run unless asked; return the checkpoint to resume from."""
    checkpoint = last_checkpoint(run_dir)
    if resume:
        if checkpoint is None:
            raise RunDirError(f"{run_dir}: no complete checkpoint to resume from; run without --resume")
        return checkpoint
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if occupied and not overwrite and is_main_process():  # other ranks would see the folder rank 0 just made
        action = "continue it with --resume" if checkpoint else "pass --overwrite to replace it"
        raise RunDirError(f"{run_dir}: already holds a run; {action}, or choose another --set output.dir=...")
    if occupied and overwrite and is_main_process():
        shutil.rmtree(run_dir)
    return None


def sft_config(recipe: Recipe, run_dir: Path, has_eval: bool, plan: SpeedPlan | None = None) -> Any:
    from trl import SFTConfig

    plan = plan or plan_speed(recipe)
    cfg = recipe.train
    dtype = models.resolve_dtype(recipe.model.dtype)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio
    on_cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        # The in-loop eval loss is a mean of per-batch means: batches of one make it independent of the number of
        # processes (evaluation.py computes the token-weighted figures that the report uses).
        per_device_eval_batch_size=1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if (has_eval and cfg.eval_steps) else "no",
        eval_steps=cfg.eval_steps,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        report_to="none",
        **plan.sft_kwargs(recipe.data.max_length),  # micro-batches, padding-free or grouped, kernels, compile
        shuffle_dataset=False,  # the trainer's seeded sampler shuffles; shuffling twice would break resume order
        dataset_num_proc=None,
        remove_unused_columns=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if world_size() > 1 else None,
    )


def to_dataset(items: list[Any]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items]})


def write_json_atomic(path: Path, value: Any) -> None:
    """Write to a temporary file, flush to disk, then rename: a reader never sees half a file."""
    provenance.write_json_atomic(path, value)


def save_adapter(peft_model: Any, tokenizer: Any, run_dir: Path, state_dict: dict[str, Any] | None = None) -> Path:
    """Adapter + tokenizer (with chat template) into run_dir/adapter, atomically.

    `state_dict` is the gathered full state under FSDP/ZeRO-3, where rank 0 alone holds only a shard.
    """
    final = run_dir / "adapter"
    tmp = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # "auto": peft also saves the embeddings when the vocabulary grew (a pad token was added).
    peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers="auto", state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    safety.fsync_tree(tmp)  # on disk before the rename makes it the adapter
    old = run_dir / ".adapter.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def train(
    recipe: Recipe,
    resume: bool = False,
    overwrite: bool = False,
    console: Any = None,
    force: bool = False,
    resume_command: str | None = None,
) -> TrainResult:
    """Recipe -> data -> base + adapter -> SFTTrainer -> run_dir/adapter, as the run directory's only writer.

    `force` resumes although the recipe or data changed; `resume_command` is what a stopped run tells the user.
    """
    with safety.RunLock(recipe.run_dir, enabled=is_main_process()):
        return _train(recipe, resume, overwrite, console, force, resume_command or safety.resume_command(recipe))


def _train(recipe: Recipe, resume: bool, overwrite: bool, console: Any, force: bool, resume_command: str) -> TrainResult:
    from transformers import set_seed
    from trl import SFTTrainer

    models.check_device_support(recipe)
    check_licence(recipe)  # the licence gate, before any weight is downloaded
    run_dir = recipe.run_dir
    checkpoint = check_run_dir(run_dir, resume, overwrite)
    tokenizer = models.load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    fingerprint = safety.run_fingerprint(recipe, data)
    forced_changes = safety.check_resume(run_dir, fingerprint, force) if checkpoint is not None else []
    safety.check_weight_files(recipe)
    # Seed before the model exists: embedding resizing and LoRA init draw from the global RNG, so without this
    # the initial adapter depends on whatever ran earlier in the process and runs are not reproducible.
    set_seed(recipe.train.seed)
    base = models.load_base_model(recipe, tokenizer)
    peft_model = models.attach_adapter(base, recipe)
    throughput = plan_speed(recipe, peft_model)  # refuses an impossible setting before anything is written
    _announce(recipe, data, peft_model, checkpoint, console)
    if is_main_process():
        announce_plan(throughput, console)
        safety.check_disk_space(run_dir, peft_model, recipe, tokenizer)

    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        safety.write_fingerprint(run_dir, fingerprint, forced_changes)
        safety.discard_incomplete_checkpoints(run_dir)  # left by a killed run; the trainer rotates by mtime
        safety.atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        write_json_atomic(run_dir / "data_stats.json", data.stats)
        provenance.start(recipe, run_dir, tokenizer, resume=checkpoint is not None, data_stats=data.stats)
    started, started_at = time.time(), provenance.now()
    stop = safety.GracefulStop(resume_command)
    trainer = SFTTrainer(
        model=peft_model,
        args=sft_config(recipe, run_dir, has_eval=bool(data.eval), plan=throughput),
        train_dataset=to_dataset(data.train),
        eval_dataset=to_dataset(data.eval) if data.eval and recipe.train.eval_steps else None,
        processing_class=tokenizer,
        callbacks=([_tensorboard(run_dir), _jsonl_log(run_dir / "logs" / "train_log.jsonl")] if is_main_process() else [])
        + [stop.callback()],
    )
    _adapter_in_compute_dtype(trainer.model, recipe)
    # SIGINT/SIGTERM until the adapter is written: a checkpoint and a clean stop, never a half-saved run.
    with stop, safety.DiskFullGuard(run_dir, resume_command):
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        stop.raise_if_stopped(trainer.state, run_dir)
        metrics = {
            "train_loss": output.training_loss,
            "global_step": output.global_step,
            "train_runtime_s": round(time.time() - started, 2),
            "resumed_from": checkpoint.name if checkpoint else None,
            "log_history": trainer.state.log_history,
        }
        adapter_dir = run_dir / "adapter"
        # Sharded weights are gathered by every rank together (rank 0 alone would hang or save empty tensors).
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
        if is_main_process():
            adapter_dir = save_adapter(trainer.model, tokenizer, run_dir, state_dict)
            write_json_atomic(run_dir / "train_metrics.json", metrics)
            provenance.record_train(run_dir, recipe, metrics, started_at)
    return TrainResult(run_dir=run_dir, adapter_dir=adapter_dir, metrics=metrics)


def _jsonl_log(path: Path) -> Any:
    """Each trainer log (loss, learning rate, grad norm, eval loss) as one JSON line, readable without TensorBoard."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **(logs or {})}, default=str) + "\n")

    return JsonlLog()


def _adapter_in_compute_dtype(peft_model: Any, recipe: Recipe) -> None:
    """Undo SFTTrainer's cast of quantised-model adapters to bf16 where the matmuls do not run in bf16.

    bf16 adapters are the QLoRA paper's setting on bf16 GPUs. With fp32 (CPU) or fp16 compute they only lose
    precision, and the saved adapter, which peft reloads in fp32, would no longer compute like the trained one.
    Runs before the optimizer exists, so it optimises the fp32 tensors.
    """
    if recipe.quantization.mode == "none" or models.compute_dtype(recipe) == torch.bfloat16:
        return
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype == torch.bfloat16:
            parameter.data = parameter.data.float()


def _tensorboard(run_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "logs")))


def _announce(recipe: Recipe, data: PreparedData, peft_model: Any, checkpoint: Path | None, console: Any) -> None:
    if console is None or not is_main_process():
        return
    trainable, total = models.count_parameters(peft_model)
    effective = recipe.train.batch_size * recipe.train.gradient_accumulation * world_size()
    console.print(
        f"[bold]{recipe.name}[/]: {len(data.train)} train / {len(data.eval)} eval examples, "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
    )
    console.print(
        f"effective batch {effective} = {recipe.train.batch_size} per device x {recipe.train.gradient_accumulation} "
        f"accumulation x {world_size()} process(es); device {models.device()}"
    )
    if checkpoint is not None:
        console.print(f"resuming from {checkpoint} (optimizer, scheduler, RNG and data order restored)")
