"""Resume: a run killed with SIGKILL mid-run and resumed ends with the adapter of an uninterrupted run (1e-6);
SIGTERM/SIGINT save a checkpoint and exit cleanly saying how to resume; a changed recipe or data is refused
unless --force."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import child_env, invoke, write_recipe
from sovtune.run import checkpoints, fingerprint, lock

pytestmark = pytest.mark.slow  # every test trains, in this process or in a child `sovtune train`

MAX_STEPS = 6
STEP_DELAY_S = 0.2  # per forward/backward (micro-batch); a step on the CPU is several
TRAIN = {"max_steps": MAX_STEPS, "save_steps": 2, "save_total_limit": 10}

# The real CLI in a child process, each training step slowed down so the test can signal it mid-run.
SLOW_CLI = """
import os, sys, time
import trl
step = trl.SFTTrainer.training_step
def slow_step(self, *args, **kwargs):
    time.sleep(float(os.environ["SOVTUNE_TEST_STEP_DELAY"]))
    return step(self, *args, **kwargs)
trl.SFTTrainer.training_step = slow_step
from sovtune.cli import app
app(sys.argv[1:], prog_name="sovtune")
"""


def start_slow_cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *args],
        cwd=cwd,
        # One thread, as in-process (see `single_thread`): the same float reduction order, so the same numbers.
        env=child_env(PYTHONUNBUFFERED="1", SOVTUNE_TEST_STEP_DELAY=str(STEP_DELAY_S)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"training ended (rc {process.returncode}) before the test could signal it:\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for a checkpoint")
        time.sleep(0.05)


def checkpoint_written(run_dir: Path, step: int) -> Callable[[], bool]:
    return lambda: checkpoints.checkpoint_is_complete(run_dir / "checkpoints" / f"checkpoint-{step}")


def adapter_tensors(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run_dir: Path, reference: dict[str, Any]) -> None:
    tensors = adapter_tensors(run_dir)
    assert tensors.keys() == reference.keys()
    worst = max((tensors[key] - reference[key]).abs().max().item() for key in tensors)
    assert worst <= 1e-6, f"resumed adapter differs from the uninterrupted one by {worst}"
    # The adapter moved away from its initialisation, so equality is not trivially "both untrained".
    assert any(tensor.abs().max().item() > 0 for name, tensor in tensors.items() if "lora_B" in name)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Any:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def reference(workspace: Path, tiny_model_dir: Path) -> dict[str, Any]:
    """The adapter of an uninterrupted run."""
    recipe = write_recipe(workspace, tiny_model_dir, name="reference", train=TRAIN)
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    return adapter_tensors(workspace / "runs" / "reference")


def count_optimizer_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    from transformers.trainer_callback import CallbackHandler

    original, calls = CallbackHandler.on_step_end, {"n": 0}

    def on_step_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CallbackHandler, "on_step_end", on_step_end)
    return calls


def resume_and_compare(recipe: Path, run_dir: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    last = checkpoints.complete_checkpoints(run_dir)[-1]
    with monkeypatch.context() as patch:
        steps = count_optimizer_steps(patch)
        result = invoke("train", recipe, "--resume")
    assert result.exit_code == 0, result.output
    # It continued: only the remaining steps ran (a silent restart from scratch would end the same way).
    assert steps["n"] == MAX_STEPS - checkpoints.checkpoint_step(last)
    assert f"resuming from {last}" in " ".join(result.stdout.split())
    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    assert metrics["global_step"] == MAX_STEPS and metrics["resumed_from"] == last.name
    assert_same_adapter(run_dir, reference)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_adapter(
    workspace: Path, tiny_model_dir: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(workspace, tiny_model_dir, name="killed", train=TRAIN)
    run_dir = workspace / "runs" / "killed"
    process = start_slow_cli(["train", str(recipe)], workspace)
    wait_for(checkpoint_written(run_dir, 2), process)
    time.sleep(STEP_DELAY_S / 2)  # into the next step
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "adapter").exists() and not (run_dir / "train_metrics.json").exists()
    assert checkpoints.checkpoint_step(checkpoints.complete_checkpoints(run_dir)[-1]) < MAX_STEPS
    resume_and_compare(recipe, run_dir, reference, monkeypatch)


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(
    workspace: Path, tiny_model_dir: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(workspace, tiny_model_dir, name="terminated", train=TRAIN)
    run_dir = workspace / "runs" / "terminated"
    process = start_slow_cli(["train", str(recipe)], workspace)
    wait_for(checkpoint_written(run_dir, 2), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    message = " ".join(err.split())
    stopped = [int(word) for word in message.split("training stopped by SIGTERM at step ")[1].split()[:1]]
    assert stopped and 2 < stopped[0] < MAX_STEPS, message
    # Saved at the step it stopped at, not only at the last save_steps multiple.
    assert checkpoints.checkpoint_is_complete(run_dir / "checkpoints" / f"checkpoint-{stopped[0]}")
    assert f"resume with: sovtune train {os.path.relpath(recipe, workspace)} --resume" in message
    assert not (run_dir / "adapter").exists()
    assert not lock.lock_path(run_dir).exists()
    resume_and_compare(recipe, run_dir, reference, monkeypatch)


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int, times: int = 1) -> None:
    """Send SIGINT to this process as the given optimizer step begins, as Ctrl-C would."""
    from transformers.trainer_callback import CallbackHandler

    original = CallbackHandler.on_step_begin
    calls = {"n": 0}

    def on_step_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CallbackHandler, "on_step_begin", on_step_begin)


def test_sigint_saves_a_checkpoint_and_resumes_exactly(
    workspace: Path, tiny_model_dir: Path, reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(workspace, tiny_model_dir, name="interrupted", train=TRAIN)
    run_dir = workspace / "runs" / "interrupted"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background of a shell
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 3)
        result = invoke("train", recipe)
    assert result.exit_code == 128 + signal.SIGINT, result.output
    message = " ".join(result.stderr.split())
    assert f"training stopped by SIGINT at step 3 of {MAX_STEPS}" in message
    assert "--resume" in message
    assert checkpoints.checkpoint_is_complete(run_dir / "checkpoints" / "checkpoint-3")
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    resume_and_compare(recipe, run_dir, reference, monkeypatch)


def test_second_sigint_stops_at_once_without_saving(
    workspace: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(workspace, tiny_model_dir, name="aborted", train=TRAIN)
    run_dir = workspace / "runs" / "aborted"
    interrupt_at_step(monkeypatch, 3, times=2)
    # Python's own Ctrl-C handler, as in a terminal: a pytest-xdist worker, or pytest started in the background of a
    # shell, ignores SIGINT, and the second signal re-delivered to that handler would do nothing.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = invoke("train", recipe)
    finally:
        signal.signal(signal.SIGINT, before)
    assert result.exit_code == 130, result.output
    assert "interrupted without saving" in " ".join(result.stderr.split())
    assert [path.name for path in checkpoints.complete_checkpoints(run_dir)] == ["checkpoint-2"]
    assert not lock.lock_path(run_dir).exists()


# ---------------------------------------------------------------------------------------------------------------
# A resume must continue the same run


@pytest.fixture(scope="module")
def stopped_run(workspace: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A run as a kill after checkpoint-2 leaves it: 2 of 4 steps done, no adapter."""
    recipe = write_recipe(workspace, tiny_model_dir, name="base", train={"max_steps": 4, "save_steps": 2})
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    run_dir = workspace / "runs" / "base"
    for later in ("checkpoints/checkpoint-4", "adapter"):
        shutil.rmtree(run_dir / later)
    (run_dir / "train_metrics.json").unlink()
    return recipe, run_dir


