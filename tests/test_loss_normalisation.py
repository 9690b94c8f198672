"""Gradient accumulation divides by the supervised-token count of the whole optimizer step, not per micro-batch:
one SGD step through sovtune's SFTTrainer setup with batch 2 x accumulation 4 equals batch 8, and both equal the
token-weighted gradient computed by hand, which differs clearly from a mean of per-micro-batch means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers import write_jsonl
from sovtune import model as models
from sovtune import speed
from sovtune import training as training
from sovtune.config import load_recipe
from sovtune.inputs import prepare_recipe_data as prepare_data

pytestmark = pytest.mark.slow  # every test takes an optimizer step through Trainer.train
LEARNING_RATE = 0.5
# Answers of very different lengths: micro-batches of 2 hold very different numbers of supervised tokens.
REPEATS = [1, 9, 1, 6, 1, 4, 2, 1]


def rows() -> list[dict[str, Any]]:
    answer = "SELECT name FROM employees;"
    return [
        {
            "messages": [
                {"role": "user", "content": f"List the names. #{i}"},
                {"role": "assistant", "content": " ".join([answer] * repeats)},
            ]
        }
        for i, repeats in enumerate(REPEATS)
    ]


def recipe_for(
    tmp_path: Path, model_dir: Path, batch_size: int, accumulation: int, packing: Any, max_length: int = 256
) -> Any:
    name = f"b{batch_size}x{accumulation}-{packing}-{max_length}"
    train_file = write_jsonl(tmp_path / "train.jsonl", rows())
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows()[:2])
    recipe = {
        "name": name,
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"r": 4, "dropout": 0.0},
        "data": {"train": str(train_file), "eval": str(eval_file), "max_length": max_length, "packing": packing},
        "train": {
            "max_steps": 1,
            "batch_size": batch_size,
            "gradient_accumulation": accumulation,
            "optimizer": "sgd",
            "learning_rate": LEARNING_RATE,
            "scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0e6,
            "gradient_checkpointing": False,
            "seed": 0,
        },
        "output": {"dir": str(tmp_path / "runs" / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return load_recipe(path)


def one_step(
    recipe: Any, supervised_logits: bool | None = None
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], Any]:
    """The gradient of sovtune's first optimizer step (read back from the SGD update), the inputs of each
    micro-batch the trainer ran, and the trainer, with its trainable parameters reset to their initial values.

    TRL's SFTTrainer, or with `supervised_logits` given sovtune's own trainer class with that loss setting."""
    from transformers import set_seed
    from trl import SFTTrainer

    tokenizer = models.load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    assert len(data.train) == len(REPEATS)
    set_seed(recipe.train.seed)  # as training.py does: identical LoRA initialisation in every run
    peft_model = models.attach_adapter(models.load_base_model(recipe, tokenizer), recipe)
    plan = speed.plan_speed(recipe, peft_model, cuda=False)
    trainer_class = SFTTrainer
    if supervised_logits is not None:
        trainer_class = training.held_out_trainer(recipe, tokenizer, None, None, supervised_logits)
    trainer = trainer_class(
        model=peft_model,
        args=training.sft_config(recipe, recipe.run_dir, has_eval=False, plan=plan),
        train_dataset=training.to_dataset(data.train),
        processing_class=tokenizer,
    )
    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    initial = {name: p.detach().clone() for name, p in trainable.items()}
    micro_batches: list[dict[str, Any]] = []

    def keep(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        micro_batches.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    hook = trainer.model.register_forward_pre_hook(keep, with_kwargs=True)
    trainer.train()
    hook.remove()
    gradient = {name: (initial[name] - p.detach()) / LEARNING_RATE for name, p in trainable.items()}
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(initial[name])
    return gradient, micro_batches, trainer


def reference_gradients(trainer: Any, micro_batches: list[dict[str, Any]]) -> tuple[dict, dict]:
    """By hand, on the trainer's own micro-batches: the gradient of the loss summed over every supervised token of
    the step divided by their count, and of the mean of per-micro-batch means (the gradient-accumulation bug)."""
    model = trainer.model
    sums, counts = [], []
    for inputs in micro_batches:
        sums.append(-model(**inputs).log_probs.sum())  # inputs carry fused_lm_head=True, as SFTTrainer passes them
        counts.append(int((inputs["labels"][:, 1:] != -100).sum()))
    token_weighted = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    weighted = dict(zip(names, torch.autograd.grad(token_weighted, params, retain_graph=True)))
    mom = dict(zip(names, torch.autograd.grad(mean_of_means, params)))
    return weighted, mom


def assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=1e-6, rtol=1e-4, msg=name)


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(t.norm() ** 2 for t in tensors.values()) ** 0.5)


def distance(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    return float(sum((left[n] - right[n]).norm() ** 2 for n in left) ** 0.5)


def test_accumulation_normalises_by_supervised_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    big, big_batches, _ = one_step(recipe_for(tmp_path, tiny_model_dir, 8, 1, False))
    assert len(big_batches) == 1
    small, small_batches, trainer = one_step(recipe_for(tmp_path, tiny_model_dir, 2, 4, False))
    assert len(small_batches) == 4
    weighted, mean_of_means = reference_gradients(trainer, small_batches)
    # A mean of per-micro-batch means would give a clearly different step here, so matching is a real check.
    assert distance(mean_of_means, weighted) > 0.05 * norm(weighted)
    assert_same(big, weighted)
    assert_same(small, weighted)


@pytest.mark.parametrize(
    ("packing", "max_length", "passes"), [(True, 256, 4), ("auto", 1024, 8)], ids=["padding-free-rows", "one-by-one"]
)
def test_padding_free_accumulation_matches_batch_8(
    tmp_path: Path, tiny_model_dir: Path, packing: Any, max_length: int, passes: int
) -> None:
    big, _, _ = one_step(recipe_for(tmp_path, tiny_model_dir, 8, 1, False))
    small, small_batches, trainer = one_step(recipe_for(tmp_path, tiny_model_dir, 2, 4, packing, max_length))
    # Rows: 4 flattened micro-batches of 2; auto on the CPU with max_length 1024: 8 passes of one example each.
    assert len(small_batches) == passes
    assert all(batch["input_ids"].shape[0] == 1 for batch in small_batches)
    assert_same(small, big)


@pytest.mark.parametrize(("packing", "max_length"), [(True, 256), (False, 256), ("auto", 1024)])
def test_supervised_positions_loss_equals_trl_fused_head(
    tmp_path: Path, tiny_model_dir: Path, packing: Any, max_length: int
) -> None:
    """The CPU loss (only supervised positions projected to the vocabulary) takes the same optimizer step and logs the
    same metrics as TRL's fused LM head, in padding-free rows, padded batches and one example per pass, accumulated."""
    recipe = recipe_for(tmp_path, tiny_model_dir, 2, 4, packing, max_length)
    fused, _, fused_trainer = one_step(recipe, supervised_logits=False)
    compact, batches, compact_trainer = one_step(recipe, supervised_logits=True)
    assert all("logits_to_keep" in batch and "fused_lm_head" not in batch for batch in batches)  # the CPU loss ran
    assert_same(compact, fused)
    big, _, _ = one_step(recipe_for(tmp_path, tiny_model_dir, 8, 1, False))
    assert_same(compact, big)  # and equals batch 8: the step is still normalised by all its supervised tokens
    logged = [trainer.state.log_history[0] for trainer in (fused_trainer, compact_trainer)]
    for key in ("loss", "mean_token_accuracy", "entropy", "num_tokens"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-5), key


def test_cpu_plan_projects_supervised_positions_only(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = recipe_for(tmp_path, tiny_model_dir, 2, 4, "auto")
    model = models.load_base_model(recipe)
    cpu = speed.plan_speed(recipe, model, cuda=False)
    assert cpu.supervised_logits and "loss: supervised positions only (no Triton on the CPU" in "\n".join(cpu.lines())
    assert not speed.plan_speed(recipe, model, cuda=True).supervised_logits  # TRL's Triton head compacts on CUDA

    class OldRemoteCode(torch.nn.Module):  # a forward without logits_to_keep keeps TRL's head
        def forward(self, input_ids: Any = None, labels: Any = None) -> Any:
            return None

    old = speed.plan_speed(recipe, OldRemoteCode(), cuda=False)
    assert not old.supervised_logits
    assert "loss: TRL's fused, chunked LM head (OldRemoteCode does not take logits_to_keep)" in old.lines()
