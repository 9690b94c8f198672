"""The resume fingerprint: resuming is only allowed into the same recipe and the same data."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from sovtune.config import Recipe
from sovtune.core.files import atomic_write_json
from sovtune.core.rundir import RunDir
from sovtune.core.secrets import redact_secrets
from sovtune.data import PreparedData, data_file_hashes
from sovtune.errors import SovtuneError

log = logging.getLogger(__name__)


class ResumeRefused(SovtuneError):
    """The recipe or the data changed since the run started, so resuming would not continue the same run."""


FINGERPRINT = RunDir.FINGERPRINT
# Only what shapes the training trajectory; description, output, eval, hub and sovereignty may change on resume.
TRAINING_SECTIONS = ("schema_version", "model", "quantization", "adapter", "data", "train")


def flatten_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 0.01}} -> {"train.learning_rate": 0.01}; lists of sections get indices."""
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        value = {str(index): item for index, item in enumerate(value)}
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten_settings(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


# Where a data source lives may change (a moved folder); what it holds is compared by content hashes instead.
_DATA_SOURCE_PATH = re.compile(r"^data\.(train\.\d+|eval)\.path$")


def tokens_sha256(items: list[Any]) -> str:
    """Hash of the token ids and labels in order: the data the trainer sees, after template and truncation."""
    from array import array

    digest = hashlib.sha256()
    for item in items:
        digest.update(array("q", item.input_ids).tobytes())
        digest.update(b"|")
        digest.update(array("q", item.labels).tobytes())
        digest.update(b"\n")
    return digest.hexdigest()


def run_fingerprint(recipe: Recipe, data: PreparedData) -> dict[str, Any]:
    """What must not change for a resume to continue the same run: training settings, data files, tokens."""
    dumped = recipe.model_dump(mode="json")
    training = json.loads(redact_secrets(json.dumps({key: dumped.get(key) for key in TRAINING_SECTIONS})))
    return {
        "recipe": training,
        "recipe_sha256": hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest(),
        "data_files": {entry["path"]: entry["sha256"] for entry in data_file_hashes(recipe.data, recipe.base_dir)},
        "train_tokens_sha256": tokens_sha256(data.train),
        "eval_tokens_sha256": tokens_sha256(data.eval),
    }


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences: training settings first, then the data (by content, wherever it lives)."""
    changes = []
    old_fields, new_fields = flatten_settings(old.get("recipe", {})), flatten_settings(new.get("recipe", {}))
    for key in sorted(set(old_fields) | set(new_fields)):
        if _DATA_SOURCE_PATH.match(key):
            continue
        if old_fields.get(key, "<unset>") != new_fields.get(key, "<unset>"):
            changes.append(f"{key}: {old_fields.get(key, '<unset>')!r} -> {new_fields.get(key, '<unset>')!r}")
    old_files, new_files = old.get("data_files", {}), new.get("data_files", {})
    if sorted(map(str, old_files.values())) != sorted(map(str, new_files.values())):
        old_hashes, new_hashes = set(old_files.values()), set(new_files.values())
        for path in sorted(set(old_files) | set(new_files)):
            if path in old_files and path in new_files and old_files[path] != new_files[path]:
                changes.append(f"data file {path} changed")
            elif path in new_files and path not in old_files and new_files[path] not in old_hashes:
                changes.append(f"data file {path} is not the data the run started with")
            elif path in old_files and path not in new_files and old_files[path] not in new_hashes:
                changes.append(f"data file {path} is no longer used")
    if not changes:  # nothing visible changed, yet the tokens did: the tokenizer or its chat template
        for key, what in (("train_tokens_sha256", "training"), ("eval_tokens_sha256", "evaluation")):
            if old.get(key) != new.get(key):
                changes.append(f"the tokenised {what} data differs (the tokenizer or chat template changed)")
    return changes


def check_resume(run_dir: Path, current: dict[str, Any], force: bool) -> list[str]:
    """Refuse to resume into a run whose recipe or data changed, unless forced; return the changes."""
    path = Path(run_dir) / FINGERPRINT
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if force:
            return ["no fingerprint recorded"]
        raise ResumeRefused(
            f"{path}: missing, so sovtune cannot tell whether the recipe and data are unchanged; "
            "pass --force to resume anyway"
        ) from None
    except (OSError, ValueError) as exc:
        raise ResumeRefused(f"{path}: unreadable ({exc}); pass --force to resume anyway") from None
    changes = fingerprint_changes(previous, current)
    if changes and not force:
        shown = "; ".join(changes[:3]) + (f" (+{len(changes) - 3} more)" if len(changes) > 3 else "")
        raise ResumeRefused(
            f"{run_dir}: cannot resume: the recipe or data changed since the run started ({shown}); "
            "resume with the original recipe, data and --set options, or pass --force to resume anyway"
        )
    if changes:
        log.warning("resuming %s with changes (--force): %s", run_dir, "; ".join(changes))
    return changes


def write_fingerprint(run_dir: Path, fingerprint: dict[str, Any], forced_changes: list[str] | None = None) -> None:
    """Record the fingerprint; a forced resume keeps the history of what changed."""
    path = Path(run_dir) / FINGERPRINT
    history: list[Any] = []
    if forced_changes:
        try:
            history = json.loads(path.read_text(encoding="utf-8")).get("forced_resumes", [])
        except (OSError, ValueError):
            history = []
        history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": forced_changes})
    atomic_write_json(path, {**fingerprint, "forced_resumes": history})
