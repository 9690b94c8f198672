"""What a push publishes, in the form it leaves the machine, and the check of a published folder.

A publication is the run's adapter files, report.json and manifest.json, the model card, and `publish_manifest.json`,
which hashes every one of them. Held-out examples (report samples) stay behind unless the recipe opts in, and local
paths are reduced to file names; such files are published as derived copies whose manifest entry names the recorded
file they came from. The same run and settings always give the same bytes, so a second push changes nothing and a
signature made before the push (`sovtune sign`) still covers what is pushed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from sovtune.core.files import atomic_write_bytes
from sovtune.core.hashing import RUN_ROOT, sha256_bytes, sha256_file
from sovtune.core.rundir import RunDir, RunFileError
from sovtune.errors import SovtuneError
from sovtune.model import ADAPTER_WEIGHTS, PICKLE_SUFFIXES
from sovtune.publish.card import base_model_facts, build_card, check_run_documents, public_base_name
from sovtune.publish.signing import (
    SIGNATURE,
    SigningError,
    sign_folder,
    signed_digests,
    verifies_with_private_key,
    verify_folder,
)
from sovtune.run.manifest import recorded_files
from sovtune.run.verify import VerifyResult, run_file_kind, unrecorded_adapter_files

KIND = "sovtune.publication"
VERSION = 1
CARD = RunDir.CARD
MANIFEST = RunDir.MANIFEST
REPORT = RunDir.REPORT
PUBLISH_MANIFEST = RunDir.PUBLISH_MANIFEST
RUN_FILES = (REPORT, MANIFEST)  # published next to the adapter files, at the repository root
# peft writes a placeholder card into the adapter folder; the repository's README.md is ours.
NOT_PUBLISHED = {f"{RunDir.ADAPTER}/README.md"}
RESERVED = {CARD, PUBLISH_MANIFEST, SIGNATURE, *RUN_FILES}
EXTERNAL_ROOT = "external"  # a manifest entry for a file outside the run, published by its name only
# Weights and vocabularies may hold any byte sequence: the local-path check skips them.
UNSCANNED_NAMES = {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model"}
UNSCANNED_SUFFIXES = (".safetensors",)


class PublishError(SovtuneError):
    """A run cannot be published as it is, or a published folder does not match its publish manifest."""


@dataclass(frozen=True)
class PublishedFile:
    path: str  # in the repository, and in a pulled folder
    sha256: str
    size: int
    run_path: str | None = None  # where the run's manifest records it (None: made for publishing, e.g. the card)
    source: Path | None = None  # the run's file, published byte for byte
    data: bytes | None = None  # bytes made for publishing
    derived_from: str | None = None  # sha256 of the recorded run file these bytes were made from
    changes: tuple[str, ...] = ()

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.source is not None
        return self.source.read_bytes()

    def entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"path": self.path, "sha256": self.sha256, "bytes": self.size}
        if self.run_path is not None:
            entry["run_path"] = self.run_path
        if self.derived_from is not None:
            entry["derived_from"] = {"sha256": self.derived_from, "changes": list(self.changes)}
        return entry


def _made(path: str, data: bytes, **fields: Any) -> PublishedFile:
    return PublishedFile(path=path, sha256=sha256_bytes(data), size=len(data), data=data, **fields)


@dataclass
class Publication:
    """Every file a push puts in the repository (path -> file), the signature's name when it is signed."""

    run_dir: Path
    files: dict[str, PublishedFile]
    signature: str | None = None
    withheld: list[str] = field(default_factory=list)  # what stayed behind, for the log

    @property
    def paths(self) -> list[str]:
        return sorted(self.files)

    def digests(self) -> dict[str, str]:
        return {path: self.files[path].sha256 for path in self.paths}

    def write(self, folder: Path) -> Path:
        """The files as a folder: what `sovtune pull` writes (without the signature)."""
        for path in self.paths:
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.files[path].read_bytes())
        return folder

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """The files written to a temporary folder (named after the run), removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="sovtune-publish-") as tmp:
            yield self.write(Path(tmp) / (self.run_dir.name or "run"))


# ---------------------------------------------------------------------------------------------------------------
# Building a publication


def publish_files(run_dir: Path) -> dict[str, Path]:
    """Run-relative path -> file: the adapter folder's files (weights, config, tokenizer, chat template) and
    report.json / manifest.json. The adapter folder becomes the repository root so peft loads the repo as is."""
    run_dir = Path(run_dir)
    adapter = RunDir(run_dir).adapter_dir
    if not adapter.is_dir():
        raise PublishError(
            f"{adapter}: no adapter folder; train first (`sovtune train RECIPE`) or give the run directory"
        )
    files = {
        f"{RunDir.ADAPTER}/{path.relative_to(adapter).as_posix()}": path
        for path in sorted(adapter.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(adapter).parts)
    }
    files = {name: path for name, path in files.items() if name not in NOT_PUBLISHED}
    missing = [
        name
        for name, ok in (
            ("adapter_config.json", f"{RunDir.ADAPTER}/{RunDir.ADAPTER_CONFIG}" in files),
            # Pickle weights instead: refused as such once the files are checked against the manifest (build).
            (ADAPTER_WEIGHTS, f"{RunDir.ADAPTER}/{ADAPTER_WEIGHTS}" in files or bool(pickle_files(files))),
        )
        if not ok
    ]
    if missing:
        raise PublishError(
            f"{adapter}: {', '.join(missing)} missing; the adapter was not saved completely, re-run training"
        )
    clashes = sorted(name for name in files if repo_path(name) in RESERVED)
    if clashes:
        raise PublishError(
            f"{adapter}: {', '.join(clashes)} would overwrite a file sovtune publishes at the repository root; "
            "rename it"
        )
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            files[name] = run_dir / name
    # Never through a symbolic link: it could publish any file of this machine (export refuses them too).
    links = sorted(
        {name for name in files if run_file_kind(run_dir, name) != "file"}
        | set(unrecorded_adapter_files(run_dir, set(files))[1])
    )
    if links:
        raise PublishError(
            f"{run_dir}: {', '.join(links)}: symbolic links are not published; replace them with the files"
        )
    if MANIFEST not in files:
        raise PublishError(
            f"{run_dir / MANIFEST}: missing; a published adapter carries its manifest so `sovtune pull` can verify it "
            "(runs written by `sovtune train` have one)"
        )
    return files


def pickle_files(files: dict[str, Path]) -> list[str]:
    return sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))


def refuse_pickles(files: dict[str, Path], run_dir: Path) -> None:
    """Whoever loads a pickle runs whatever it holds: never published, whatever the manifest records."""
    pickles = pickle_files(files)
    if pickles:
        raise PublishError(
            f"{run_dir}: {', '.join(pickles)}: pickle weights are never published (loading a pickle can run code); "
            f"publish {ADAPTER_WEIGHTS}, as `sovtune train` saves it, and remove the pickle"
        )


def repo_path(run_path: str) -> str:
    """Where a run file lives in the repository: adapter files at the root, run files beside them."""
    return run_path.removeprefix(f"{RunDir.ADAPTER}/")


def check_against_manifest(manifest: dict[str, Any], present: dict[str, Path], where: str) -> list[str]:
    """Compare run files (run-relative path -> file) with the manifest's SHA-256; PublishError names every
    difference.

    Every adapter file the manifest records must be present and match; adapter files it does not record are refused
    too (something was added after training). Other recorded files that are present (report.json) must match.
    """
    expected = {path: digest for (root, path), digest in recorded_files(manifest).items() if root == RUN_ROOT}
    adapter_expected = sorted(
        path for path in expected if path.startswith(f"{RunDir.ADAPTER}/") and path not in NOT_PUBLISHED
    )
    if not adapter_expected:
        raise PublishError(
            f"{where}: manifest.json records no adapter files (training did not finish?); nothing to verify against"
        )
    changed, missing, checked = [], [], []
    for path in adapter_expected + sorted(p for p in present if p in expected and not p.startswith("adapter/")):
        if path not in present:
            missing.append(path)
        elif sha256_file(present[path]) != expected[path]:
            changed.append(path)
        else:
            checked.append(path)
    unlisted = sorted(p for p in present if p.startswith("adapter/") and p not in expected and p not in NOT_PUBLISHED)
    problems = [
        f"{label}: {', '.join(paths)}"
        for label, paths in (
            ("hash mismatch", changed),
            ("missing", missing),
            ("not in the manifest", unlisted),
        )
        if paths
    ]
    if problems:
        raise PublishError(f"{where}: files do not match manifest.json ({'; '.join(problems)})")
    return checked


def build(
    run_dir: Path, repo_id: str, revision: str = "main", include_examples: bool = False, signed: bool = False
) -> Publication:
    """The publication of `run_dir` as `repo_id` at `revision` (the card names both). Checks the run's files against
    its manifest first, and refuses bytes that would still carry a local path of this machine."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    sources = publish_files(run_dir)
    manifest = run.manifest()
    check_against_manifest(manifest, sources, str(run_dir))
    refuse_pickles(sources, run_dir)
    recipe = run.recipe_data() if (run / RunDir.RECIPE).is_file() else {}
    try:
        check_run_documents(run_dir, recipe, manifest, run.report())
    except RunFileError as exc:
        raise PublishError(str(exc)) from None
    base_name = public_base_name(base_model_facts(recipe, manifest))
    files: dict[str, PublishedFile] = {}
    withheld: list[str] = []
    for run_path, source in sources.items():
        path = repo_path(run_path)
        derived = _public_form(run_path, source, base_name, include_examples)
        if derived is None:
            files[path] = PublishedFile(
                path=path, sha256=sha256_file(source), size=source.stat().st_size, run_path=run_path, source=source
            )
            continue
        data, changes = derived
        files[path] = _made(path, data, run_path=run_path, derived_from=sha256_file(source), changes=tuple(changes))
        withheld += [change for change in changes if change.startswith("withheld")]
    try:
        card = str(build_card(run_dir, repo_id, revision=revision)).encode("utf-8")
    except RunFileError as exc:
        raise PublishError(str(exc)) from None
    files[CARD] = _made(CARD, card)
    signature = SIGNATURE if signed else None
    listing = {
        "kind": KIND,
        "version": VERSION,
        "run": (manifest.get("run") or {}).get("name") or run_dir.name,
        "repo": repo_id,
        "revision": revision,
        "signature": signature,
        "files": [files[path].entry() for path in sorted(files)],
    }
    files[PUBLISH_MANIFEST] = _made(PUBLISH_MANIFEST, _json_bytes(listing))
    publication = Publication(run_dir, files, signature, withheld)
    _refuse_local_paths(publication)
    return publication


