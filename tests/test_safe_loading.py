"""Safe loading: safetensors only unless the recipe opts in to pickle weights; code shipped with a model runs only
when the recipe trusts it (with a warning); a token in the environment never reaches a file or the terminal."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from helpers import declare_remote_code, invoke, run_cli, write_recipe

TOKEN = "hf_sovtunePLANTEDtoken0123456789abcdefghijklmnop"
PASSWORD = "sovtunePLANTEDpassword-42"


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------------------------
# Pickle weights


@pytest.fixture(scope="module")
def pickle_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights as pytorch_model.bin (pickle) and no safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("pickle-model")
    for path in tiny_model_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_by_default(pickle_model_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, pickle_model_dir, train={"max_steps": 1})
    before = snapshot(tmp_path)
    result = invoke("train", recipe)
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert f"model.name_or_path: {pickle_model_dir} has only pickle weights (pytorch_model.bin)" in message
    assert "can run arbitrary code" in message and "set model.allow_pickle_weights: true" in message
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_pickle_weights_load_when_the_recipe_opts_in(
    pickle_model_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, pickle_model_dir, model={"allow_pickle_weights": True}, train={"max_steps": 1})
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    # The same weights as the safetensors original: the pickle was really loaded, not something else.
    from transformers import AutoModelForCausalLM

    from sovtune import model as models
    from sovtune.config import load_recipe

    loaded = models.load_base_model(load_recipe(recipe)).state_dict()
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    assert loaded.keys() == original.keys()
    assert all((loaded[name] == original[name]).all() for name in loaded)


@pytest.mark.slow
def test_safetensors_beside_pickle_weights_are_used(
    pickle_model_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    both = tmp_path / "both"
    shutil.copytree(pickle_model_dir, both)
    shutil.copy(tiny_model_dir / "model.safetensors", both / "model.safetensors")
    (both / "pytorch_model.bin").write_bytes(b"not a pickle: loading this would fail")
    recipe = write_recipe(tmp_path, both, train={"max_steps": 1})
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------------------
# Code shipped with a model


CONFIGURATION = """
from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "sovtune_tiny"
"""
MODELING = """
import os
from pathlib import Path

from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig

# What a test can see: this file ran.
Path(os.environ["SOVTUNE_REMOTE_CODE_MARKER"]).write_text("remote code ran")


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
"""


@pytest.fixture(scope="module")
def remote_code_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model declared as custom code (auto_map), like hub repositories that ship modeling files."""
    folder = tmp_path_factory.mktemp("remote-code-model")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, folder / path.name)
    return declare_remote_code(folder, CONFIGURATION, MODELING)


def train_in_child(recipe: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A separate process: transformers imports custom code once per process and caches it in HF_MODULES_CACHE."""
    marker = tmp_path / "marker"
    done = run_cli(
        "train",
        recipe,
        *args,
        cwd=tmp_path,
        env={"SOVTUNE_REMOTE_CODE_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    return done, marker


@pytest.mark.slow
def test_model_code_does_not_run_unless_trusted(remote_code_model_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, remote_code_model_dir, train={"max_steps": 1})
    done, marker = train_in_child(recipe, tmp_path)
    assert done.returncode == 2, done.stderr
    assert not marker.exists()  # the shipped code never ran
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "model.name_or_path" in error[0] and "contains custom code" in error[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_trusted_model_code_runs_with_a_warning(remote_code_model_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, remote_code_model_dir, model={"trust_remote_code": True}, train={"max_steps": 1})
    done, marker = train_in_child(recipe, tmp_path)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "remote code ran"
    assert f"trust_remote_code is on: code shipped with {remote_code_model_dir} will run" in done.stderr


@pytest.mark.slow
def test_trust_remote_code_is_passed_only_when_set(make_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every from_pretrained call made by a run gets trust_remote_code=False unless the recipe says true."""
    import transformers

    seen: list[Any] = []
    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        original = auto.from_pretrained.__func__

        def spy(cls: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen.append(kwargs.get("trust_remote_code"))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    assert invoke("train", make_recipe(train={"max_steps": 1})).exit_code == 0
    assert seen and all(value is False for value in seen), seen


def test_the_refusal_of_model_code_names_the_setting(remote_code_model_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, remote_code_model_dir, train={"max_steps": 1})
    result = invoke("check", recipe)
    assert result.exit_code == 2
    assert "model.trust_remote_code: true" in " ".join(result.stderr.split())


# ---------------------------------------------------------------------------------------------------------------
# Tokens


def files_containing(folder: Path, secrets: list[str]) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {secret[:12]}..." for secret in secrets if secret.encode() in data]
    return hits


@pytest.mark.slow
def test_a_planted_token_reaches_no_file_and_no_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        tiny_model_dir,
        description="pushes with ${HF_TOKEN}; database ${SOVTUNE_TEST_DB_PASSWORD}",
        train={"max_steps": 2, "save_steps": 1},
        eval={"samples": 1},
    )
    env = {"HF_TOKEN": TOKEN, "SOVTUNE_TEST_DB_PASSWORD": PASSWORD, "SOVTUNE_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    outputs = []
    for args in (
        ["run", str(recipe), "--set", f"hub.revision={TOKEN}"],  # typed on the command line, too
        ["train", str(recipe), "--set", "train.batch_size=${HF_TOKEN}", "--set", "output.dir=runs/failed"],  # an error
    ):
        outputs.append(run_cli(*args, cwd=tmp_path, env=env))
    # A recipe holding a secret is refused before anything is written (the run's files are searched for secrets by
    # tests/test_bounded_inputs.py::test_no_secret_reaches_any_byte_a_run_writes).
    assert outputs[0].returncode == 2 and "is a secret" in outputs[0].stderr, outputs[0].stderr
    assert outputs[1].returncode == 2, outputs[1].stderr
    assert not (tmp_path / "runs").exists()
    assert files_containing(tmp_path, [TOKEN, PASSWORD]) == [] or pytest.fail(
        "\n".join(files_containing(tmp_path, [TOKEN, PASSWORD]))
    )
    for done in outputs:
        for stream in (done.stdout, done.stderr):
            assert TOKEN not in stream and PASSWORD not in stream


def test_redaction_covers_credential_variables_and_known_token_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    from sovtune.core.secrets import redact_secrets

    monkeypatch.setenv("SOVTUNE_TEST_DB_PASSWORD", PASSWORD)
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Ada Lovelace")  # not a credential, despite "AUTH" in the name
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # a flag, too short to be a secret
    text = f"db {PASSWORD}, pasted {TOKEN}, by Ada Lovelace, 1 retry"
    assert redact_secrets(text) == (
        "db [REDACTED:SOVTUNE_TEST_DB_PASSWORD], pasted [REDACTED_HUGGINGFACE_TOKEN], by Ada Lovelace, 1 retry"
    )
