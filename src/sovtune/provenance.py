"""The run manifest (`manifest.json`): hashes, revisions and versions that trace an adapter to its inputs.

Stages only append; the file is replaced atomically. `verify` recomputes every recorded file hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

from sovtune.errors import SovtuneError
from sovtune.recipe import Recipe

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHECKSUMS = "SHA256SUMS"
RUN_ROOT, ABSOLUTE_ROOT = "run", "absolute"
PACKAGES = (
    "sovtune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "huggingface_hub", "tokenizers",
    "safetensors", "bitsandbytes", "pydantic", "numpy",
)  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)  # fmt: skip
_CHUNK = 1 << 20


class ManifestError(SovtuneError):
    """The manifest is missing, unreadable, or would be rewritten."""


class VerifyFailed(SovtuneError):
    """A recorded hash no longer matches the file: the run or bundle was changed after it was written."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_stream(handle: Any) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def file_entry(path: Path, run_dir: Path | None = None) -> dict[str, Any]:
    """A verifiable record: run-relative when the file lives in the run directory, else absolute."""
    path = Path(path)
    resolved = path.resolve()
    if run_dir is not None and resolved.is_relative_to(Path(run_dir).resolve()):
        shown, root = resolved.relative_to(Path(run_dir).resolve()).as_posix(), RUN_ROOT
    else:
        shown, root = str(resolved), ABSOLUTE_ROOT
    return {"path": shown, "root": root, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def tree_entries(folder: Path, run_dir: Path | None = None, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Entries for the files of a folder (recursively, hidden and temporary files left out), or only `names`."""
    folder = Path(folder)
    if names is not None:
        files = [folder / name for name in names if (folder / name).is_file()]
    else:
        files = [
            path
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        ]
    return [file_entry(path, run_dir) for path in files]


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
                {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1)}
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


def _hub_snapshot(repo_id: str, revision: str | None, repo_type: str) -> Path | None:
    """The locally cached snapshot folder of a hub repo (its name is the resolved commit), without network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, local_files_only=True))
    except Exception:  # not cached (yet): the commit stays unknown rather than failing the run
        return None


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
    snapshot = _hub_snapshot(recipe.model.name_or_path, recipe.model.revision, "model")
    if snapshot is not None:
        record["commit"] = snapshot.name
        record["files"] = tree_entries(snapshot)
    return record


def data_records(recipe: Recipe) -> list[dict[str, Any]]:
    sources = [("train", source) for source in recipe.data.train]
    if recipe.data.eval is not None:
        sources.append(("eval", recipe.data.eval))
    records = []
    for split, source in sources:
        path = recipe.resolve(source.path)
        record: dict[str, Any] = {"split": split, "source": source.path}
        if path.exists():
            record["files"] = [file_entry(path)] if path.is_file() else tree_entries(path)
        else:
            snapshot = _hub_snapshot(source.path, source.revision, "dataset")
            record["hub"] = {
                "id": source.path,
                "revision": source.revision,
                "commit": snapshot.name if snapshot is not None else None,
                "subset": source.subset,
                "split": source.split,
            }
            record["files"] = []
        records.append(record)
    return records


def tokenizer_record(recipe: Recipe, tokenizer: Any) -> dict[str, Any]:
    """Tokenizer files of the base and content hashes that do not depend on the file layout."""
    record: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template_sha256": sha256_text(tokenizer.chat_template) if getattr(tokenizer, "chat_template", None) else None,
        "chat_template_source": "recipe" if recipe.data.chat_template else "tokenizer",
        "files": [],
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        record["tokenizer_sha256"] = sha256_text(backend.to_str())
    if recipe.model_is_local and Path(recipe.model_location).is_dir():
        record["files"] = tree_entries(Path(recipe.model_location), names=TOKENIZER_FILES)
    return record