def sign_run(
    run_dir: Path, key: Path, repo_id: str, revision: str = "main", include_examples: bool = False
) -> Publication:
    """`sovtune sign`: sign what a push of `run_dir` as `repo_id` publishes; the signature goes to RUN_DIR/model.sig,
    where `sovtune push` picks it up."""
    publication = build(run_dir, repo_id, revision, include_examples, signed=True)
    signature = sign(publication, key)
    atomic_write_bytes(Path(run_dir) / SIGNATURE, signature)
    return publication


def sign(publication: Publication, key: Path) -> bytes:
    """A signature over exactly the publication's files, as they will lie in a pulled folder."""
    with publication.staged() as folder:
        return sign_folder(folder, key)


def signature_holds(publication: Publication, signature: bytes, key: Path) -> bool:
    """Whether `signature` is a valid signature by `key` (its public half) over exactly the publication's files."""
    with publication.staged() as folder:
        (folder / SIGNATURE).write_bytes(signature)
        return verifies_with_private_key(folder, key)


def check_signature_covers(publication: Publication, signature: bytes, where: str) -> None:
    """A signature made earlier (`sovtune sign`) must cover exactly what is about to be published."""
    signed = signed_digests(signature, where)
    expected = publication.digests()
    changed = sorted(path for path in expected if path in signed and signed[path] != expected[path])
    unsigned = sorted(set(expected) - set(signed))
    extra = sorted(set(signed) - set(expected))
    problems = [
        f"{label}: {', '.join(paths)}"
        for label, paths in (("changed", changed), ("not signed", unsigned), ("signed but not published", extra))
        if paths
    ]
    if problems:
        raise PublishError(
            f"{where} does not cover what this push publishes ({'; '.join(problems)}); the run, the repository or "
            "the revision changed since it was signed: sign again (`sovtune sign`) or push with --sign-key KEY.pem"
        )


