"""Training on the CPU: LoRA and QLoRA runs whose loss falls, resume, and adapters that reload in plain peft.

The runs are module-scoped and shared by the tests that inspect them, so each is trained once.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import build_tiny_model, build_tokenizer, qa_rows, write_recipe
from sovtune import model as models
from sovtune import training as training
from sovtune.config import Recipe, load_recipe
from sovtune.run.checkpoints import last_checkpoint
from sovtune.run.directory import RunDirError

STEPS = 20
TRAIN = {"max_steps": STEPS, "save_steps": 10, "save_total_limit": 2, "learning_rate": 1e-2, "warmup_steps": 0}


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with larger initial weights. With the usual 0.02 init the untouched lm_head keeps logits
    near-uniform whatever LoRA does to the hidden states, so the loss can barely move; 0.2 lets it fall."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return build_tiny_model(tmp_path_factory.mktemp("learnable"), tokenizer, initializer_range=0.2)


@dataclass
class TrainedRun:
    recipe: Recipe
    result: training.TrainResult
    probe: torch.Tensor  # input ids the in-memory model was run on right after training
    logits: torch.Tensor  # its logits: what the saved adapter must reproduce
    model: Any  # the in-memory trained peft model


def probe_ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chats = [row["messages"] for row in qa_rows(2)]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    shortest = min(len(i) for i in ids)
    return torch.tensor([i[:shortest] for i in ids])


def train_and_probe(recipe: Recipe, audit_log: Path, **train_kwargs: Any) -> TrainedRun:
    """Run `sovtune.training.train` and keep the in-memory model it saves, with its logits on a probe batch."""
    kept: dict[str, Any] = {}
    save = training.save_adapter

    def keep_and_save(peft_model: Any, *args: Any, **kwargs: Any) -> Path:
        kept["model"] = peft_model
        return save(peft_model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "save_adapter", keep_and_save)
        patch.setenv("SOVTUNE_AUDIT_LOG", str(audit_log))
        result = training.train(recipe, **train_kwargs)
    model = kept["model"].eval()
    probe = probe_ids(Path(recipe.model_location))
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    return TrainedRun(recipe, result, probe, logits, model)


def losses(run: TrainedRun) -> list[float]:
    return [entry["loss"] for entry in run.result.metrics["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, learnable_model_dir: Path) -> TrainedRun:
    folder = tmp_path_factory.mktemp("lora")
    path = write_recipe(folder, learnable_model_dir, "lora", rows=qa_rows(32), adapter={"r": 8}, train=TRAIN)
    return train_and_probe(load_recipe(path), folder / "audit.jsonl")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, learnable_model_dir: Path) -> TrainedRun:
    folder = tmp_path_factory.mktemp("qlora")
    path = write_recipe(
        folder,
        learnable_model_dir,
        "qlora",
        rows=qa_rows(32),
        adapter={"r": 8},
        quantization={"mode": "4bit", "quant_type": "nf4", "double_quant": True},
        train={**TRAIN, "save_steps": 100},
    )
    return train_and_probe(load_recipe(path), folder / "audit.jsonl")


def plain_peft(base: Path, adapter: Path, **base_kwargs: Any) -> Any:
    """The adapter as a user would load it, with nothing from sovtune."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **base_kwargs), adapter).eval()


# ---------------------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.slow
def test_lora_loss_falls(lora_run: TrainedRun) -> None:
    loss = losses(lora_run)
    assert len(loss) == STEPS  # logging_steps: 1
    # Near-uniform over the 400-token vocabulary at the start (ln 400 = 5.99); the fixed answers are then learnt.
    assert loss[0] > 5.5
    assert loss[-1] < loss[0] - 3.0, loss
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 2.5, loss
    assert lora_run.result.metrics["global_step"] == STEPS
    assert lora_run.result.metrics["resumed_from"] is None


