"""Crash safety: a run stopped at any write leaves whole files; checkpoints are complete or absent (checked against
the installed trainer); a full disk mid-run keeps the last good checkpoint; the disk is checked before training;
one writer per run directory."""

from __future__ import annotations

import builtins
import errno
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import child_env, invoke, make_run, write_recipe
from sovtune.cli import app
from sovtune.core import files
from sovtune.core.files import atomic_write_json as write_json_atomic
from sovtune.run import checkpoints, fingerprint, lock
from sovtune.run.checkpoints import last_checkpoint
from sovtune.training import save_adapter


def error_line(result: Any, exit_code: int = 2) -> str:
    """The one `error:` line of a failed command (progress bars may precede it once training has started)."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.split("\n") if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


class Crash(BaseException):
    """Stands in for SIGKILL: no `except Exception` handler runs, the process state is simply gone."""


@pytest.fixture(autouse=True)
def single_thread() -> Any:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# The trainer writes trainer_state.json last: `last_checkpoint` relies on it


def test_installed_trainer_saves_trainer_state_after_weights_optimizer_and_rng() -> None:
    from transformers import Trainer

    source = inspect.getsource(Trainer._save_checkpoint)
    calls = [
        "self.save_model(",
        "self._save_optimizer_and_scheduler(",
        "self._save_rng_state(",
        "self.state.save_to_json(",
        "rotate_checkpoints(",
    ]
    positions = [source.index(call) for call in calls]
    assert positions == sorted(positions), (
        "transformers changed its checkpoint write order; revisit checkpoint_is_complete"
    )


@pytest.mark.slow
def test_every_checkpoint_file_exists_before_trainer_state_is_written(
    make_recipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.trainer_callback import TrainerState

    seen: list[set[str]] = []
    original = TrainerState.save_to_json

    def save_to_json(self: Any, json_path: str) -> None:
        seen.append(set(os.listdir(os.path.dirname(json_path))))
        original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", save_to_json)
    recipe = make_recipe(train={"max_steps": 2, "save_steps": 1})
    assert invoke("train", recipe).exit_code == 0
    assert len(seen) == 2
    for listed in seen:
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= listed
        assert "trainer_state.json" not in listed


def fake_checkpoint(folder: Path, step: int, state: str | None) -> Path:
    path = folder / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_last_checkpoint_is_the_newest_complete_one(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2, json.dumps({"global_step": 2}))
    fake_checkpoint(tmp_path, 10, json.dumps({"global_step": 10}))
    half = json.dumps({"global_step": 12, "log_history": [{"loss": 1.0}] * 20})
    fake_checkpoint(tmp_path, 12, half[: len(half) // 2])  # killed while writing the state
    fake_checkpoint(tmp_path, 14, None)  # killed before the state
    fake_checkpoint(tmp_path, 16, json.dumps({"global_step": 15}))  # not this folder's state
    (tmp_path / "checkpoints" / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint-10"
    removed = checkpoints.discard_incomplete_checkpoints(tmp_path)
    assert sorted(path.name for path in removed) == ["checkpoint-12", "checkpoint-14", "checkpoint-16"]
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-10",
        "checkpoint-2",
        "checkpoint-x",
    ]


# The real CLI in a child process that SIGKILLs itself halfway through writing checkpoint-4's trainer state.
KILL_WHILE_SAVING = """
import os, signal, sys
from transformers.trainer_callback import TrainerState
original = TrainerState.save_to_json
def save_to_json(self, json_path):
    if "checkpoint-4" in json_path:
        import dataclasses, json
        text = json.dumps(dataclasses.asdict(self), indent=2)
        with open(json_path, "w") as handle:
            handle.write(text[: len(text) // 2])
            handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, json_path)
TrainerState.save_to_json = save_to_json
from sovtune.cli import app
app(sys.argv[1:], prog_name="sovtune")
"""


@pytest.mark.slow
def test_sigkill_while_saving_a_checkpoint_then_resume(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, name="killed", train={"max_steps": 6, "save_steps": 2})
    run_dir = tmp_path / "runs" / "killed"
    process = subprocess.run(
        [sys.executable, "-c", KILL_WHILE_SAVING, "train", str(recipe)],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    half_written = run_dir / "checkpoints" / "checkpoint-4"
    assert (half_written / "trainer_state.json").is_file() and not checkpoints.checkpoint_is_complete(half_written)
    assert last_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-2"
    assert_whole_files(run_dir)
    assert not (run_dir / "adapter").exists()

    result = invoke("train", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.stdout and "checkpoint-2" in result.stdout
    assert json.loads((run_dir / "train_metrics.json").read_text())["global_step"] == 6
    assert checkpoints.checkpoint_is_complete(half_written)  # written again, whole this time


# ---------------------------------------------------------------------------------------------------------------
# Files are whole or absent, wherever the run stops


def assert_whole_files(run_dir: Path) -> None:
    """Every result file that exists parses; the adapter folder is complete or absent; logs lose at most a tail."""
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if not path.is_file() or relative.parts[0] == "checkpoints" or any(p.startswith(".") for p in relative.parts):
            continue  # checkpoints are judged by checkpoint_is_complete; dot files are temporary or locks
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":  # append-only: a stop mid-append may cut the last line only
            lines = path.read_text(encoding="utf-8").split("\n")
            for line in lines[:-1]:
                json.loads(line)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
    adapter = run_dir / "adapter"
    if adapter.exists():
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= {
            path.name for path in adapter.iterdir()
        }


def crash_at_write(monkeypatch: pytest.MonkeyPatch, root: Path, target: int) -> list[str]:
    """Crash at the first write into the target-th file written under `root`, after half of the bytes.

    Checkpoints are left out (their completeness is the trainer-state check above), and so are TensorBoard
    event files, which a background thread writes (the order of those writes is not deterministic).
    Returns the files written, in order.
    """
    real_open = builtins.open
    written: list[str] = []

    class Watched:
        def __init__(self, handle: Any, name: str) -> None:
            self.handle, self.name, self.started = handle, name, False

        def write(self, data: Any) -> int:
            if not self.started:
                self.started = True
                written.append(self.name)
                if len(written) == target:
                    self.handle.write(data[: len(data) // 2])
                    self.handle.flush()
                    raise Crash(self.name)
            return self.handle.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def __iter__(self) -> Any:
            return iter(self.handle)

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.handle.close()

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if not isinstance(file, (str, os.PathLike)) or not any(flag in mode for flag in "wax+"):
            return handle
        path = Path(os.path.abspath(file))
        if not path.is_relative_to(root) or "checkpoints" in path.parts or path.name.startswith("events.out"):
            return handle
        return Watched(handle, str(path.relative_to(root)))

    monkeypatch.setattr(builtins, "open", open_)
    return written


@pytest.mark.slow
def test_a_run_stopped_at_any_write_leaves_only_whole_files(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(
        tmp_path,
        tiny_model_dir,
        name="crash",
        train={"max_steps": 2, "save_steps": 2},
        eval={"samples": 1},
    )
    # A clean run lists every write (recipe, fingerprint, data stats, manifest, logs, adapter, metrics, report).
    with monkeypatch.context() as patch:
        writes = crash_at_write(patch, tmp_path / "runs", target=0)
        assert invoke("run", recipe, "--set", f"output.dir={tmp_path / 'runs' / 'clean'}").exit_code == 0
    names = [Path(name).name for name in writes]
    for expected in (
        ".recipe.yaml",
        ".run_fingerprint.json",
        ".data_stats.json",
        ".manifest.json",
        ".train_metrics.json",
        ".report.json",
        ".report.md",
        "adapter_config.json",
        "train_log.jsonl",
    ):
        assert any(name.startswith(expected) for name in names), (expected, names)

    for target in range(1, len(writes) + 1):
        run_dir = tmp_path / "runs" / f"crash-{target}"
        with monkeypatch.context() as patch:
            crash_at_write(patch, tmp_path / "runs", target)
            with pytest.raises(Crash):
                app(["run", str(recipe), "--set", f"output.dir={run_dir}"], standalone_mode=False)
        assert_whole_files(run_dir)
        assert not lock.lock_path(run_dir).exists()
        for name in ("recipe.yaml", "data_stats.json", fingerprint.FINGERPRINT):  # whole means: as in the clean run
            if (run_dir / name).exists():
                clean = (tmp_path / "runs" / "clean" / name).read_text().replace("runs/clean", f"runs/crash-{target}")
                assert (run_dir / name).read_text() == clean, (target, writes[target - 1], name)


def test_json_write_interrupted_midway_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "train_metrics.json"
    write_json_atomic(path, {"train_loss": 1.5})

    class Unprintable:
        def __str__(self) -> str:
            raise Crash("killed during json.dump")

    with pytest.raises(Crash):
        write_json_atomic(path, {"log_history": ["x" * 1000] * 100, "late": Unprintable()})
    assert json.loads(path.read_text()) == {"train_loss": 1.5}
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_write_failing_before_the_rename_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "recipe.yaml"
    files.atomic_write_text(path, "name: old\n")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        files.atomic_write_text(path, "name: new\n" * 1000)
    assert path.read_text() == "name: old\n" and list(tmp_path.iterdir()) == [path]


@pytest.fixture
def peft_and_tokenizer(tiny_model_dir: Path) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_adapter_save_killed_midway_keeps_the_previous_adapter(
    tmp_path: Path, peft_and_tokenizer: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = peft_and_tokenizer
    first = folder_bytes(save_adapter(model, tokenizer, tmp_path))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data += 1.0
    original = type(tokenizer).save_pretrained

    def killed_midway(self: Any, folder: str, *args: Any, **kwargs: Any) -> Any:
        (Path(folder) / "tokenizer_config.json").write_text('{"half": ')
        raise Crash("killed while saving the tokenizer")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", killed_midway)
    with pytest.raises(Crash):
        save_adapter(model, tokenizer, tmp_path)
    assert folder_bytes(tmp_path / "adapter") == first

    monkeypatch.setattr(type(tokenizer), "save_pretrained", original)
    second = folder_bytes(save_adapter(model, tokenizer, tmp_path))
    assert second["adapter_model.safetensors"] != first["adapter_model.safetensors"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no .adapter.tmp / .adapter.old left


def test_adapter_swap_killed_between_the_renames_leaves_it_absent_not_mixed(
    tmp_path: Path, peft_and_tokenizer: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = peft_and_tokenizer
    save_adapter(model, tokenizer, tmp_path)
    real_replace = os.replace

    def replace(source: Any, destination: Any) -> None:
        if Path(source).name == ".adapter.tmp":
            raise Crash("killed between moving the old adapter away and moving the new one in")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        save_adapter(model, tokenizer, tmp_path)
    assert not (tmp_path / "adapter").exists()
    assert (tmp_path / ".adapter.old" / "adapter_model.safetensors").is_file()  # the previous one, whole


# ---------------------------------------------------------------------------------------------------------------
# Disk space


def test_disk_check_refuses_before_anything_is_written(
    tmp_path: Path, make_recipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = make_recipe(train={"max_steps": 2, "save_steps": 2}, output={"dir": str(tmp_path / "out" / "runs" / "r")})
    real_usage = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real_usage(path)
        return type(usage)(usage.total, usage.total - 50_000, 50_000)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    message = error_line(invoke("train", recipe))
    assert "of free disk needed" in message and "48.8 KiB free" in message
    assert "train.save_total_limit" in message and "output.dir" in message
    assert not (tmp_path / "out").exists()  # not even the folder the lock file needed


@pytest.mark.slow
def test_checkpoint_estimate_covers_what_the_trainer_writes(make_recipe: Any, tmp_path: Path) -> None:
    recipe = make_recipe(train={"max_steps": 1, "save_steps": 1})
    assert invoke("train", recipe).exit_code == 0
    checkpoint = last_checkpoint(tmp_path / "runs" / "recipe")
    written = sum(path.stat().st_size for path in checkpoint.iterdir())
    from sovtune import model as models
    from sovtune.config import load_recipe

    loaded = load_recipe(recipe)
    tokenizer = models.load_tokenizer(loaded)
    peft_model = models.attach_adapter(models.load_base_model(loaded, tokenizer), loaded)
    estimate, adapter = checkpoints.checkpoint_size_estimate(
        peft_model, "adamw_torch", checkpoints.tokenizer_bytes(tokenizer)
    )
    assert written <= estimate <= written + 2 * checkpoints.CHECKPOINT_OVERHEAD_BYTES
    adapter_written = sum(path.stat().st_size for path in (tmp_path / "runs" / "recipe" / "adapter").iterdir())
    assert 0.5 * adapter_written <= adapter <= 2 * adapter_written


def safetensors_disk_full(monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """Make peft's safetensors write fail as a full disk does (the error text is what safetensors raises then)."""
    import peft.peft_model
    from safetensors import SafetensorError

    original = peft.peft_model.safe_save_file

    def save_file(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        if when in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # what made it to disk before space ran out
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)


@pytest.mark.slow
def test_full_disk_mid_run_keeps_the_last_good_checkpoint(
    make_recipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = make_recipe(train={"max_steps": 6, "save_steps": 2})
    run_dir = tmp_path / "runs" / "recipe"
    with monkeypatch.context() as patch:
        safetensors_disk_full(patch, "checkpoint-4")
        message = error_line(invoke("train", recipe))
    assert "the disk filled up while writing" in message
    assert f"the last complete checkpoint {run_dir / 'checkpoints' / 'checkpoint-2'} is kept" in message
    assert "resume with: sovtune train" in message and "--resume" in message
    assert [path.name for path in (run_dir / "checkpoints").iterdir() if path.is_dir()] == ["checkpoint-2"]
    assert not (run_dir / "adapter").exists() and not lock.lock_path(run_dir).exists()

    result = invoke("train", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "train_metrics.json").read_text())["global_step"] == 6


@pytest.mark.slow
def test_full_disk_while_saving_the_adapter(make_recipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = make_recipe(train={"max_steps": 2, "save_steps": 2})
    run_dir = tmp_path / "runs" / "recipe"
    with monkeypatch.context() as patch:
        safetensors_disk_full(patch, ".adapter.tmp")
        message = error_line(invoke("train", recipe))
    assert "checkpoint-2 is kept" in message
    assert not (run_dir / "adapter").exists() and not list(run_dir.glob(".adapter*"))
    assert invoke("train", recipe, "--resume").exit_code == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_torch_write_failure_counts_as_a_full_disk_only_when_space_is_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.save on a full tmpfs: "unexpected pos 576 vs 534", raised while handling an iostream error.
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    except RuntimeError as exc:
        failure = exc
    assert not checkpoints.is_disk_full(failure, tmp_path)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type(real_usage(path))(10**9, 10**9 - 1000, 1000))
    assert checkpoints.is_disk_full(failure, tmp_path)
    assert checkpoints.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not checkpoints.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def small_filesystem(folder: Path, size: str) -> bool:
    """A tmpfs of `size` at `folder`, when this process may mount one (root on Linux); False otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_really_full_disk_mid_run(make_recipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on a real file system that fills up (another process writes into it) while training runs."""
    disk = tmp_path / "disk"
    if not small_filesystem(disk, "12m"):
        pytest.skip("needs permission to mount a small tmpfs (root on Linux)")
    try:
        run_dir = disk / "runs" / "recipe"
        recipe = make_recipe(train={"max_steps": 6, "save_steps": 2}, output={"dir": str(run_dir)})
        from transformers.trainer_callback import CallbackHandler

        original, calls = CallbackHandler.on_step_begin, {"n": 0}

        def on_step_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:  # after checkpoint-2: something else takes all the space left
                with open(disk / "filler", "wb") as handle:
                    try:
                        while True:
                            handle.write(b"\0" * 65536)
                    except OSError:
                        pass
            return original(self, *args, **kwargs)

        monkeypatch.setattr(CallbackHandler, "on_step_begin", on_step_begin)
        message = error_line(invoke("train", recipe))
        assert "the disk filled up while writing" in message and "checkpoint-2 is kept" in message
        assert checkpoints.complete_checkpoints(run_dir) == [run_dir / "checkpoints" / "checkpoint-2"]
        assert [path.name for path in (run_dir / "checkpoints").iterdir() if path.is_dir()] == ["checkpoint-2"]
        monkeypatch.undo()
        (disk / "filler").unlink()
        assert invoke("train", recipe, "--resume").exit_code == 0
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------------------------
# One writer per run directory


HOLD_LOCK = """
import sys, time
from sovtune.run.lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_a_second_run_into_the_same_directory_is_refused(make_recipe: Any, tmp_path: Path) -> None:
    recipe = make_recipe(train={"max_steps": 2})
    run_dir = tmp_path / "runs" / "recipe"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        message = error_line(invoke("train", recipe))
        assert f"another sovtune run (pid {holder.pid} on" in message and "is writing this run directory" in message
        assert "--set output.dir=" in message
        assert not run_dir.exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: the next run takes it over.
    assert lock.lock_path(run_dir).exists()
    assert invoke("train", recipe).exit_code == 0
    assert not lock.lock_path(run_dir).exists()


def test_eval_refuses_a_run_directory_another_process_is_writing(make_recipe: Any, tmp_path: Path) -> None:
    """`sovtune eval RUN_DIR` writes the report into the run directory: it takes the same lock as train and run."""
    run_dir = make_run(make_recipe(train={"max_steps": 2})).run_dir
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        message = error_line(invoke("eval", str(run_dir)))
        assert f"another sovtune run (pid {holder.pid} on" in message
        assert not (run_dir / "report.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert invoke("eval", str(run_dir)).exit_code == 0
    assert (run_dir / "report.json").is_file() and not lock.lock_path(run_dir).exists()


def test_a_lock_naming_a_live_process_is_respected_without_flock(tmp_path: Path) -> None:
    """Where flock is a no-op (some network file systems), the pid and its start time decide."""
    import socket

    import psutil

    run_dir = tmp_path / "run"
    parent = psutil.Process(os.getppid())
    owner = {
        "pid": parent.pid,
        "host": socket.gethostname(),
        "started_at": "earlier",
        "process_started": parent.create_time(),
    }
    lock.lock_path(run_dir).write_text(json.dumps(owner))
    with pytest.raises(lock.RunLocked, match=f"pid {parent.pid}"):
        lock.RunLock(run_dir).acquire()
    # The same pid with another start time is a reused pid: the lock is stale.
    lock.lock_path(run_dir).write_text(json.dumps({**owner, "process_started": parent.create_time() - 100}))
    with lock.RunLock(run_dir):
        assert json.loads(lock.lock_path(run_dir).read_text())["pid"] == os.getpid()
    assert not lock.lock_path(run_dir).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    owner = {"pid": dead.pid, "host": socket.gethostname(), "started_at": "earlier", "process_started": time.time() - 5}
    lock.lock_path(run_dir).write_text(json.dumps(owner))
    with caplog.at_level("WARNING"), lock.RunLock(run_dir):
        pass
    assert f"pid {dead.pid}" in caplog.text and "ended without releasing it" in caplog.text


def test_the_lock_is_reentrant_within_a_process_and_cleans_up_its_folders(tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / "b" / "run"
    with lock.RunLock(run_dir):
        with lock.RunLock(run_dir):
            assert lock.lock_path(run_dir).exists()
        assert lock.lock_path(run_dir).exists()  # the outer holder still has it
    assert not (tmp_path / "a").exists()
