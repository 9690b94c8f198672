"""The run manifest (`manifest.json`): hashes, revisions and versions that trace an adapter to its inputs.

Stages only append; the file is replaced atomically. It records what the stages did; it gates nothing and loads
nothing (the licence verdict and the tokenizer come from the stage that checked or loaded them).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from sovtune.config import Recipe
from sovtune.core.files import atomic_write_json, atomic_write_text
from sovtune.core.hashing import RUN_ROOT, file_entry, now, sha256_text, tree_entries
from sovtune.core.rundir import ManifestError, RunDir
from sovtune.data import data_records, hub_snapshot

MANIFEST = RunDir.MANIFEST
MANIFEST_VERSION = 1
PACKAGES = (
    "sovtune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "huggingface_hub", "tokenizers",
    "safetensors", "bitsandbytes", "pydantic", "numpy",
)  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# What goes into the manifest


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "accelerators": [],
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["accelerators"].append(
                {
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    return info


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "hardware": hardware(),
    }


def git_state(folder: Path) -> dict[str, Any] | None:
    """Commit and dirtiness of the repository holding `folder`; never the remote URL (it may embed credentials)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status), "repository": git("rev-parse", "--show-toplevel")}


def base_model_record(recipe: Recipe) -> dict[str, Any]:
    """Local base: hashes of every file. Hub base: the pinned revision, the resolved commit and files if cached."""
    record: dict[str, Any] = {
        "name_or_path": recipe.model.name_or_path,
        "location": recipe.model_location,
        "local": recipe.model_is_local,
        "revision": recipe.model.revision,
        "commit": None,
        "files": [],
    }
    if recipe.model_is_local:
        folder = Path(recipe.model_location)
        record["files"] = tree_entries(folder) if folder.is_dir() else []
        return record
    snapshot = hub_snapshot(recipe.model.name_or_path, recipe.model.revision, "model")
    if snapshot is not None:
        record["commit"] = snapshot.name
        record["files"] = tree_entries(snapshot)
    return record


def tokenizer_record(recipe: Recipe, tokenizer: Any) -> dict[str, Any]:
    """Tokenizer files of the base and content hashes that do not depend on the file layout."""
    record: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template_sha256": sha256_text(tokenizer.chat_template)
        if getattr(tokenizer, "chat_template", None)
        else None,
        "chat_template_source": "recipe" if recipe.data.chat_template else "tokenizer",
        "files": [],
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        record["tokenizer_sha256"] = sha256_text(backend.to_str())
    if recipe.model_is_local and Path(recipe.model_location).is_dir():
        record["files"] = tree_entries(Path(recipe.model_location), names=TOKENIZER_FILES)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Writing: start once, then append stages


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the manifest between processes (e.g. eval while a push reads it)."""
    with open(Path(run_dir) / RunDir.MANIFEST_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    return RunDir(run_dir).manifest()


def start(
    recipe: Recipe,
    run_dir: Path,
    tokenizer: Any = None,
    resume: bool = False,
    data_stats: dict[str, Any] | None = None,
    licence: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the manifest at the start of a run, and the resolved recipe beside it.

    `licence` is the verdict of the licence gate the training stage ran (None: not checked); `tokenizer` is the one
    the run tokenised with. On resume the first section stays as it was and a `resume` stage records the new
    environment.
    """
    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    recipe_text = recipe.to_yaml()
    recipe_path = run / RunDir.RECIPE
    if (run / MANIFEST).exists():
        if not resume:
            raise ManifestError(
                f"{run / MANIFEST}: a manifest exists already; resume the run or use a new run directory"
            )
        _write_recipe(recipe_path, recipe_text)
        details = {"recipe_sha256": sha256_text(recipe_text), "licence": licence, "environment": environment()}
        return append_stage(run.path, "resume", details, files=[recipe_path])
    _write_recipe(recipe_path, recipe_text)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "run": {"name": recipe.name, "started_at": now(), "seed": recipe.train.seed},
        "recipe": {
            "sha256": sha256_text(recipe_text),
            "file": file_entry(recipe_path, run.path),
            "source_path": recipe.source_path,
            "git": git_state(recipe.base_dir),
        },
        "data": data_records(recipe.data, recipe.base_dir),
        "data_scan": (data_stats or {}).get("data_scan"),
        "base_model": {**base_model_record(recipe), "licence": licence},
        "tokenizer": tokenizer_record(recipe, tokenizer) if tokenizer is not None else None,
        "environment": environment(),
        "stages": [],
    }
    with _locked(run.path):
        atomic_write_json(run / MANIFEST, manifest)
    return manifest