def data_file_hashes(recipe: Recipe) -> list[dict[str, str]]:
    """sha256 of each local data file (hub datasets as id@revision), e.g. for the audit log."""
    hashes = []
    for record in data_records(recipe):
        hashes.extend({"path": entry["path"], "sha256": entry["sha256"]} for entry in record["files"])
        if "hub" in record:
            hub = record["hub"]
            hashes.append({"path": f"{hub['id']}@{hub['commit'] or hub['revision']}", "sha256": None})
    return hashes


# ---------------------------------------------------------------------------------------------------------------
# Writing: start once, then append stages


def write_json_atomic(path: Path, value: Any) -> None:
    """tmp + fsync + rename (+ fsync of the folder): a reader sees the old file or the new one, never half."""
    from sovtune.safety import atomic_write_text  # the one atomic writer

    atomic_write_text(Path(path), json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the manifest between processes (e.g. eval while a push reads it)."""
    import fcntl

    with open(run_dir / ".manifest.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest; is {run_dir} a run directory written by `sovtune train`?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc}); it was damaged after the run") from None


def start(
    recipe: Recipe,
    run_dir: Path,
    tokenizer: Any = None,
    resume: bool = False,
    data_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the manifest at the start of a run (and the resolved recipe beside it). Runs the licence gate.

    On resume the first section stays as it was and a `resume` stage records the new environment.
    """
    from sovtune.licence import check_licence

    licence = check_licence(recipe).summary()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_text = recipe.to_yaml()
    recipe_path = run_dir / "recipe.yaml"
    if (run_dir / MANIFEST).exists():
        if not resume:
            raise ManifestError(f"{run_dir / MANIFEST}: a manifest exists already; resume the run or use a new run directory")
        _write_recipe(recipe_path, recipe_text)
        details = {"recipe_sha256": sha256_text(recipe_text), "licence": licence, "environment": environment()}
        return append_stage(run_dir, "resume", details, files=[recipe_path])
    _write_recipe(recipe_path, recipe_text)
    if tokenizer is None:
        from sovtune.model import load_tokenizer

        tokenizer = load_tokenizer(recipe)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "run": {"name": recipe.name, "started_at": now(), "seed": recipe.train.seed},
        "recipe": {
            "sha256": sha256_text(recipe_text),
            "file": file_entry(recipe_path, run_dir),
            "source_path": recipe.source_path,
            "git": git_state(recipe.base_dir),
        },
        "data": data_records(recipe),
        "data_scan": (data_stats or {}).get("data_scan"),
        "base_model": {**base_model_record(recipe), "licence": licence},
        "tokenizer": tokenizer_record(recipe, tokenizer),
        "environment": environment(),
        "stages": [],
    }
    with _locked(run_dir):
        write_json_atomic(run_dir / MANIFEST, manifest)
    return manifest