@pytest.mark.slow
def test_lora_run_directory(lora_run: TrainedRun) -> None:
    run_dir = lora_run.result.run_dir
    adapter = run_dir / "adapter"
    assert lora_run.result.adapter_dir == adapter
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter / name).is_file(), name
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    # all-linear: every linear layer of the blocks (peft may store full module paths), never the output head.
    adapted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # The chat template travels with the adapter, so inference renders prompts exactly as training did.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(adapter)
    assert saved.chat_template == AutoTokenizer.from_pretrained(lora_run.recipe.model_location).chat_template
    assert saved.pad_token_id != saved.eos_token_id
    # The resolved recipe reloads to the same settings.
    again = load_recipe(run_dir / "recipe.yaml")
    assert again.model_dump(exclude={"source_path"}) == lora_run.recipe.model_dump(exclude={"source_path"})
    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    assert metrics["global_step"] == STEPS and [e["loss"] for e in metrics["log_history"] if "loss" in e] == losses(
        lora_run
    )
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["train"]["kept"] == 24 and stats["eval"]["kept"] == 8
    assert list((run_dir / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-10", "checkpoint-20"]


@pytest.mark.slow
def test_saved_lora_adapter_reloads_in_plain_peft_with_identical_logits(lora_run: TrainedRun) -> None:
    reloaded = plain_peft(Path(lora_run.recipe.model_location), lora_run.result.adapter_dir)
    with torch.no_grad():
        logits = reloaded(input_ids=lora_run.probe).logits
    torch.testing.assert_close(logits, lora_run.logits, rtol=0, atol=1e-6)
    # A real check: the adapter changed the model, so a reload that silently dropped it would fail.
    with torch.no_grad(), reloaded.disable_adapter():
        base_logits = reloaded(input_ids=lora_run.probe).logits
    assert (base_logits - lora_run.logits).abs().max() > 0.1


@pytest.mark.slow
def test_occupied_run_dir_is_refused(lora_run: TrainedRun) -> None:
    run_dir = lora_run.result.run_dir
    with pytest.raises(RunDirError) as info:
        training.train(lora_run.recipe)
    assert str(info.value) == (
        f"{run_dir}: already holds a run; continue it with --resume, or choose another --set output.dir=..."
    )


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path, learnable_model_dir: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, learnable_model_dir, "fresh"))
    with pytest.raises(RunDirError) as info:
        training.train(recipe, resume=True)
    assert str(info.value) == f"{recipe.run_dir}: no complete checkpoint to resume from; run without --resume"
    assert not recipe.run_dir.exists()