# ---------------------------------------------------------------------------------------------------------------
# Public forms: no held-out examples, no local paths


def _public_form(run_path: str, source: Path, base_name: str, include_examples: bool) -> tuple[bytes, list[str]] | None:
    """The bytes to publish instead of the run's file, with what was changed; None: publish the file as it is."""
    name = PurePosixPath(run_path).name
    if run_path == REPORT:
        return _public_json(source, lambda value: _public_report(value, base_name, include_examples))
    if run_path == MANIFEST:
        return _public_json(source, _public_manifest)
    if run_path == f"{RunDir.ADAPTER}/{RunDir.ADAPTER_CONFIG}":
        return _public_json(source, lambda value: _public_adapter_config(value, base_name))
    if name.endswith(".json") and name not in UNSCANNED_NAMES:
        return _public_json(source, lambda value: [])
    return None


def _public_json(source: Path, transform: Any) -> tuple[bytes, list[str]] | None:
    try:
        original = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # not JSON: published as it is, and still checked for local paths
    value = json.loads(json.dumps(original))
    changes = transform(value)
    value, reduced = _reduce_paths(value)
    if reduced:
        changes.append(f"local paths reduced to their last part: {reduced}")
    if value == original:
        return None
    return _json_bytes(value), changes


def _public_report(report: dict[str, Any], base_name: str, include_examples: bool) -> list[str]:
    changes = []
    samples = report.get("samples") or []
    if samples and not include_examples:
        report["samples"] = []
        changes.append(
            f"withheld: {len(samples)} example generation{'s' if len(samples) != 1 else ''} (held-out prompts, "
            "references and predictions); "
            "push --include-examples (or hub.include_examples: true) publishes them"
        )
    frequent = [
        outputs["most_frequent"]
        for outputs in (report.get("outputs") or {}).values()
        if isinstance(outputs, dict) and isinstance(outputs.get("most_frequent"), dict)
    ]
    withheld_texts = [entry for entry in frequent if entry.get("text") is not None]
    if withheld_texts and not include_examples:
        for entry in withheld_texts:
            entry["text"] = None  # its count stays: how often the tuned model gave one answer
        changes.append(
            f"withheld: the most frequent answer of {len(withheld_texts)} dataset"
            f"{'s' if len(withheld_texts) != 1 else ''} (a prediction on held-out data; its count stays)"
        )
    base = report.get("base_model")
    if isinstance(base, dict) and base.get("name_or_path") != base_name:
        base["name_or_path"] = base_name
        changes.append("base_model.name_or_path: the base model's public name")
    if isinstance(report.get("adapter"), str) and report["adapter"] != RunDir.ADAPTER:
        report["adapter"] = RunDir.ADAPTER
        changes.append("adapter: the adapter folder's name")
    return changes


