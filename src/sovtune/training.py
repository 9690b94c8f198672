"""Training: the only TRL user. Writes checkpoints, logs, metrics and the adapter into the run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sovtune import model as models
from sovtune.config import Recipe
from sovtune.core.files import atomic_write_text, fsync_tree, replace_dir
from sovtune.core.hashing import now
from sovtune.core.rundir import RunDir
from sovtune.core.runtime import is_main_process, world_size
from sovtune.data import IGNORE_INDEX, PreparedData
from sovtune.evaluation import TrainingEval, held_out_metrics, sample_generations, training_eval
from sovtune.inputs import prepare_recipe_data
from sovtune.licence import check_licence
from sovtune.run import checkpoints, fingerprint, manifest
from sovtune.run.directory import check_run_dir, replace_run_dir
from sovtune.run.lock import RunLock
from sovtune.run.signals import GracefulStop, resume_command
from sovtune.speed import SpeedPlan, announce_plan, plan_speed

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]


def sft_config(recipe: Recipe, run_dir: Path, has_eval: bool, plan: SpeedPlan | None = None) -> Any:
    import torch
    from trl import SFTConfig

    plan = plan or plan_speed(recipe)
    cfg = recipe.train
    dtype = models.resolve_dtype(recipe.model.dtype)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio
    on_cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(RunDir(run_dir).checkpoints_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        # In-training evaluation is sovtune's own (HeldOutTrainer.evaluate): batched and token-weighted.
        per_device_eval_batch_size=recipe.eval.batch_size,
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
        disable_tqdm=True,  # sovtune logs a progress line per logging interval instead of redrawing a bar
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


def save_adapter(peft_model: Any, tokenizer: Any, run_dir: Path, state_dict: dict[str, Any] | None = None) -> Path:
    """Adapter + tokenizer (with chat template) into run_dir/adapter, atomically.

    `state_dict` is the gathered full state under FSDP/ZeRO-3, where rank 0 alone holds only a shard.
    """
    run = RunDir(run_dir)
    staged = run / ".adapter.tmp"
    # "auto": peft also saves the embeddings when the vocabulary grew (a pad token was added).
    peft_model.save_pretrained(
        str(staged), safe_serialization=True, save_embedding_layers="auto", state_dict=state_dict
    )
    tokenizer.save_pretrained(str(staged))
    fsync_tree(staged)  # on disk before the rename makes it the adapter
    replace_dir(staged, run.adapter_dir)
    return run.adapter_dir


def train(
    recipe: Recipe,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    resume_command_line: str | None = None,
) -> TrainResult:
    """Recipe -> data -> base + adapter -> SFTTrainer -> run_dir/adapter, as the run directory's only writer.

    `force` resumes although the recipe or data changed; `resume_command_line` is what a stopped run tells the user.
    """
    check_run_dir(recipe, resume, overwrite)  # a refusal leaves no trace, not even a lock file beside the folder
    with RunLock(recipe.run_dir, enabled=is_main_process()):
        return _train(recipe, resume, overwrite, force, resume_command_line or resume_command(recipe))


def _train(recipe: Recipe, resume: bool, overwrite: bool, force: bool, resume_line: str) -> TrainResult:
    models.check_device_support(recipe)
    licence = check_licence(recipe)  # the licence gate, before any weight is downloaded
    run = RunDir(recipe.run_dir)
    checkpoint = check_run_dir(recipe, resume, overwrite)  # refuses now; replaces only once inputs are checked
    if checkpoint is not None:
        checkpoints.check_checkpoint_files(checkpoint)  # before anything in it is loaded
    tokenizer = models.load_tokenizer(recipe)
    data = prepare_recipe_data(recipe, tokenizer)
    current = fingerprint.run_fingerprint(recipe, data)
    # Imported once the data is read: transformers' training side pulls in peft, bitsandbytes and torch's compiler
    # (seconds), which a command stopped by a bad row should not wait for.
    from transformers import PrinterCallback, set_seed

    forced_changes = fingerprint.check_resume(run.path, current, force) if checkpoint is not None else []
    # Seed before the model exists: embedding resizing and LoRA init draw from the global RNG, so without this
    # the initial adapter depends on whatever ran earlier in the process and runs are not reproducible.
    set_seed(recipe.train.seed)
    base = models.load_base_model(recipe, tokenizer)  # refuses pickle-only weights
    peft_model = models.attach_adapter(base, recipe)
    throughput = plan_speed(recipe, peft_model)  # refuses an impossible setting before anything is written
    if is_main_process():
        _announce(recipe, data, peft_model, checkpoint)
        announce_plan(throughput)
        checkpoints.check_disk_space(run.path, peft_model, recipe, tokenizer)
        replace_run_dir(recipe, overwrite and checkpoint is None)  # recipe, data and model are checked by now
        fingerprint.write_fingerprint(run.path, current, forced_changes)
        checkpoints.discard_incomplete_checkpoints(run.path)  # left by a killed run; the trainer rotates by mtime
        run.write_json(RunDir.DATA_STATS, data.stats)
        # Evaluation reads exactly these held-out rows back instead of re-tokenising the training set.
        run.write_json(RunDir.HELDOUT, {"origins": [example.origin for example in data.eval_examples]})
        manifest.start(
            recipe, run.path, tokenizer, resume=checkpoint is not None, data_stats=data.stats, licence=licence.summary()
        )
    started, started_at = time.time(), now()
    stop = GracefulStop(resume_line)
    held_out = training_eval(recipe, data, tokenizer) if data.eval and recipe.train.eval_steps else None
    writer = _summary_writer(run.logs_dir) if is_main_process() else None
    trainer = held_out_trainer(recipe, tokenizer, held_out, writer, throughput.supervised_logits)(
        model=peft_model,
        args=sft_config(recipe, run.path, has_eval=held_out is not None, plan=throughput),
        train_dataset=to_dataset(data.train),
        eval_dataset=to_dataset(held_out.sequences) if held_out is not None else None,
        processing_class=tokenizer,
        callbacks=([_tensorboard(writer), _jsonl_log(run.train_log), _progress_log()] if writer is not None else [])
        + [stop.callback()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints the logs as strings ({'loss': '0.2224'}); _progress_log logs
    _adapter_in_compute_dtype(trainer.model, recipe)
    # SIGINT/SIGTERM until the adapter is written: a checkpoint and a clean stop, never a half-saved run.
    with stop, checkpoints.DiskFullGuard(run.path, resume_line):
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        stop.raise_if_stopped(trainer.state, run.path)
        metrics = {
            "train_loss": output.training_loss,
            "global_step": output.global_step,
            "train_runtime_s": round(time.time() - started, 2),
            "resumed_from": checkpoint.name if checkpoint else None,
            "log_history": trainer.state.log_history,
        }
        adapter_dir = run.adapter_dir
        # Sharded weights are gathered by every rank together (rank 0 alone would hang or save empty tensors).
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
        if is_main_process():
            adapter_dir = save_adapter(trainer.model, tokenizer, run.path, state_dict)
            run.write_json(RunDir.TRAIN_METRICS, metrics)
            manifest.record_train(run.path, recipe, metrics, started_at)
    return TrainResult(run_dir=run.path, adapter_dir=adapter_dir, metrics=metrics)


def _trainer_class(supervised_logits: bool) -> Any:
    """TRL's SFTTrainer, with checkpoints that hold no pickle a reader would have to load for the run's settings,
    resume errors in one line and, with `supervised_logits` (the speed plan's choice on the CPU), the loss computed
    by `supervised_loss`.

    transformers' Trainer._save pickles the TrainingArguments into every checkpoint (training_args.bin, torch.save
    of the whole object: reading it back means unpickling). Here they are written as training_args.json instead,
    the same fields as text. `_save` is overridden (rather than deleting the file after each save) so a complete
    checkpoint never holds the pickle: the trainer writes trainer_state.json, which makes a checkpoint complete,
    after `_save` returns.
    """
    from transformers.trainer import TRAINING_ARGS_NAME
    from trl import SFTTrainer

    class Trainer(SFTTrainer):  # type: ignore[misc]
        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            plain = self.label_smoother is None and self.compute_loss_func is None and self.args.loss_type == "nll"
            if supervised_logits and plain and not return_outputs and not self.aux_loss_enabled:
                return supervised_loss(self, model, inputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            super()._save(output_dir, state_dict)
            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            if self.args.should_save:
                (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)
                atomic_write_text(folder / RunDir.TRAINING_ARGS, self.args.to_json_string())

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            with _refused_state(checkpoint):
                super()._load_optimizer_and_scheduler(checkpoint)

        def _load_rng_state(self, checkpoint: str | None) -> None:
            with _refused_state(checkpoint):
                super()._load_rng_state(checkpoint)

    return Trainer


def supervised_loss(trainer: Any, model: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
    """The causal-LM loss of one micro-batch with only its supervised positions projected to the vocabulary.

    transformers' `logits_to_keep` mask keeps the hidden states whose next token is a label, so prompt positions never
    reach the LM head. The NLL is summed and divided by the supervised tokens of the whole optimizer step
    (`num_items_in_batch`, over every micro-batch and process), as TRL's fused head does, and the metrics TRL logs
    (mean token accuracy, entropy, tokens seen) are kept. TRL's head skips those positions only in its Triton kernels;
    on the CPU it projects every position and projects again in the backward pass, which made training steps 1.4x
    slower on the quickstart (docs/benchmarks.md).
    """
    import torch

    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    forward = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**forward, use_cache=False, logits_to_keep=keep).logits  # (supervised positions, vocabulary)
    targets = labels[:, 1:][keep[:, :-1]]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    total = torch.nn.functional.nll_loss(log_probs, targets, reduction="sum")
    loss = total / (num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1))
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes  # DDP averages the gradients the processes' sums make
    _record_token_metrics(trainer, inputs, log_probs.detach(), targets)
    return loss


def _record_token_metrics(trainer: Any, inputs: dict[str, Any], log_probs: Any, targets: Any) -> None:
    """Entropy, mean token accuracy and tokens seen, into TRL's metrics as its own compute_loss records them."""
    import torch

    mode = "train" if trainer.model.training else "eval"
    gather = trainer.accelerator.gather_for_metrics
    count = gather(torch.tensor(targets.numel(), device=targets.device)).sum()
    entropy = gather(-(log_probs.exp() * log_probs).sum().reshape(1)).sum()
    correct = gather((log_probs.argmax(-1) == targets).sum().reshape(1)).sum()
    trainer._metrics[mode]["entropy"].append((entropy / count).item() if count > 0 else 0.0)
    trainer._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
    if mode == "train":
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:  # padding-free rows: every position is a token
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        trainer._total_train_tokens += int(gather(local.reshape(1)).sum().item())
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


