"""Every bad input in tests/bad_inputs/ gets one clear line through the real command line: what is wrong and where
(file:line or field) and how to fix it, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import invoke, run_cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
# A credential in the environment of every case: its value must never reach the output of any of them.
SECRET_ENV = {"SOVTUNE_CASES_API_KEY": "sk-cases-not-a-real-key-0123456789"}


def params() -> list[Any]:
    return [
        pytest.param(
            case, id=case["id"], marks=[pytest.mark.xfail(strict=True, reason=case["xfail"])] if "xfail" in case else []
        )
        for case in CASES
    ]


@pytest.fixture(scope="module")
def model_env(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny model, a copy of it whose tokenizer has no chat template, and damaged copies (TINY_MODEL_<DAMAGE>)."""
    no_template = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(tiny_model_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    damaged = {}
    for damage, (name, content) in damaged_model_files(tiny_model_dir).items():
        folder = tmp_path_factory.mktemp(damage.lower()) / "model"
        shutil.copytree(tiny_model_dir, folder)
        (folder / name).write_bytes(content)
        damaged[f"TINY_MODEL_{damage}"] = str(folder)
    return {"TINY_MODEL": str(tiny_model_dir), "TINY_MODEL_NO_TEMPLATE": str(no_template), **damaged, **SECRET_ENV}


def damaged_model_files(model: Path) -> dict[str, tuple[str, bytes]]:
    """One damaged file each: the safetensors corruptions that crashed the loaders, and configs that crashed or hung
    transformers (a list, nesting past the recursion limit, a million layers)."""
    weights = (model / "model.safetensors").read_bytes()
    length = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + length])
    first = next(name for name in header if name != "__metadata__")
    header[first]["data_offsets"][1] = 10**12
    moved = json.dumps(header).encode()
    config = json.loads((model / "config.json").read_text())
    return {
        "HEADER_2_60": ("model.safetensors", (2**60).to_bytes(8, "little") + weights[8:]),
        "TRUNCATED": ("model.safetensors", weights[: len(weights) // 2]),
        "HEADER_NOT_JSON": (
            "model.safetensors",
            (16).to_bytes(8, "little") + b"not a JSON head!" + weights[8 + length :],
        ),
        "OFFSETS_PAST_END": ("model.safetensors", len(moved).to_bytes(8, "little") + moved + weights[8 + length :]),
        "CONFIG_LIST": ("config.json", b"[1, 2]"),
        "CONFIG_NESTED_DEEP": ("config.json", b"[" * 20000 + b"]" * 20000),
        "CONFIG_MILLION_LAYERS": ("config.json", json.dumps({**config, "num_hidden_layers": 10**6}).encode()),
        "CONFIG_FIELD_A_LIST": ("config.json", json.dumps({**config, "hidden_act": ["silu"]}).encode()),
        "TOKENIZER_NESTED_DEEP": ("tokenizer.json", b"[" * 20000 + b"]" * 20000),
    }


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def corpus_copy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """One copy of the corpus under an empty working directory (where runs/ would go), and its snapshot."""
    work = tmp_path_factory.mktemp("bad-inputs") / "work"
    shutil.copytree(CORPUS, work / "corpus", symlinks=True)  # the symbolic-link cases stay links
    return work, snapshot(work)


@pytest.fixture
def workspace(
    corpus_copy: tuple[Path, dict[str, tuple[int, int]]], model_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Generator[Path, None, None]:
    """The corpus copy as the working directory, exactly as copied: a case that changed it fails its own
    snapshot check, and the copy is made again for the next case (one copy per module and worker, not per case:
    144 copies of 227 files were a tenth of the fast suite's time)."""
    work, pristine = corpus_copy
    monkeypatch.chdir(work)
    for name, value in model_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SOVTUNE_TEST_DATA_DIR", raising=False)
    yield work
    if snapshot(work) != pristine:
        shutil.rmtree(work)
        shutil.copytree(CORPUS, work / "corpus", symlinks=True)
        pristine.clear()
        pristine.update(snapshot(work))


def command(case: dict[str, Any], corpus: Path) -> list[str]:
    args = case.get("args", ["train", "{corpus}/recipes/" + case["id"] + ".yaml"])
    return [arg.replace("{corpus}", str(corpus)) for arg in args]


def the_error_line(stderr: str) -> str:
    """The one `error:` line; anything else on stderr may only be a progress bar (e.g. weights being loaded)."""
    lines = [line for line in stderr.replace("\r", "\n").split("\n") if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert all("%|" in line for line in lines if line not in errors), stderr
    return errors[0]


def test_every_case_says_where_and_how_to_fix() -> None:
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids))
    for case in CASES:
        assert case["where"], case["id"]
        assert case["fix"] or "xfail" in case, case["id"]
        if "args" not in case:
            assert (CORPUS / "recipes" / f"{case['id']}.yaml").is_file(), case["id"]


@pytest.mark.parametrize("case", params())
def test_bad_input_gets_one_clear_line(case: dict[str, Any], workspace: Path) -> None:
    if case.get("cpu"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this input is only bad on a machine without a GPU")
    before = snapshot(workspace)
    result = invoke(*command(case, workspace / "corpus"))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a bug would leave another exception
    assert "Traceback" not in result.output
    message = the_error_line(result.stderr)
    for text in case["where"] + case["fix"]:
        assert text in message, (text, message)
    assert snapshot(workspace) == before, "a failed command wrote or changed files"
    assert not any(secret in result.output for secret in SECRET_ENV.values()), "a secret reached the output"


@pytest.mark.parametrize("case_id", ["malformed_yaml", "malformed_jsonl"])
def test_a_real_process_prints_only_the_line(case_id: str, workspace: Path) -> None:
    """The same through a separate `python -m sovtune` process: its real stderr, exit code and files."""
    case = next(case for case in CASES if case["id"] == case_id)
    before = snapshot(workspace)
    done = run_cli(*command(case, workspace / "corpus"), cwd=workspace)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout.strip() == ""
    message = the_error_line(done.stderr)
    assert all(text in message for text in case["where"] + case["fix"])
    assert snapshot(workspace) == before
