"""What `sovtune` writes when stdout and stderr are not a terminal (a pipe, a log file, CI): whole tables, one progress
line per logging interval with numbers as numbers, no progress-bar redraws and no library warnings the user cannot
act on. A real subprocess, so the streams are real pipes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli, write_recipe

LONG_NAME = "held-out-questions-with-a-name-wider-than-a-column"


@pytest.fixture(scope="module")
def piped_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    workspace = tmp_path_factory.mktemp("piped")
    recipe = write_recipe(
        workspace, tiny_model_dir, name="piped",
        train={"max_steps": 4, "logging_steps": 2, "save_steps": 4},
        eval={"datasets": [{"name": LONG_NAME, "metrics": ["loss", "perplexity", "token_accuracy"]}]},
    )  # fmt: skip
    # COLUMNS emptied: the width must not come from the terminal pytest runs in
    return run_cli("run", recipe, cwd=workspace, env={"COLUMNS": ""}), workspace


@pytest.mark.slow
def test_no_bar_redraws_and_no_library_noise(piped_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, _ = piped_run
    assert done.returncode == 0, done.stdout + done.stderr
    both = done.stdout + done.stderr
    assert "\r" not in both  # tqdm redraws a bar with carriage returns
    assert "it/s]" not in both and "Loading weights" not in both
    assert "FutureWarning" not in both and "is_gradient_checkpointing" not in both
    assert "Traceback" not in both


@pytest.mark.slow
def test_one_progress_line_per_logging_interval_with_numbers(
    piped_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, _ = piped_run
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 1/4 (25%)", "step 2/4 (50%)", "step 4/4 (100%)"]
    assert re.search(r"step 2/4 \(50%\): loss \d+\.\d+, learning rate [\d.e-]+, grad norm [\d.e-]+", lines[1])
    assert "'" not in " ".join(lines)  # no {'loss': '0.2224'}
    assert re.search(r"^training done: 4 steps in [\d.]+ s, mean loss \d", done.stdout, re.MULTILINE)


@pytest.mark.slow
def test_tables_are_whole(piped_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, _ = piped_run
    assert "…" not in done.stdout
    rows = [line for line in done.stdout.splitlines() if f"{LONG_NAME}/loss" in line]
    assert rows, done.stdout
    assert len(rows[0].rstrip()) > 80  # wider than rich's default for a non-terminal, and not cut
    assert re.search(r"[-+]\d\.\d{3} \[[-+]\d\.\d{3}, [-+]\d\.\d{3}\]", rows[0])  # Δ and its interval, whole


def test_check_table_is_whole_in_a_pipe(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, name="a-recipe-name-long-enough-to-widen-every-table-title")
    done = run_cli("check", recipe, cwd=tmp_path, env={"COLUMNS": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "…" not in done.stdout and "\r" not in done.stdout + done.stderr
    assert any("eval.generation.max_new_tokens=128" in line for line in done.stdout.splitlines())
