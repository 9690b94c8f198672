"""What tests share: a tiny model and tokenizer built on the fly, recipe files, the CLI in-process and in a child
process, a run directory as `sovtune train` leaves it, and the guard that keeps every training test marked slow.

Plain functions only; the fixtures built on them live in conftest.py. Test modules import from here, never from
conftest.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Generator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
import typer.main
import typer.testing
import yaml
from typer.testing import CliRunner

from sovtune import model as models
from sovtune.cli import app
from sovtune.config import Recipe, load_recipe
from sovtune.core.rundir import RunDir
from sovtune.inputs import prepare_recipe_data
from sovtune.licence import check_licence
from sovtune.run import fingerprint, manifest
from sovtune.run.directory import check_run_dir, replace_run_dir
from sovtune.run.lock import RunLock
from sovtune.training import save_adapter

ROOT = Path(__file__).resolve().parents[1]

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


# ---------------------------------------------------------------------------------------------------------------
# A tiny model, its tokenizer, rows and recipes


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

    A plain function so module-scoped fixtures can share one trained run; the `make_recipe` fixture wraps it per test.
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


# ---------------------------------------------------------------------------------------------------------------
# The command line


def invoke(*args: Any, input: str | None = None) -> Any:
    """`sovtune ARGS...` in this process (Typer's CliRunner): exit code, stdout and stderr apart, the exception;
    `input` is what the user types (prompts)."""
    with mock.patch.object(typer.testing, "_get_command", _click_command):
        return CliRunner().invoke(app, [str(arg) for arg in args], input=input)


@functools.cache
def _click_command(typer_app: Any) -> Any:
    """The click command Typer builds from the app, built once: Typer's CliRunner rebuilds it from every command's
    signature on each call (~0.1 s, most of a quick command's time; `sovtune` itself builds it once per process)."""
    return typer.main.get_command(typer_app)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child `sovtune`: this worktree's sources, offline, one thread (as in-process)."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def run_cli(
    *args: Any, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """The real entry point (`python -m sovtune ARGS...`) in a child process: what a user's shell sees.

    `env` adds variables to `child_env()`. A test that runs `train`, `run` or `launch` this way trains a model out of
    the training guard's reach: mark it slow by hand.
    """
    return subprocess.run(
        [sys.executable, "-m", "sovtune", *(str(arg) for arg in args)],
        cwd=cwd,
        env=child_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------------------------
# A run directory as `sovtune train` leaves it


def make_run(recipe_path: Path, seed: int = 0, scale: float = 0.3) -> Recipe:
    """The run directory `sovtune train` leaves, built in seconds through training's own code paths, minus the
    optimisation steps: the same lock and run-directory check, data_stats.json, heldout.json, run_fingerprint.json,
    manifest.json started with the licence verdict, the adapter saved by `training.save_adapter` (its LoRA B weights
    random, non-zero, so it changes the model), train_metrics.json and the train stage recorded in the manifest.
    """
    import torch
    from transformers import set_seed

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path)
    with RunLock(recipe.run_dir):
        licence = check_licence(recipe)
        run = RunDir(recipe.run_dir)
        check_run_dir(recipe, resume=False, overwrite=False)
        tokenizer = models.load_tokenizer(recipe)
        data = prepare_recipe_data(recipe, tokenizer)
        set_seed(recipe.train.seed)
        adapted = models.attach_adapter(models.load_base_model(recipe, tokenizer), recipe)
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:  # freshly initialised B is zero: the adapter would change nothing
                parameter.data = torch.randn(parameter.shape, generator=generator) * scale
        replace_run_dir(recipe, overwrite=False)  # the folder and its run marker, as training makes them
        fingerprint.write_fingerprint(run.path, fingerprint.run_fingerprint(recipe, data))
        run.write_json(RunDir.DATA_STATS, data.stats)
        run.write_json(RunDir.HELDOUT, {"origins": [example.origin for example in data.eval_examples]})
        manifest.start(recipe, run.path, tokenizer, data_stats=data.stats, licence=licence.summary())
        save_adapter(adapted, tokenizer, run.path)
        metrics: dict[str, Any] = {"train_loss": 1.25, "global_step": 0}
        run.write_json(RunDir.TRAIN_METRICS, metrics)
        manifest.record_train(run.path, recipe, metrics)
    return recipe


# ---------------------------------------------------------------------------------------------------------------
# Every test that trains a model is marked slow, and stays so

TRAINED = pytest.StashKey[bool]()
_RUNNING: list[pytest.Item] = []  # the test being run, innermost last (pytester runs a session inside a test)


def _train_recorded(train: Any) -> Any:
    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _RUNNING:
            _RUNNING[-1].stash[TRAINED] = True
        return train(self, *args, **kwargs)

    recorded.__wrapped__ = train  # type: ignore[attr-defined]
    recorded.records_training = True  # type: ignore[attr-defined]
    return recorded


def record_training(module: ModuleType) -> None:
    """Wrap `module.Trainer.train` (transformers.trainer) so a call marks the running test as one that trained."""
    trainer = module.Trainer
    if not getattr(trainer.train, "records_training", False):
        trainer.train = _train_recorded(trainer.train)


class _RecordTrainingOnImport(importlib.abc.MetaPathFinder):
    """Wraps `Trainer.train` as soon as transformers.trainer is imported, so a run that trains nothing does not pay
    for importing it (and a test that imports it first is watched too)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_and_record(module: ModuleType) -> None:
            exec_module(module)
            record_training(module)

        loader.exec_module = exec_and_record  # type: ignore[method-assign]
        return spec


def watch_training() -> None:
    """Record every call of `transformers.Trainer.train`, whether transformers is imported already or later."""
    if "transformers.trainer" in sys.modules:
        record_training(sys.modules["transformers.trainer"])
    if not any(isinstance(finder, _RecordTrainingOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RecordTrainingOnImport())


class TrainingGuard:
    """A pytest plugin: a test that trains a model in this process (its setup, its body or its fixtures reach
    `transformers.Trainer.train`) but is not marked slow fails, so `pytest -m "not slow"` never trains."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
        _RUNNING.append(item)
        try:
            return (yield)
        finally:
            _RUNNING.remove(item)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        report = yield
        if call.when == "teardown" and item.stash.get(TRAINED, False) and item.get_closest_marker("slow") is None:
            report.outcome = "failed"
            report.longrepr = (
                f"{item.nodeid} trains a model (transformers.Trainer.train was called) but is not marked slow: "
                'add @pytest.mark.slow so that `pytest -m "not slow"` stays fast'
            )
        return report


def declare_remote_code(folder: Path, configuration: str, modeling: str) -> Path:
    """Turn the model in `folder` into one declared as custom code (auto_map), like hub repositories that ship
    configuration_tiny.py and modeling_tiny.py."""
    (folder / "configuration_tiny.py").write_text(configuration)
    (folder / "modeling_tiny.py").write_text(modeling)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="sovtune_tiny",
        architectures=["TinyForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder
