"""The command line: fast help, version, usage errors, and bad input as one line with exit 2 and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sovtune
from helpers import invoke, run_cli, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_fast_and_imports_no_ml_library() -> None:
    # The 0.5 s target is measured by the benchmark script; 2 s here stays robust on a loaded CI machine.
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        result = run_cli("--help")
        timings.append(time.perf_counter() - started)
        assert result.returncode == 0, result.stderr
    assert min(timings) < 2.0, timings
    for command in ("check", "train", "run"):
        assert command in result.stdout
    probe = (
        "import sys; from typer.testing import CliRunner; from sovtune.cli import app; "
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'accelerate') "
        "if m in sys.modules); "
        "print(heavy)"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert imported.stdout.strip() == "[]", imported.stdout + imported.stderr


def test_command_help_lists_the_options() -> None:
    result = invoke("train", "--help")
    assert result.exit_code == 0
    for option in ("--set", "--resume", "--overwrite"):
        assert option in result.stdout
    result = invoke("check", "--help")
    assert result.exit_code == 0 and "--json" in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"sovtune {sovtune.__version__}"
    from importlib.metadata import version

    assert sovtune.__version__ == version("sovtune")


@pytest.mark.parametrize(
    "args",
    [["frobnicate"], ["check"], ["check", "r.yaml", "--no-such-flag"], ["train", "r.yaml", "--set"], ["--nope"]],
    ids=["unknown-command", "missing-recipe-argument", "unknown-flag", "set-without-value", "unknown-root-flag"],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_no_arguments_shows_help() -> None:
    result = invoke()
    assert "check" in result.output and "train" in result.output
    assert result.exit_code in (0, 2)  # click >= 8.2 exits 2 for a bare group, as for any usage error


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, no traceback, nothing written


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0][len("error: ") :]


def test_bad_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "typo", train={"learnin_rate": 1e-3})
    run_dir = tmp_path / "runs" / "typo"
    line = next(n for n, text in enumerate(recipe.read_text().splitlines(), 1) if "learnin_rate" in text)
    for command in ("train", "run", "check"):
        message = assert_one_line_error(run_cli(command, str(recipe), cwd=tmp_path))
        assert message == f"{recipe}:{line}: train.learnin_rate: unknown key; did you mean 'train.learning_rate'?"
        assert not run_dir.exists()
        assert not (tmp_path / "runs").exists()


def test_bad_set_is_one_line_exit_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "setbad")
    message = assert_one_line_error(run_cli("train", str(recipe), "--set", "train.batch_size=lots", cwd=tmp_path))
    assert message == (
        "--set: train.batch_size: input should be a valid integer, unable to parse string as an integer, found 'lots'"
    )
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = invoke("train", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'nope.yaml'}: recipe file not found; check the path (recipes live in recipes/)"
    )


def test_bad_data_on_train_writes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "nodata", data={"train": "missing.jsonl"})
    result = invoke("train", str(recipe))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: missing.jsonl: data file not found (looked at {tmp_path / 'missing.jsonl'}); "
        "check data.train / data.eval paths"
    )
    assert not (tmp_path / "runs").exists()  # neither the run directory nor a lock file beside it


@pytest.mark.slow
def test_train_then_refuse_to_overwrite(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "cli", train={"max_steps": 2, "save_steps": 2})
    result = invoke("train", str(recipe))
    assert result.exit_code == 0, (result.output, result.exception)
    run_dir = tmp_path / "runs" / "cli"
    assert f"adapter written to {run_dir / 'adapter'}" in " ".join(result.stdout.split())
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    adapter_bytes = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()

    again = invoke("train", str(recipe))
    assert again.exit_code == 2
    assert again.stderr.strip() == (
        f"error: {run_dir}: already holds a run; continue it with --resume, or choose another --set output.dir=..."
    )
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_bytes  # untouched


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["check", "--bogus"], "sovtune check: No such option: --bogus"),
        (["check"], "sovtune check: Missing argument 'recipe'"),
        (["generate", "run", "--max-new-tokens", "0"], "sovtune generate: Invalid value for '--max-new-tokens'"),
        (["launch", "r.yaml", "--gpus", "100000"], "sovtune launch: Invalid value for '--gpus'"),
        (["nosuchcommand"], "sovtune: No such command 'nosuchcommand'"),
    ],
    ids=["unknown-option", "missing-argument", "below-range", "above-range", "unknown-command"],
)
def test_a_usage_error_is_one_line_and_exit_code_2(args: list[str], says: str, tmp_path: Path) -> None:
    """Flags are bad input like any other: the real entry point prints one line naming the command and where its
    help is, not Typer's box with the usage above it; nothing is written."""
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert says in done.stderr and "--help')" in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_bare_sovtune_still_shows_the_help() -> None:
    done = run_cli()
    assert done.returncode == 2 and "sovtune [OPTIONS] COMMAND [ARGS]" in done.stdout
    assert "error:" not in done.stderr
