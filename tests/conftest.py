"""Fixtures and hooks only (the plain helpers they use live in helpers.py): a tiny Llama-architecture model with a
tokenizer trained on the fly, recipe files, the audit log in a temporary folder, and the training guard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: tiny models gain nothing from more, and on a shared, loaded CPU the spinning OpenMP
# workers made each training step ~20x slower. Set before anything imports torch (child processes inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import TrainingGuard, build_tiny_model, build_tokenizer, watch_training, write_recipe  # noqa: E402


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


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_model_dir: Path):
    """Write a recipe YAML for the tiny model; sections given as dicts are merged over small defaults."""

    def make(name: str = "recipe", rows: list[dict[str, Any]] | None = None, **sections: Any) -> Path:
        return write_recipe(tmp_path, tiny_model_dir, name, rows, **sections)

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_cuda = [item for item in items if "requires_cuda" in item.keywords]
    if not needs_cuda:
        return  # no torch import (seconds on a loaded machine) when no collected test asks for a GPU
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in needs_cuda:
        if not has_cuda:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    # A test that trains in this process without the slow mark fails (child processes are marked by hand).
    watch_training()
    config.pluginmanager.register(TrainingGuard(), "sovtune-training-guard")
