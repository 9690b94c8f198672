"""Padding-free batches: same per-example loss and gradients as padded batches, no example sees another, and the
speed plan that turns them on (or explains why not) from the recipe, the model and the machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sovtune import speed
from sovtune import training as training
from sovtune.config import load_recipe

# Prompt tokens (masked) and completion tokens of each example: different lengths, so padding differs per row.
SHAPES = [(5, 4), (3, 17), (2, 2), (8, 9)]


def load_model(model_dir: Path, attention: str) -> Any:
    """The tiny Llama in fp32 with TRL's fused LM head: the per-token log-probabilities SFTTrainer trains on."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    add_fused_lm_head(model, outputs=("log_probs",))
    return model


def make_examples(vocab: int, pad_id: int, seed: int = 0, shapes: list[tuple[int, int]] = SHAPES) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for prompt, completion in shapes:
        ids = torch.randint(10, vocab, (prompt + completion,), generator=generator)
        assert pad_id not in ids.tolist()
        labels = ids.clone()
        labels[:prompt] = -100
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return examples


def collate(examples: list[dict], pad_id: int, padding_free: bool) -> dict[str, Any]:
    """TRL's own collator, as SFTTrainer builds it."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=padding_free)(examples)


def per_example_nll(model: Any, batch: dict[str, Any], padding_free: bool, lengths: list[int]) -> list[torch.Tensor]:
    """Summed negative log-likelihood of each example's supervised tokens."""
    log_probs = model(**batch, fused_lm_head=True, use_cache=False).log_probs  # zero where the label is -100
    if not padding_free:
        return [-row.sum() for row in log_probs]
    sums, start = [], 0
    for length in lengths:
        # Position t predicts token t + 1: an example's own predictions end one before its last token.
        sums.append(-log_probs[0, start : start + length - 1].sum())
        start += length
    return sums


def supervised_counts(examples: list[dict]) -> list[int]:
    return [sum(1 for label in example["labels"][1:] if label != -100) for example in examples]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_loss_and_gradients_equal_padded(tiny_model_dir: Path, attention: str) -> None:
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, attention)
    pad_id = model.config.pad_token_id
    examples = make_examples(model.config.vocab_size, pad_id)
    lengths = [len(example["input_ids"]) for example in examples]
    counts = supervised_counts(examples)
    padded, flat = collate(examples, pad_id, False), collate(examples, pad_id, True)
    assert "attention_mask" in padded and (padded["input_ids"] == pad_id).any()
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, sum(lengths))
    assert not (flat["input_ids"] == pad_id).any()

    params = [p for p in model.parameters() if p.requires_grad]
    padded_nll = per_example_nll(model, padded, False, lengths)
    flat_nll = per_example_nll(model, flat, True, lengths)
    for index, count in enumerate(counts):
        padded_loss, flat_loss = padded_nll[index] / count, flat_nll[index] / count
        torch.testing.assert_close(flat_loss, padded_loss, atol=1e-5, rtol=1e-5)
        padded_grads = torch.autograd.grad(padded_loss, params, retain_graph=True)
        flat_grads = torch.autograd.grad(flat_loss, params, retain_graph=True)
        for flat_grad, padded_grad in zip(flat_grads, padded_grads):
            torch.testing.assert_close(flat_grad, padded_grad, atol=1e-5, rtol=1e-5)
    # The batch loss the trainer optimises: every supervised token weighted equally.
    total = sum(counts)
    padded_batch = torch.autograd.grad(sum(padded_nll) / total, params)
    flat_batch = torch.autograd.grad(sum(flat_nll) / total, params)
    for flat_grad, padded_grad in zip(flat_batch, padded_batch):
        torch.testing.assert_close(flat_grad, padded_grad, atol=1e-5, rtol=1e-5)


def test_changing_one_example_leaves_the_others_in_the_row_unchanged(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, "sdpa").eval()
    pad_id = model.config.pad_token_id
    examples = make_examples(model.config.vocab_size, pad_id, shapes=[(4, 6), (5, 7), (3, 8)])
    changed = [examples[0], make_examples(model.config.vocab_size, pad_id, seed=1, shapes=[(9, 11)])[0], examples[2]]

    def losses(batch_examples: list[dict], restart_positions: bool = True) -> list[torch.Tensor]:
        batch = collate(batch_examples, pad_id, padding_free=True)
        if not restart_positions:  # what a naive packer does: one long sequence, examples see each other
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        lengths = [len(example["input_ids"]) for example in batch_examples]
        with torch.no_grad():
            return per_example_nll(model, batch, True, lengths)

    before, after = losses(examples), losses(changed)
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[2], before[2], atol=1e-6, rtol=0)
    assert not torch.isclose(after[1], before[1], atol=1e-3)
    # The check can fail: without restarting position ids the last example reads the changed one.
    naive_before, naive_after = losses(examples, False), losses(changed, False)
    assert not torch.isclose(naive_after[2], naive_before[2], atol=1e-4)