def _write_recipe(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def append_stage(
    run_dir: Path,
    stage: str,
    details: dict[str, Any] | None = None,
    files: Iterable[Path] = (),
    started_at: str | None = None,
) -> dict[str, Any]:
    """Append one stage (train, eval, data_scan, ...): its outputs' hashes, metrics and times. Nothing is rewritten."""
    run_dir = Path(run_dir)
    entries = [file_entry(path, run_dir) for path in files]
    with _locked(run_dir):
        manifest = read_manifest(run_dir)
        record = {"stage": stage, "started_at": started_at, "ended_at": now(), **(details or {}), "files": entries}
        manifest.setdefault("stages", []).append(record)
        atomic_write_json(run_dir / MANIFEST, manifest)
    return manifest


def record_train(
    run_dir: Path, recipe: Recipe, metrics: dict[str, Any], started_at: str | None = None
) -> dict[str, Any]:
    """The train stage: adapter files, training metrics (log history left in train_metrics.json)."""
    run_dir = Path(run_dir)
    details: dict[str, Any] = {"metrics": {k: v for k, v in metrics.items() if k != "log_history"}}
    manifest = read_manifest(run_dir)
    if not manifest["base_model"]["local"] and manifest["base_model"]["commit"] is None:
        # The hub base was downloaded by this stage: now its commit and files can be recorded.
        details["base_model"] = base_model_record(recipe)
    run = RunDir(run_dir)
    outputs = run.adapter_files() + [p for p in (run / RunDir.TRAIN_METRICS, run / RunDir.DATA_STATS) if p.exists()]
    return append_stage(run_dir, "train", details, outputs, started_at)


def record_eval(
    run_dir: Path, report: dict[str, Any], files: Iterable[Path], started_at: str | None = None
) -> dict[str, Any]:
    """The eval stage: base and tuned value of every metric, the gates' verdict, and the report files' hashes."""
    metrics = {
        f"{result['dataset']}/{result['metric']}": {
            key: result.get(key) for key in ("base", "tuned", "difference", "ci_low", "ci_high")
        }
        for result in report.get("results", [])
    }
    details = {"metrics": metrics, "gates_passed": report.get("passed")}
    return append_stage(run_dir, "eval", details, [Path(p) for p in files if Path(p).is_file()], started_at)


def recorded_files(manifest: Any) -> dict[tuple[str, str], str]:
    """Every file entry anywhere in the manifest, (root, path) -> sha256; a later stage's entry supersedes.

    A manifest may come from elsewhere (a bundle, a pulled repository, a run folder someone sent): it must be an
    object, its entries well-formed, and a run file's path must stay inside the run (relative, no `..`). Walked with
    a stack, not recursion, so no nesting depth makes it crash.
    """
    if not isinstance(manifest, dict):
        raise ManifestError(f"{MANIFEST}: must be a JSON object, found {type(manifest).__name__}; restore it")
    found: dict[tuple[str, str], str] = {}
    # Depth first, in document order: stages are walked after the rest, so their entries supersede.
    pending: list[Any] = [manifest.get("stages", []), {k: v for k, v in manifest.items() if k != "stages"}]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if {"path", "root", "sha256"} <= node.keys() and node["sha256"]:
                root, path = _checked_entry(node)
                found[(root, path)] = node["sha256"]
                continue
            pending.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            pending.extend(reversed(node))
    return found


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _checked_entry(entry: dict[str, Any]) -> tuple[str, str]:
    root, path, digest = entry["root"], entry["path"], entry["sha256"]
    shown = repr(path)[:120]
    if not (isinstance(root, str) and isinstance(path, str) and isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise ManifestError(
            f"{MANIFEST}: file entry {shown} is not a path, root and SHA-256 as sovtune writes them; "
            "restore the manifest"
        )
    if root == RUN_ROOT:
        parts = PurePosixPath(path).parts
        if not parts or path.startswith("/") or "\\" in path or ".." in parts or "." in path.split("/"):
            raise ManifestError(
                f"{MANIFEST}: run file {shown} is not a path inside the run; a manifest records run files relative to "
                "the run folder, restore it"
            )
    return root, path