def _write_recipe(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
        write_json_atomic(run_dir / MANIFEST, manifest)
    return manifest


def adapter_files(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "adapter"
    return [Path(entry) for entry in sorted(folder.rglob("*")) if entry.is_file() and not entry.name.startswith(".")]


def record_train(run_dir: Path, recipe: Recipe, metrics: dict[str, Any], started_at: str | None = None) -> dict[str, Any]:
    """The train stage: adapter files, training metrics (log history left in train_metrics.json)."""
    run_dir = Path(run_dir)
    details: dict[str, Any] = {"metrics": {k: v for k, v in metrics.items() if k != "log_history"}}
    manifest = read_manifest(run_dir)
    if not manifest["base_model"]["local"] and manifest["base_model"]["commit"] is None:
        # The hub base was downloaded by this stage: now its commit and files can be recorded.
        details["base_model"] = base_model_record(recipe)
    outputs = adapter_files(run_dir) + [p for p in (run_dir / "train_metrics.json", run_dir / "data_stats.json") if p.exists()]
    return append_stage(run_dir, "train", details, outputs, started_at)


def record_eval(run_dir: Path, report: dict[str, Any], files: Iterable[Path], started_at: str | None = None) -> dict[str, Any]:
    """The eval stage: base and tuned value of every metric, the gates' verdict, and the report files' hashes."""
    metrics = {
        f"{result['dataset']}/{result['metric']}": {key: result.get(key) for key in ("base", "tuned", "difference", "ci_low", "ci_high")}
        for result in report.get("results", [])
    }
    details = {"metrics": metrics, "gates_passed": report.get("passed")}
    return append_stage(run_dir, "eval", details, [Path(p) for p in files if Path(p).is_file()], started_at)


# ---------------------------------------------------------------------------------------------------------------
# Verifying


@dataclass
class VerifyResult:
    target: str
    checked: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # in a bundle but in neither the checksums nor the manifest
    not_checked: list[str] = field(default_factory=list)  # outside the run (data, base model) and not present here

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)

    def describe(self) -> str:
        parts = []
        if self.mismatched:
            parts.append(f"hash mismatch: {', '.join(self.mismatched)}")
        if self.missing:
            parts.append(f"missing: {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"not listed in the checksums: {', '.join(self.unexpected)}")
        if parts:
            return f"{self.target}: {'; '.join(parts)} ({len(self.checked)} files checked)"
        skipped = f"; {len(self.not_checked)} external files not present here, not checked" if self.not_checked else ""
        return f"{self.target}: {len(self.checked)} files match their recorded SHA-256{skipped}"


def recorded_files(manifest: dict[str, Any]) -> dict[tuple[str, str], str]:
    """Every file entry anywhere in the manifest, (root, path) -> sha256; a later stage's entry supersedes."""
    found: dict[tuple[str, str], str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if {"path", "root", "sha256"} <= node.keys() and node["sha256"]:
                found[(node["root"], node["path"])] = node["sha256"]
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({key: value for key, value in manifest.items() if key != "stages"})
    walk(manifest.get("stages", []))
    return found


def verify(target: str | Path, strict: bool = False) -> VerifyResult:
    """Recompute every hash of a run directory or an exported bundle; `VerifyFailed` lists what differs.

    Files outside the run (data, a local base model) are checked where they exist; `strict` also fails when absent.
    """
    target = Path(target)
    if target.is_file() and tarfile.is_tarfile(target):
        from sovtune.bundle import verify_bundle

        result = verify_bundle(target)
    elif target.is_dir():
        result = verify_run_dir(target, strict)
    else:
        raise VerifyFailed(f"{target}: neither a run directory nor a bundle (.tar); give RUN_DIR or BUNDLE")
    if not result.ok:
        raise VerifyFailed(result.describe() + "; the files changed after they were recorded")
    return result


def verify_run_dir(run_dir: Path, strict: bool = False) -> VerifyResult:
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    result = VerifyResult(target=str(run_dir))
    expected = recorded_files(manifest)
    checksums = run_dir / CHECKSUMS
    if checksums.exists():
        # An unpacked bundle: its checksum list must agree too.
        for path, digest in parse_checksums(checksums.read_text(encoding="utf-8")).items():
            expected.setdefault((RUN_ROOT, path), digest)
            if expected[(RUN_ROOT, path)] != digest:
                result.mismatched.append(f"{path} (manifest and {CHECKSUMS} disagree)")
    for (root, shown), digest in sorted(expected.items()):
        path = run_dir / shown if root == RUN_ROOT else Path(shown)
        if not path.is_file():
            if root == RUN_ROOT or strict:
                result.missing.append(shown)
            else:
                result.not_checked.append(shown)
            continue
        result.checked.append(shown)
        if sha256_file(path) != digest:
            result.mismatched.append(shown)
    return result


def checksums_text(entries: dict[str, str]) -> str:
    """`sha256sum` format, so `sha256sum -c SHA256SUMS` works on an unpacked bundle too."""
    return "".join(f"{digest}  {path}\n" for path, digest in sorted(entries.items()))


def parse_checksums(text: str) -> dict[str, str]:
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, path = line.partition("  ")
        if not sep or len(digest) != 64:
            raise VerifyFailed(f"{CHECKSUMS}:{number}: not '<sha256>  <path>'; the checksum file is damaged")
        entries[path] = digest
    return entries