def test_trainer_batches_are_padding_free_with_restarting_positions(make_recipe: Any, tmp_path: Path) -> None:
    from trl import SFTTrainer

    from sovtune import model as models
    from sovtune.inputs import prepare_recipe_data as prepare_data

    recipe = load_recipe(make_recipe(data={"packing": True}))
    tokenizer = models.load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    peft_model = models.attach_adapter(models.load_base_model(recipe, tokenizer), recipe)
    plan = speed.plan_speed(recipe, peft_model, cuda=False)
    assert plan.batching == speed.ROWS
    trainer = SFTTrainer(
        model=peft_model,
        args=training.sft_config(recipe, tmp_path / "run", has_eval=False, plan=plan),
        train_dataset=training.to_dataset(data.train),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape[0] == 1
    assert not (batch["input_ids"] == tokenizer.pad_token_id).any()
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == recipe.train.batch_size
    ends = starts[1:] + [batch["input_ids"].shape[1]]
    for start, end in zip(starts, ends):
        assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))
        assert batch["labels"][0, start] == -100  # the previous example's last token never predicts this one
    # The row is exactly the examples, back to back: each one is a training example of this length.
    known = {tuple(item.input_ids) for item in data.train}
    for start, end in zip(starts, ends):
        assert tuple(batch["input_ids"][0, start:end].tolist()) in known


# ---------------------------------------------------------------------------------------------------------------
# The plan


def loaded(recipe: Any) -> Any:
    from sovtune import model as models

    return models.attach_adapter(models.load_base_model(recipe, models.load_tokenizer(recipe)), recipe)


def test_cpu_plan_caps_rows_with_kernels_off_and_reasons(make_recipe: Any, tmp_path: Path) -> None:
    recipe = load_recipe(make_recipe(train={"torch_compile": True, "liger_kernel": True, "gradient_accumulation": 3}))
    plan = speed.plan_speed(recipe, loaded(recipe), cuda=False)
    # max_length 64: 16 examples would fit a 1,024-token row, so the whole batch of 4 is one row.
    assert (plan.batching, plan.micro_batch_size, plan.accumulation) == (speed.ROWS, 4, 3)
    assert not plan.liger_kernel and not plan.torch_compile
    text = "\n".join(plan.lines())
    assert "batching: padding-free rows (each row restarts position ids per example; sdpa gets a block-diagonal" in text
    assert "liger kernels: off (Liger's kernels are Triton GPU kernels and there is no CUDA device)" in text
    assert "torch.compile: off (no CUDA device" in text
    assert "precision: fp32 (no CUDA device" in text
    config = training.sft_config(recipe, tmp_path, has_eval=False, plan=plan)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 3)
    assert config.padding_free and not config.packing and config.max_length is None
    assert config.train_sampling_strategy == "random" and not config.use_liger_kernel and not config.torch_compile


@pytest.mark.parametrize(
    ("max_length", "batch", "expected"),
    [
        (512, 8, (speed.ROWS, 2, 4 * 3)),
        (400, 6, (speed.ROWS, 2, 3 * 3)),
        (1024, 4, (speed.ONE_BY_ONE, 1, 4 * 3)),
        (700, 5, (speed.ONE_BY_ONE, 1, 5 * 3)),
    ],
)
def test_cpu_rows_hold_at_most_1024_tokens(make_recipe: Any, max_length: int, batch: int, expected: tuple) -> None:
    recipe = load_recipe(
        make_recipe(data={"max_length": max_length}, train={"batch_size": batch, "gradient_accumulation": 3})
    )
    plan = speed.plan_speed(recipe, loaded(recipe), cuda=False)
    assert (plan.batching, plan.micro_batch_size, plan.accumulation) == expected
    assert "a row holds at most 1024 tokens" in plan.lines()[0]
    if plan.batching == speed.ONE_BY_ONE:
        assert plan.lines()[0].startswith(
            f"batching: padding-free, one example per micro-batch, {batch * 3} accumulated"
        )
        assert not plan.sft_kwargs(max_length)["padding_free"]  # a single example needs no flattening
    # On CUDA the rows keep the whole batch.
    assert speed.plan_speed(recipe, loaded(recipe), cuda=True).micro_batch_size == batch


def test_rows_on_request_or_on_cuda(make_recipe: Any, tmp_path: Path) -> None:
    forced = load_recipe(make_recipe(data={"packing": True}))
    model = loaded(forced)
    plan = speed.plan_speed(forced, model, cuda=False)
    assert (plan.batching, plan.micro_batch_size, plan.accumulation) == (speed.ROWS, 4, 1)
    assert "sdpa gets a block-diagonal causal mask" in plan.lines()[0]
    config = training.sft_config(forced, tmp_path, has_eval=False, plan=plan)
    assert config.padding_free and config.max_length is None and config.per_device_train_batch_size == 4
    auto = load_recipe(make_recipe(name="auto"))
    assert speed.plan_speed(auto, model, cuda=True).batching == speed.ROWS