@pytest.mark.slow
def test_resume_continues_from_the_last_complete_checkpoint(lora_run: TrainedRun, tmp_path: Path) -> None:
    """Interrupt the LoRA run after step 10 (drop what came later), resume it, and land on the same adapter."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "interrupted"
    shutil.copytree(lora_run.result.run_dir, run_dir)
    for later in ("adapter", "train_metrics.json", "checkpoints/checkpoint-20"):
        shutil.rmtree(run_dir / later) if (run_dir / later).is_dir() else (run_dir / later).unlink()
    # A checkpoint the trainer had not finished writing (no trainer_state.json) is not resumed from.
    (run_dir / "checkpoints" / "checkpoint-15").mkdir()
    assert last_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-10"
    recipe = load_recipe(lora_run.recipe.source_path, [f"output.dir={run_dir}"])

    resumed = train_and_probe(recipe, tmp_path / "audit.jsonl", resume=True)

    assert resumed.result.metrics["global_step"] == STEPS
    assert resumed.result.metrics["resumed_from"] == "checkpoint-10"
    assert json.loads((run_dir / "train_metrics.json").read_text())["resumed_from"] == "checkpoint-10"
    new_steps = [e["step"] for e in resumed.result.metrics["log_history"] if "loss" in e and e["step"] > 10]
    assert new_steps == list(range(11, STEPS + 1))
    # Optimizer, scheduler, RNG and data order were restored: the same weights as the uninterrupted run.
    uninterrupted = load_file(lora_run.result.adapter_dir / "adapter_model.safetensors")
    continued = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert uninterrupted.keys() == continued.keys()
    for key in uninterrupted:
        torch.testing.assert_close(continued[key], uninterrupted[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resumed.logits, lora_run.logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# QLoRA (bitsandbytes 4-bit runs on the CPU)


@pytest.mark.slow
def test_qlora_quantizes_the_base_to_nf4_with_double_quant(qlora_run: TrainedRun) -> None:
    import bitsandbytes as bnb

    quantized = [m for m in qlora_run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every linear layer of both blocks; lm_head stays in full precision
    assert {m.weight.quant_state.quant_type for m in quantized} == {"nf4"}
    # double quantisation (bitsandbytes' AVX512-BF16 CPU repacking, done at the first eval forward, un-nests the
    # block scales and records the original setting)
    assert all(getattr(m.weight.quant_state, "original_nested", m.weight.quant_state.nested) for m in quantized)
    trainable = {name: p.dtype for name, p in qlora_run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # fp32 compute on the CPU: the adapter trains in fp32 (as peft reloads it), not in TRL's bf16.
    assert set(trainable.values()) == {torch.float32}


@pytest.mark.slow
def test_qlora_loss_falls(qlora_run: TrainedRun) -> None:
    loss = losses(qlora_run)
    assert len(loss) == STEPS
    assert loss[0] > 5.5
    assert loss[-1] < loss[0] - 3.0, loss
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 2.5, loss


@pytest.mark.slow
def test_saved_qlora_adapter_reloads_on_a_4bit_base_with_identical_logits(qlora_run: TrainedRun) -> None:
    from transformers import BitsAndBytesConfig

    config = json.loads((qlora_run.result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    reloaded = plain_peft(
        Path(qlora_run.recipe.model_location), qlora_run.result.adapter_dir, quantization_config=quantization
    )
    # The tiny model's 32-wide layers are below bitsandbytes' CPU repacking block (a crash on AVX512-BF16 CPUs that
    # real model widths never meet); sovtune's loader does the same.
    models.keep_unpackable_4bit_layers_unpacked(reloaded)
    with torch.no_grad():
        logits = reloaded(input_ids=qlora_run.probe).logits
    torch.testing.assert_close(logits, qlora_run.logits, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Adapter variants


@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_dora_and_rslora_adapters_build_and_train_a_step(variant: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, variant, adapter={"type": variant, "r": 4, "alpha": 8}))
    config = models.lora_config(recipe)
    assert (config.use_dora, config.use_rslora) == (variant == "dora", variant == "rslora")
    model = models.attach_adapter(models.load_base_model(recipe), recipe)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    if variant == "dora":
        assert "default" in layer.lora_magnitude_vector
        assert layer.lora_magnitude_vector["default"].weight.requires_grad
    else:
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # alpha / sqrt(r), not alpha / r
    ids = torch.tensor([[1, 5, 9, 12, 2]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_lora_alpha_defaults_to_twice_the_rank(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, "alpha", adapter={"r": 6}))
    config = models.lora_config(recipe)
    assert (config.r, config.lora_alpha, config.use_dora, config.use_rslora) == (6, 12, False, False)


# ---------------------------------------------------------------------------------------------------------------
# Batching changes memory, not the maths


@pytest.mark.slow
def test_accumulation_checkpointing_and_packing_leave_the_step_unchanged(
    tmp_path: Path, learnable_model_dir: Path
) -> None:
    """One optimizer step over the same 6 rows of different lengths, three ways: one batch; two micro-batches of 3
    with gradient checkpointing; packed padding-free rows. Loss, gradient norm and the updated adapter must agree:
    a per-micro-batch mean (the classic accumulation bug) or attention leaking across packed rows would not.
    SGD, because Adam's first step is about lr * sign(gradient), which flips on near-zero components."""
    from safetensors.torch import load_file

    rows = qa_rows(8)
    for i, row in enumerate(rows):
        row["messages"][1]["content"] += " and more" * i
    ways = {
        "one-batch": ({}, {"batch_size": 6}),
        "accumulated": ({}, {"batch_size": 3, "gradient_accumulation": 2, "gradient_checkpointing": True}),
        "packed": ({"packing": True}, {"batch_size": 6}),
    }
    results = {}
    for name, (data, train) in ways.items():
        path = write_recipe(
            tmp_path,
            learnable_model_dir,
            name,
            rows=rows,
            adapter={"r": 8},
            data={"max_length": 128, **data},
            train={**TRAIN, "max_steps": 1, "save_steps": 100, "optimizer": "sgd", **train},
        )
        result = training.train(load_recipe(path))
        assert json.loads((result.run_dir / "data_stats.json").read_text())["train"]["kept"] == 6
        first = result.metrics["log_history"][0]
        results[name] = (first["loss"], first["grad_norm"], load_file(result.adapter_dir / "adapter_model.safetensors"))
    loss, grad_norm, weights = results["one-batch"]
    for name, (other_loss, other_norm, other_weights) in results.items():
        assert other_loss == pytest.approx(loss, rel=1e-6), name
        assert other_norm == pytest.approx(grad_norm, rel=1e-5), name
        for key in weights:
            torch.testing.assert_close(other_weights[key], weights[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


# ---------------------------------------------------------------------------------------------------------------
# A vocabulary with no spare token for padding


@pytest.mark.slow
def test_added_pad_token_resizes_the_model_and_the_adapter_carries_the_embeddings(tmp_path: Path) -> None:
    """pad == eos and nothing to reuse: a pad token is added, both embedding matrices grow, and the adapter saves
    them. peft can then only load it on a base resized the same way, which is what this checks."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "no-pad"
    tokenizer = build_tokenizer(model_dir, pad_token=None, unk_token=None)
    tokenizer.pad_token = tokenizer.eos_token
    build_tiny_model(model_dir, tokenizer, initializer_range=0.2)
    recipe = load_recipe(write_recipe(tmp_path, model_dir, "added-pad", train={**TRAIN, "max_steps": 2}))

    run = train_and_probe(recipe, tmp_path / "audit.jsonl")

    assert run.model.get_input_embeddings().weight.shape[0] == 401
    saved = AutoTokenizer.from_pretrained(run.result.adapter_dir)
    assert (saved.pad_token, saved.pad_token_id, len(saved)) == ("<|pad|>", 400, 401)
    weights = load_file(run.result.adapter_dir / "adapter_model.safetensors")
    embeddings = {key: value.shape for key, value in weights.items() if "embed_tokens" in key or "lm_head" in key}
    assert sorted(shape[0] for shape in embeddings.values()) == [401, 401], embeddings

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(saved))
    reloaded = PeftModel.from_pretrained(base, run.result.adapter_dir).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=run.probe).logits
    torch.testing.assert_close(logits, run.logits, rtol=0, atol=1e-6)


def test_4bit_layers_bitsandbytes_cannot_repack_for_the_cpu_keep_the_unpacked_path() -> None:
    """bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel in eval mode and asserts
    out_features % 32 == 0."""
    from types import SimpleNamespace

    class Model:
        def __init__(self, layers: list[Any]) -> None:
            self.layers = layers

        def modules(self) -> list[Any]:
            return self.layers

    def layer(out_features: int, in_features: int, blocksize: int = 64) -> Any:
        weight = SimpleNamespace(quant_state=SimpleNamespace(blocksize=blocksize))
        return SimpleNamespace(
            support_avx512bf16_for_cpu=True, out_features=out_features, in_features=in_features, weight=weight
        )

    wide_out, wide_in, small_blocks, fine = (
        layer(688, 256),
        layer(256, 688),
        layer(256, 96, blocksize=32),
        layer(256, 256),
    )
    plain = SimpleNamespace(out_features=7, in_features=7)  # not a bitsandbytes layer: no such switch
    assert models.keep_unpackable_4bit_layers_unpacked(Model([wide_out, wide_in, small_blocks, fine, plain])) == 2
    assert not wide_out.support_avx512bf16_for_cpu and not wide_in.support_avx512bf16_for_cpu
    assert small_blocks.support_avx512bf16_for_cpu and fine.support_avx512bf16_for_cpu


def test_qlora_base_with_a_688_wide_mlp_evaluates_on_the_cpu(tmp_path: Path) -> None:
    """The quickstart base's MLP is 688 wide: on CPUs with AVX512-BF16 its eval forward crashed inside bitsandbytes."""
    import bitsandbytes as bnb

    model_dir = build_tiny_model(tmp_path / "m", build_tokenizer(tmp_path / "m"), hidden_size=64, intermediate_size=688)
    recipe = load_recipe(write_recipe(tmp_path, model_dir, "q", quantization={"mode": "4bit", "quant_type": "nf4"}))
    model = models.load_base_model(recipe).eval()
    wide = [
        m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and (m.out_features % 32 or m.in_features % 64)
    ]
    assert wide and not any(m.support_avx512bf16_for_cpu for m in wide)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()