@contextlib.contextmanager
def _refused_state(checkpoint: str | None) -> Iterator[None]:
    """torch's weights-only unpickler refusing a checkpoint state file: one line, not a traceback."""
    try:
        yield
    except pickle.UnpicklingError:  # its message advises weights_only=False: not repeated
        raise checkpoints.CheckpointRefused(
            f"{checkpoint}: a state file is not only tensors and plain values (torch's weights-only unpickler refused "
            "it); the trainer did not write it: remove the checkpoint, or start without --resume"
        ) from None


def _jsonl_log(path: Path) -> Any:
    """Each trainer log (loss, learning rate, grad norm, eval loss) as one JSON line, readable without TensorBoard."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **(logs or {})}, default=str) + "\n")

    return JsonlLog()


# Trainer log keys as a progress line names them, in this order; others follow under their own names.
PROGRESS_NAMES = {"loss": "loss", "eval_loss": "eval loss", "learning_rate": "learning rate", "grad_norm": "grad norm"}
PROGRESS_HIDDEN = {"epoch", "total_flos", "num_tokens", "entropy"}


def _progress_log() -> Any:
    """One log line per logging interval (and per in-training evaluation), numbers as numbers: what a terminal, a
    log file and CI all read, instead of a redrawn progress bar and the trainer's dicts of strings."""
    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        started = 0.0
        first_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started, self.first_step = time.time(), state.global_step

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            logs = dict(logs or {})
            if "train_runtime" in logs:
                log.info(
                    "training done: %d steps in %.1f s, mean loss %.4g",
                    state.global_step, logs["train_runtime"], logs.get("train_loss", float("nan")),
                )  # fmt: skip
                return
            log.info("%s", progress_line(state.global_step, state.max_steps, logs, self._left(state)))

        def _left(self, state: Any) -> float | None:
            done = state.global_step - self.first_step
            if done <= 0 or not state.max_steps or state.global_step >= state.max_steps:
                return None
            return (time.time() - self.started) / done * (state.max_steps - state.global_step)

    return ProgressLog()