def _public_manifest(manifest: dict[str, Any]) -> list[str]:
    external = 0

    def walk(node: Any) -> None:
        nonlocal external
        if isinstance(node, dict):
            if {"path", "root", "sha256"} <= node.keys() and node["root"] != RUN_ROOT:
                node["path"], node["root"] = _last_part(str(node["path"])), EXTERNAL_ROOT
                external += 1
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    changes = [f"files outside the run recorded by name only ({EXTERNAL_ROOT}): {external}"] if external else []
    git = (manifest.get("recipe") or {}).get("git")
    if isinstance(git, dict) and git.get("repository"):
        git["repository"] = None
        changes.append("recipe.git.repository: left out")
    return changes


def _public_adapter_config(config: dict[str, Any], base_name: str) -> list[str]:
    if config.get("base_model_name_or_path") in (None, base_name):
        return []
    config["base_model_name_or_path"] = base_name
    return ["base_model_name_or_path: the base model's hub id or declared name"]


# A whole value that is a path: starts at the root, the home folder or a drive, and holds no pattern characters.
_ABSOLUTE = re.compile(r"^(?:~|[A-Za-z]:)?[/\\][^\n*?^$|()\[\]{}]*$")
# A path inside a sentence ("/home/me/data/eval.jsonl:12: ..."): at least two parts, after a space, quote or bracket.
_EMBEDDED = re.compile(r"(?:^|(?<=[\s\"'(=,\[]))(?:~|[A-Za-z]:)?[/\\](?:[^\s\"'/\\:*?<>|]+[/\\])+[^\s\"'/\\:*?<>|]*")


