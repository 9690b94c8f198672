"""Shared fixtures: a tiny Llama-architecture model with a tokenizer trained on the fly, and recipe files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: tiny models gain nothing from more, and on a shared, loaded CPU the spinning OpenMP
# workers made each training step ~20x slower. Set before anything imports torch (child processes inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM employees WHERE salary > 1000;",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b",
    "Sovereign fine-tuning keeps data and models under your control.",
    "How many employees work in the Sales department? Twelve people work there.",
] * 20


def build_tokenizer(path: Path, pad_token: str | None = "<pad>", unk_token: str | None = "<unk>") -> Any:
    """A byte-level BPE trained on CORPUS; pad/unk can be renamed or left out to mimic other tokenizer families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [t for t in (unk_token, "<s>", "</s>", pad_token) if t] + ["<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token=pad_token,
        unk_token=unk_token,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: Path, tokenizer: Any, seed: int = 0, **overrides: Any) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**{**settings, **overrides})
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _audit_log_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit events written by commands under test go to a temporary log, never to ~/.sovtune."""
    monkeypatch.setenv("SOVTUNE_AUDIT_LOG", str(tmp_path_factory.getbasetemp() / "audit.jsonl"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with a 400-token BPE and a ChatML template, saved like a hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(path)
    return build_tiny_model(path, tokenizer)


def qa_rows(n: int = 24) -> list[dict[str, Any]]:
    """Chat rows with a learnable mapping (question -> fixed answer)."""
    pairs = [
        ("How many employees?", "SELECT COUNT(*) FROM employees;"),
        ("List the names.", "SELECT name FROM employees;"),
    ]
    rows = []
    for i in range(n):
        question, answer = pairs[i % len(pairs)]
        rows.append(
            {"messages": [{"role": "user", "content": f"{question} #{i}"}, {"role": "assistant", "content": answer}]}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_recipe(
    folder: Path, model_dir: Path, name: str = "recipe", rows: list[dict[str, Any]] | None = None, **sections: Any
) -> Path:
    """A recipe YAML (and its training rows) in `folder`; sections given as dicts are merged over small defaults.

    A plain function so module-scoped fixtures can share one trained run; `make_recipe` wraps it per test.
    """
    data_file = write_jsonl(folder / f"{name}-train.jsonl", rows if rows is not None else qa_rows())
    recipe: dict[str, Any] = {
        "name": name,
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"r": 4, "dropout": 0.0},
        "data": {"train": str(data_file), "format": "messages", "max_length": 64, "eval_fraction": 0.25},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 2,
            "gradient_checkpointing": False,
            "seed": 0,
        },
        "output": {"dir": str(folder / "runs" / name)},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_model_dir: Path):
    """Write a recipe YAML for the tiny model; sections given as dicts are merged over small defaults."""

    def make(name: str = "recipe", rows: list[dict[str, Any]] | None = None, **sections: Any) -> Path:
        return write_recipe(tmp_path, tiny_model_dir, name, rows, **sections)

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)