def progress_line(step: int, max_steps: int, logs: dict[str, Any], seconds_left: float | None) -> str:
    """`step 40/480 (8%): loss 0.2224, learning rate 0.002976, grad norm 1.043, epoch 0.14; about 2.5 min left`."""
    shown = [f"{PROGRESS_NAMES[key]} {logs[key]:.4g}" for key in PROGRESS_NAMES if isinstance(logs.get(key), float)]
    shown += [
        f"{key.replace('_', ' ')} {value:.4g}"
        for key, value in logs.items()
        if key not in PROGRESS_NAMES and key not in PROGRESS_HIDDEN and isinstance(value, (int, float))
    ]
    if isinstance(logs.get("epoch"), (int, float)):
        shown.append(f"epoch {logs['epoch']:.2f}")
    line = f"step {step}/{max_steps} ({step / max_steps:.0%})" if max_steps else f"step {step}"
    left = "" if seconds_left is None else f"; about {_duration(seconds_left)} left"
    return f"{line}: {', '.join(shown)}{left}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _adapter_in_compute_dtype(peft_model: Any, recipe: Recipe) -> None:
    """Undo SFTTrainer's cast of quantised-model adapters to bf16 where the matmuls do not run in bf16.

    bf16 adapters are the QLoRA paper's setting on bf16 GPUs. With fp32 (CPU) or fp16 compute they only lose
    precision, and the saved adapter, which peft reloads in fp32, would no longer compute like the trained one.
    Runs before the optimizer exists, so it optimises the fp32 tensors.
    """
    import torch

    if recipe.quantization.mode == "none" or models.compute_dtype(recipe) == torch.bfloat16:
        return
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype == torch.bfloat16:
            parameter.data = parameter.data.float()