def _last_part(path: str) -> str:
    return re.split(r"[/\\]", path.rstrip("/\\"))[-1]


def _reduce_paths(value: Any) -> tuple[Any, int]:
    count = 0

    def reduce(text: str) -> str:
        nonlocal count
        if len(text) > 1 and _ABSOLUTE.match(text):
            count += 1
            return _last_part(text)

        def one(match: re.Match[str]) -> str:
            nonlocal count
            count += 1
            return _last_part(match.group(0))

        return _EMBEDDED.sub(one, text)

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return reduce(node)
        if isinstance(node, dict):
            return {key: walk(item) for key, item in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(value), count


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def private_markers(run_dir: Path) -> list[str]:
    """Paths of this machine no published byte may hold: the home folder, the working directory, the run directory
    and the recipe's folder (the last three only when they are at least two levels deep, e.g. /work/project)."""
    home = os.path.expanduser("~")
    folders = [Path.cwd(), Path(run_dir).resolve()]
    recipe = RunDir(run_dir) / RunDir.RECIPE
    if recipe.is_file():
        source = RunDir(run_dir).recipe_data().get("source_path")
        if isinstance(source, str) and source:
            folders.append(Path(source).parent)
    markers = [home] if home not in ("", "/", "~") else []
    markers += [str(folder) for folder in folders if len(folder.parts) > 2]
    return sorted(set(markers), key=len, reverse=True)


def _refuse_local_paths(publication: Publication) -> None:
    markers = [marker.encode("utf-8") for marker in private_markers(publication.run_dir)]
    for path in publication.paths:
        name = PurePosixPath(path).name
        if name in UNSCANNED_NAMES or name.endswith(UNSCANNED_SUFFIXES):
            continue
        data = publication.files[path].read_bytes()
        found = next((marker for marker in markers if marker in data), None)
        if found is not None:
            raise PublishError(
                f"{path} would publish the local path {found.decode()!r} of this machine; nothing was sent. "
                f"Remove it from {publication.files[path].run_path or path} in the run, or report it as a sovtune bug"
            )


# ---------------------------------------------------------------------------------------------------------------
# A published (pulled) folder


def read_publish_manifest(data: bytes, where: str) -> dict[str, Any]:
    """publish_manifest.json checked for shape: every path relative, inside the folder, listed once."""
    try:
        listing = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"{where}: {PUBLISH_MANIFEST} is not valid JSON ({exc}); it was damaged") from None
    if not isinstance(listing, dict) or listing.get("kind") != KIND or not isinstance(listing.get("files"), list):
        raise PublishError(f"{where}: {PUBLISH_MANIFEST} is not a sovtune publish manifest")
    if listing.get("version") != VERSION:
        raise PublishError(
            f"{where}: {PUBLISH_MANIFEST} version {listing.get('version')} is not {VERSION} (this sovtune); "
            "use the sovtune version that published it"
        )
    seen = set()
    for entry in listing["files"]:
        path = entry.get("path") if isinstance(entry, dict) else None
        if not (isinstance(path, str) and _safe_path(path) and isinstance(entry.get("sha256"), str)) or path in seen:
            raise PublishError(f"{where}: {PUBLISH_MANIFEST} lists an invalid or repeated entry {entry!r}")
        seen.add(path)
    signature = listing.get("signature")
    if signature not in (None, SIGNATURE) or PUBLISH_MANIFEST in seen or SIGNATURE in seen:
        raise PublishError(f"{where}: {PUBLISH_MANIFEST} names files it may not list; it was not written by sovtune")
    return listing


