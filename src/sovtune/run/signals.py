"""SIGINT / SIGTERM: finish the optimizer step, save a checkpoint, stop, and say how to resume."""

from __future__ import annotations

import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

from sovtune.config import Recipe
from sovtune.core.rundir import RunDir
from sovtune.core.secrets import redact_secrets
from sovtune.errors import SovtuneError


class Interrupted(SovtuneError):
    """Training was stopped by SIGINT/SIGTERM after saving a checkpoint; exit code 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """Signal handlers for the duration of training; the trainer callback turns a signal into save + stop.

    A second signal restores the previous handler and re-delivers the signal: Ctrl-C twice stops at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, resume_command: str) -> None:
        self.resume_command = resume_command
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        # os.write: safe from a signal handler, and unbuffered so the user sees it at once.
        os.write(
            2,
            f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this training step, then stopping "
            f"(send it again to stop without saving)\n".encode(),
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        stop = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
                if stop.requested_on_any_rank(args):
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopOnSignal()

    def requested_on_any_rank(self, args: Any) -> bool:
        """In distributed training every rank must stop at the same step, or the next collective hangs."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        import torch

        flag = torch.tensor([1 if self.requested else 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM  # another rank got it (torchrun forwards SIGTERM to every worker)
        return bool(flag.item())

    def raise_if_stopped(self, state: Any, run_dir: Path) -> None:
        """After `trainer.train` returns: a stop before the last step is an `Interrupted` with the resume line."""
        if self.signum is None or state.global_step >= state.max_steps:
            return
        checkpoint = RunDir(run_dir).checkpoints_dir / f"checkpoint-{state.global_step}"
        name = signal.Signals(self.signum).name
        raise Interrupted(
            f"training stopped by {name} at step {state.global_step} of {state.max_steps}; checkpoint saved to "
            f"{checkpoint}; resume with: {self.resume_command}",
            self.signum,
        )


def resume_command(recipe: Recipe, command: str = "train", overrides: tuple[str, ...] | list[str] = ()) -> str:
    """The command line that continues this run."""
    source = recipe.source_path or "RECIPE"
    try:
        relative = os.path.relpath(source)
        source = source if relative.startswith("..") else relative  # short when under the working directory
    except ValueError:
        pass  # another drive (Windows): keep the absolute path
    parts = ["sovtune", command, shlex.quote(source)]
    parts += [f"--set {shlex.quote(item)}" for item in overrides]
    return redact_secrets(" ".join(parts + ["--resume"]))