def _summary_writer(logs_dir: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(logs_dir))


def _tensorboard(writer: Any) -> Any:
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=writer)


def held_out_trainer(
    recipe: Recipe, tokenizer: Any, held_out: TrainingEval | None, writer: Any, supervised_logits: bool = False
) -> Any:
    """SFTTrainer whose evaluation every train.eval_steps is sovtune's: the held-out sample the final evaluation
    scores (eval.max_examples), batched by eval.batch_size, token-weighted; plus, with train.eval_samples, a few
    generations as TensorBoard text.

    The Trainer's own loop averages per-batch means (weighted by examples, not tokens), which moves with the batch
    size and the number of processes. Every process scores the whole sample, so a sharded model (FSDP, ZeRO-3) runs
    the same forward passes on all ranks; only the main process writes. Built on `_trainer_class` (checkpoints
    without pickled training arguments; `supervised_logits`: the loss of `supervised_loss`).
    """

    class HeldOutTrainer(_trainer_class(supervised_logits)):  # type: ignore[misc]
        def evaluate(
            self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
        ) -> dict[str, float]:
            assert held_out is not None, "evaluate runs only when train.eval_steps and an eval split are set"
            model, was_training = self.model, self.model.training
            started = time.perf_counter()
            model.eval()
            try:
                metrics = held_out_metrics(model, held_out.sequences, recipe.eval.batch_size)
                samples = sample_generations(model, tokenizer, held_out.prompts, recipe)
            finally:
                model.train(was_training)
            metrics["eval_runtime"] = round(time.perf_counter() - started, 3)
            if writer is not None:
                for number, sample in enumerate(samples, start=1):
                    writer.add_text(f"samples/{number}", _sample_markdown(sample), self.state.global_step)
                writer.flush()
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return HeldOutTrainer


def _sample_markdown(sample: dict[str, str]) -> str:
    """One generation as TensorBoard's text plugin shows it (Markdown): origin, prompt, reference, answer."""
    return "\n\n".join(
        f"**{name}**: {text}" if name == "origin" else f"**{name}**:\n\n    " + text.replace("\n", "\n    ")
        for name, text in sample.items()
    )


def _announce(recipe: Recipe, data: PreparedData, peft_model: Any, checkpoint: Path | None) -> None:
    trainable, total = models.count_parameters(peft_model)
    effective = recipe.train.batch_size * recipe.train.gradient_accumulation * world_size()
    log.info(
        "%s: %d train / %d eval examples, trainable %s of %s parameters (%.2f%%)",
        recipe.name, len(data.train), len(data.eval), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
    )  # fmt: skip
    log.info(
        "effective batch %d = %d per device x %d accumulation x %d process(es); device %s",
        effective, recipe.train.batch_size, recipe.train.gradient_accumulation, world_size(), models.device(),
    )  # fmt: skip
    if checkpoint is not None:
        log.info("resuming from %s (optimizer, scheduler, RNG and data order restored)", checkpoint)