def listed_paths(listing: dict[str, Any]) -> set[str]:
    """Every file a published folder holds: the listed ones, the publish manifest, the signature if signed."""
    signature = {listing["signature"]} if listing.get("signature") else set()
    return {entry["path"] for entry in listing["files"]} | {PUBLISH_MANIFEST} | signature


def _safe_path(path: str) -> bool:
    parts = path.split("/")
    return (
        bool(path) and "\\" not in path and not any(part in ("", ".", "..") or part.startswith(".") for part in parts)
    )


def is_published_folder(folder: Path) -> bool:
    return (Path(folder) / PUBLISH_MANIFEST).is_file()


def verify_published(folder: Path, trust: Path | None = None, where: str | None = None) -> VerifyResult:
    """Every listed file present and unchanged, nothing else in the folder, and every published run file the one the
    run's manifest recorded (derived copies: made from the recorded file). Recorded files that were not published
    are absent by design. With `trust`, the signature must verify with that public key."""
    folder = Path(folder)
    where = where or str(folder)
    result = VerifyResult(target=where, unexpected_label=f"not listed in {PUBLISH_MANIFEST}")
    listing = read_publish_manifest((folder / PUBLISH_MANIFEST).read_bytes(), where)
    entries = {entry["path"]: entry for entry in listing["files"]}
    for path, entry in sorted(entries.items()):
        file = folder / path
        if file.is_symlink() or not file.is_file():
            result.missing.append(path)
        elif sha256_file(file) != entry["sha256"]:
            result.mismatched.append(path)
        else:
            result.checked.append(path)
    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file() or path.is_symlink()}
    result.unexpected = sorted(present - listed_paths(listing))
    if listing.get("signature") and listing["signature"] not in present:
        result.missing.append(listing["signature"])
    if MANIFEST in result.checked:
        _compare_with_run_manifest(folder, entries, result)
    result.signature = _signature_state(folder, listing, trust, result, where)
    return result


def _compare_with_run_manifest(folder: Path, entries: dict[str, dict[str, Any]], result: VerifyResult) -> None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        recorded = recorded_files(manifest if isinstance(manifest, dict) else {})
    except (UnicodeDecodeError, json.JSONDecodeError):
        result.mismatched.append(f"{MANIFEST} (not valid JSON)")
        return
    by_run_path = {entry["run_path"]: entry for entry in entries.values() if isinstance(entry.get("run_path"), str)}
    for (root, path), digest in sorted(recorded.items()):
        if root != RUN_ROOT:
            result.not_checked.append(path)
            continue
        entry = by_run_path.get(path)
        if entry is None:
            result.absent_by_design.append(path)
            continue
        origin = (entry.get("derived_from") or {}).get("sha256") or entry["sha256"]
        if origin != digest:
            result.mismatched.append(f"{entry['path']} (not the file {MANIFEST} records as {path})")
    for run_path, entry in sorted(by_run_path.items()):
        if run_path.startswith(f"{RunDir.ADAPTER}/") and (RUN_ROOT, run_path) not in recorded:
            result.unexpected.append(f"{entry['path']} (not recorded in {MANIFEST})")


def _signature_state(
    folder: Path, listing: dict[str, Any], trust: Path | None, result: VerifyResult, where: str
) -> str:
    signature = listing.get("signature")
    if trust is None:
        return f"signed ({signature}), signature not checked: pass --trust PUBKEY.pem" if signature else "not signed"
    if not signature:
        raise PublishError(
            f"{where}: not signed ({PUBLISH_MANIFEST} names no signature), but --trust {trust} requires a signature"
        )
    if not result.ok:
        return "signature not checked (the files do not match)"
    try:
        verify_folder(folder, trust, signature)
    except SigningError as exc:
        raise PublishError(f"{where}: {exc.reason}") from None
    return f"signature verified with {trust}"