@pytest.fixture
def copy_of_run(stopped_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The stopped run and its recipe/data copied, so each test may change them."""
    recipe, run_dir = stopped_run
    data = recipe.with_name("base-train.jsonl")
    shutil.copy(data, tmp_path / data.name)
    text = recipe.read_text().replace(str(data), str(tmp_path / data.name)).replace(str(run_dir), str(tmp_path / "run"))
    (tmp_path / recipe.name).write_text(text)
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / recipe.name, tmp_path / "run"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def refused(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return " ".join(result.stderr.split())


def test_resume_with_a_changed_recipe_is_refused(copy_of_run: tuple[Path, Path]) -> None:
    recipe, run_dir = copy_of_run
    before = snapshot(run_dir)
    message = refused(invoke("train", recipe, "--resume", "--set", "train.learning_rate=0.02"))
    assert "train.learning_rate: 0.01 -> 0.02" in message and "--force" in message
    assert snapshot(run_dir) == before


def test_resume_with_changed_data_is_refused(copy_of_run: tuple[Path, Path]) -> None:
    recipe, run_dir = copy_of_run
    data = recipe.with_name("base-train.jsonl")
    data.write_text(data.read_text().replace("#3", "#three"))
    before = snapshot(run_dir)
    message = refused(invoke("train", recipe, "--resume"))
    assert f"data file {data} is not the data the run started with" in message and "--force" in message
    assert snapshot(run_dir) == before
    data.write_text(data.read_text().replace("#three", "#3"))  # the same rows again: resuming is allowed
    again = invoke("train", recipe, "--resume")
    assert again.exit_code == 0, again.output


def test_resume_without_a_fingerprint_is_refused(copy_of_run: tuple[Path, Path]) -> None:
    recipe, run_dir = copy_of_run
    (run_dir / fingerprint.FINGERPRINT).unlink()
    assert "pass --force" in refused(invoke("train", recipe, "--resume"))


def test_force_resumes_a_changed_recipe_and_records_it(copy_of_run: tuple[Path, Path]) -> None:
    recipe, run_dir = copy_of_run
    result = invoke("train", recipe, "--resume", "--force", "--set", "train.learning_rate=0.02")
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "train_metrics.json").read_text())["global_step"] == 4
    forced = json.loads((run_dir / fingerprint.FINGERPRINT).read_text())["forced_resumes"]
    assert forced[-1]["changes"] == ["train.learning_rate: 0.01 -> 0.02"]


def test_settings_that_do_not_shape_training_may_change(copy_of_run: tuple[Path, Path]) -> None:
    recipe, _ = copy_of_run
    result = invoke("train", recipe, "--resume", "--set", "description=resumed on another day")
    assert result.exit_code == 0, result.output
