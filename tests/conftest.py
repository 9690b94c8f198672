"""Fixtures and hooks only (the plain helpers they use live in helpers.py): a tiny Llama-architecture model with a
tokenizer trained on the fly, recipe files, the audit log in a temporary folder."""

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

from helpers import build_tiny_model, build_tokenizer, write_recipe  # noqa: E402


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
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)
