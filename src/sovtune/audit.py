"""Append-only JSONL audit log of check, train, eval, push, pull, export and merge: who, where, what, outcome.

One `os.write` of one line to a file opened with O_APPEND, so concurrent writers never interleave. Never secrets:
every string is passed through the secret scanner and the values of token-like environment variables are removed.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from sovtune import __version__
from sovtune.config import Recipe
from sovtune.core.hashing import now, sha256_text
from sovtune.core.rundir import RunDir
from sovtune.core.secrets import redact_secrets
from sovtune.data import data_file_hashes
from sovtune.errors import GateFailed, SovtuneError
from sovtune.licence import LicenceRefused
from sovtune.offline import NetworkBlocked

EVENTS = ("check", "train", "eval", "run", "push", "pull", "sign", "export", "merge", "verify")
ENV_PATH = "SOVTUNE_AUDIT_LOG"
DEFAULT_PATH = "~/.sovtune/audit.jsonl"
_SECRET_KEYS = ("token", "password", "secret", "api_key", "apikey", "authorization")


class AuditError(SovtuneError):
    """The audit log cannot be written (an audited action must not run unrecorded)."""


def log_path(recipe: Recipe | None = None) -> Path:
    """The recipe's `sovereignty.audit_log` (relative to the recipe), else $SOVTUNE_AUDIT_LOG, else
    ~/.sovtune/audit.jsonl."""
    if recipe is not None and recipe.sovereignty.audit_log:
        return recipe.resolve(recipe.sovereignty.audit_log)
    return Path(os.path.expanduser(os.environ.get(ENV_PATH) or DEFAULT_PATH))


def scrub(value: Any) -> Any:
    """The value with secrets replaced: scanner matches, token-like env values, and fields named like secrets."""

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return redact_secrets(node)
        if isinstance(node, dict):
            return {
                key: "[REDACTED]"
                if any(word in str(key).lower() for word in _SECRET_KEYS) and node[key]
                else walk(item)
                for key, item in node.items()
            }
        if isinstance(node, (list, tuple)):
            return [walk(item) for item in node]
        return node

    return walk(value)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def event_record(
    event: str,
    outcome: str,
    recipe: Recipe | None = None,
    destination: str | None = None,
    error: str | None = None,
    details: dict[str, Any] | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """One audit line. `run_dir`: the event acted on a run directory (push, sign, verify, ...): it is recorded, and
    `recipe` names the recipe that run recorded, not the file it was once trained from."""
    record: dict[str, Any] = {
        "time": now(),
        "event": event,
        "outcome": outcome,
        "user": _user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "sovtune": __version__,
        "recipe": None,
        "recipe_sha256": None,
        "data": [],
        "destination": destination,
    }
    if run_dir is not None:
        record["run_dir"] = os.path.abspath(run_dir)
    if recipe is not None:
        record["recipe"] = recipe.source_path or recipe.name
        if run_dir is not None:
            record["recipe"] = os.path.abspath(RunDir(run_dir) / RunDir.RECIPE)
        record["recipe_sha256"] = sha256_text(recipe.to_yaml())
        with contextlib.suppress(OSError):  # data that cannot be read is the command's error to report, not ours
            record["data"] = data_file_hashes(recipe.data, recipe.base_dir)
    if error:
        record["error"] = error.splitlines()[0][:500]
    if details:
        record["details"] = details
    return scrub(record)


def record(
    event: str, outcome: str, recipe: Recipe | None = None, path: Path | None = None, **fields: Any
) -> dict[str, Any]:
    """Append one event line; `AuditError` if the log cannot be written. In a multi-process launch only rank 0
    writes."""
    entry = event_record(event, outcome, recipe, **fields)
    if int(os.environ.get("RANK", "0")) != 0:
        return entry
    target = Path(path) if path is not None else log_path(recipe)
    line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            written = os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AuditError(
            f"{target}: cannot append to the audit log ({exc.strerror}); fix its permissions or set {ENV_PATH}"
        ) from None
    if written != len(line):
        raise AuditError(
            f"{target}: short write to the audit log ({written} of {len(line)} bytes); check free disk space"
        )
    return entry


# Errors that mean a gate said no (as opposed to something broken).
REFUSALS: tuple[type[Exception], ...] = (GateFailed, LicenceRefused, NetworkBlocked)


@contextlib.contextmanager
def audited(
    event: str,
    recipe: Recipe | None = None,
    destination: str | None = None,
    details: dict[str, Any] | None = None,
    run_dir: Path | None = None,
    recorded: bool = False,
) -> Iterator[dict[str, Any]]:
    """Record `event` when the block ends: outcome ok, failed (with the one-line error), refused or interrupted.

    The block may fill the yielded dict: `recipe` once loaded, `destination` and `details` once known. `recorded`:
    the recipe is the one a run folder holds (the folder may come from anyone), so its `sovereignty.audit_log` does
    not decide where this machine writes: the event goes to $SOVTUNE_AUDIT_LOG or ~/.sovtune/audit.jsonl.
    """
    extra: dict[str, Any] = {"recipe": recipe, "destination": destination, "details": dict(details or {})}

    def write(outcome: str, error: str | None = None) -> None:
        record(
            event,
            outcome,
            extra["recipe"],
            path=log_path() if recorded else None,
            destination=extra["destination"],
            error=error,
            details=extra["details"] or None,
            run_dir=run_dir,
        )

    try:
        yield extra
    except KeyboardInterrupt:
        write("interrupted")
        raise
    except Exception as exc:
        # A SovtuneError's message is written for users (and scrubbed); a bug's message may hold anything.
        write(
            "refused" if isinstance(exc, REFUSALS) else "failed",
            str(exc) if isinstance(exc, SovtuneError) else type(exc).__name__,
        )
        raise
    write("ok")