def test_packing_off_groups_padded_batches_by_length(make_recipe: Any, tmp_path: Path) -> None:
    recipe = load_recipe(make_recipe(data={"packing": False}))
    plan = speed.plan_speed(recipe, loaded(recipe), cuda=False)
    assert (plan.batching, plan.micro_batch_size, plan.accumulation) == (speed.GROUPED, 4, 1)
    config = training.sft_config(recipe, tmp_path, has_eval=False, plan=plan)
    assert config.train_sampling_strategy == "group_by_length" and not config.padding_free
    assert config.max_length == recipe.data.max_length


def test_batch_of_one_needs_neither(make_recipe: Any) -> None:
    recipe = load_recipe(make_recipe(train={"batch_size": 1, "gradient_accumulation": 2}))
    plan = speed.plan_speed(recipe, loaded(recipe), cuda=True)
    assert (plan.batching, plan.micro_batch_size, plan.accumulation) == (speed.ONE_BY_ONE, 1, 2)
    assert "nothing to pad" in plan.lines()[0]


class OpaqueLM(torch.nn.Module):
    """A model whose code (this module) builds no mask from position ids: packed examples would mix."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": "sdpa", "model_type": "opaque"})()


def test_model_without_mask_utilities_falls_back_or_stops(make_recipe: Any) -> None:
    auto = load_recipe(make_recipe())
    plan = speed.plan_speed(auto, OpaqueLM(), cuda=True)
    assert plan.batching == speed.GROUPED
    assert "OpaqueLM does not build its attention mask with transformers' masking utilities" in plan.lines()[0]
    # One example per pass needs no mask at all, so that CPU plan does not depend on the model's mask code.
    long_rows = load_recipe(make_recipe(name="long", data={"max_length": 1024}))
    assert speed.plan_speed(long_rows, OpaqueLM(), cuda=False).batching == speed.ONE_BY_ONE
    forced = load_recipe(make_recipe(name="forced", data={"packing": True}))
    with pytest.raises(speed.SpeedError, match=r"^data.packing: true, but OpaqueLM .* set data.packing: auto"):
        speed.plan_speed(forced, OpaqueLM(), cuda=False)


def test_unknown_attention_kernel_is_not_trusted_with_packed_rows() -> None:
    assert speed.padding_free_blocker(None, "flash_attention_2") is None
    assert "not known to keep examples" in (speed.padding_free_blocker(None, "my_custom_kernel") or "")


def test_liger_on_cuda_follows_install_and_architecture(make_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(make_recipe())
    model = loaded(recipe)
    monkeypatch.setattr(speed, "liger_model_types", lambda: None)
    plan = speed.plan_speed(recipe, model, cuda=True)
    assert not plan.liger_kernel and "liger-kernel is not installed" in "\n".join(plan.lines())
    forced = load_recipe(make_recipe(name="forced", train={"liger_kernel": True}))
    with pytest.raises(speed.SpeedError, match="liger-kernel is not installed"):
        speed.plan_speed(forced, model, cuda=True)
    monkeypatch.setattr(speed, "liger_model_types", lambda: {"llama", "mistral"})
    assert speed.plan_speed(recipe, model, cuda=True).liger_kernel
    assert speed.plan_speed(recipe, model, cuda=True).sft_kwargs(64)["use_liger_kernel"]
    monkeypatch.setattr(speed, "liger_model_types", lambda: {"gemma"})
    plan = speed.plan_speed(recipe, model, cuda=True)
    assert not plan.liger_kernel and "no kernels for model type 'llama'" in "\n".join(plan.lines())
    with pytest.raises(speed.SpeedError, match="no kernels for model type 'llama'"):
        speed.plan_speed(forced, model, cuda=True)


def test_torch_compile_is_a_cuda_option(make_recipe: Any) -> None:
    recipe = load_recipe(make_recipe(train={"torch_compile": True}))
    assert speed.plan_speed(recipe, cuda=True).torch_compile
    assert speed.plan_speed(recipe, cuda=True).sft_kwargs(64)["torch_compile"]
    assert not speed.plan_speed(recipe, cuda=False).torch_compile
    default = load_recipe(make_recipe(name="default"))
    assert not speed.plan_speed(default, cuda=True).torch_compile


def test_recipe_packing_values(make_recipe: Any) -> None:
    from sovtune.errors import RecipeError

    assert load_recipe(make_recipe(data={"packing": True})).data.packing is True
    assert load_recipe(make_recipe(name="off", data={"packing": False})).data.packing is False
    with pytest.raises(RecipeError, match="packing"):
        load_recipe(make_recipe(name="bad", data={"packing": "sometimes"}))


@pytest.mark.slow
def test_train_prints_the_plan(make_recipe: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sovtune")
    recipe = load_recipe(make_recipe(train={"max_steps": 1}))
    result = training.train(recipe)
    text = caplog.text
    assert "speed: batching: padding-free rows" in text
    assert "speed: liger kernels: off" in text and "speed: torch.compile: off" in text
    assert result.metrics["global_step"] == 1
