"""`sovtune verify` of a run directory: every hash the manifest records, recomputed; and the checksum list format
an exported bundle carries.

A run folder may come from elsewhere, so verification never follows a symbolic link inside it and accepts no file
the manifest does not record (in adapter/, the folder that gets loaded). Hard links are regular files: their bytes
are what is hashed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from sovtune.core.hashing import RUN_ROOT, sha256_file
from sovtune.core.rundir import ManifestError, RunDir, read_run_file
from sovtune.errors import SovtuneError
from sovtune.run.manifest import recorded_files

CHECKSUMS = RunDir.CHECKSUMS


class VerifyFailed(SovtuneError):
    """A recorded hash no longer matches the file: the run or bundle was changed after it was written."""


@dataclass
class VerifyResult:
    target: str
    checked: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # present, but not the bytes that were recorded
    missing: list[str] = field(default_factory=list)  # recorded, but not present
    unexpected: list[str] = field(default_factory=list)  # present, but not recorded (manifest, publish manifest)
    links: list[str] = field(default_factory=list)  # symbolic links and other non-regular files: never followed
    not_checked: list[str] = field(default_factory=list)  # outside the run (data, base model) and not present here
    absent_by_design: list[str] = field(default_factory=list)  # recorded by the run, left out when it was published
    unexpected_label: str = "not recorded in the manifest"
    signature: str | None = None  # a published folder's signature state

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected or self.links)

    def problems(self) -> str:
        """What is wrong, changed and missing files named apart; empty when nothing is."""
        parts = [
            f"{label}: {', '.join(paths)}{note}"
            for label, paths, note in (
                ("hash mismatch", self.mismatched, " (changed after they were recorded)"),
                ("missing", self.missing, " (recorded, not present)"),
                (
                    self.unexpected_label,
                    self.unexpected,
                    " (the files changed after they were recorded: remove these or restore the original)",
                ),
                ("not a regular file (links are not followed)", self.links, ""),
            )
            if paths
        ]
        return "; ".join(parts)

    def describe(self) -> str:
        if self.problems():
            return f"{self.target}: {self.problems()} ({len(self.checked)} files checked)"
        notes = [f"{len(self.checked)} files match their recorded SHA-256"]
        if self.absent_by_design:
            notes.append(f"not published, absent by design: {', '.join(self.absent_by_design)}")
        if self.not_checked:
            notes.append(f"{len(self.not_checked)} external files not present here, not checked")
        if self.signature:
            notes.append(self.signature)
        return f"{self.target}: {'; '.join(notes)}"


def run_file_kind(run_dir: Path, relative: str) -> str:
    """What a path inside the run is: file, missing, or link (a symbolic link on the way, or not a regular file)."""
    current = Path(run_dir)
    for part in Path(relative).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return "missing"
        except OSError:
            return "link"  # e.g. a file where a folder was expected
        if stat.S_ISLNK(mode):
            return "link"
    return "file" if stat.S_ISREG(mode) else "link"


def unrecorded_adapter_files(run_dir: Path, recorded: set[str]) -> tuple[list[str], list[str]]:
    """(files in adapter/ the manifest does not record, links and other non-regular entries there), run-relative.

    Hidden names are left out, as when the adapter files are recorded; links are listed, never followed.
    """
    run_dir = Path(run_dir)
    adapter = RunDir(run_dir).adapter_dir
    unrecorded: list[str] = []
    links: list[str] = []
    if not adapter.is_dir() or adapter.is_symlink():
        return unrecorded, links
    for folder, dirs, files in os.walk(adapter):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in [*dirs, *sorted(files)]:
            path = Path(folder) / name
            relative = path.relative_to(run_dir).as_posix()
            if name.startswith(".") or relative in recorded:
                continue
            if path.is_symlink():
                links.append(relative)
                dirs[:] = [d for d in dirs if d != name]
            elif name in files:
                (unrecorded if stat.S_ISREG(os.lstat(path).st_mode) else links).append(relative)
    return unrecorded, links


def verify_run_dir(run_dir: Path, strict: bool = False, external: bool = True) -> VerifyResult:
    """Recompute the hashes the manifest records. `external`: also the files outside the run (data, a local base
    model), checked where they exist (`strict`: missing ones fail too)."""
    run_dir = Path(run_dir)
    manifest = RunDir(run_dir).manifest()
    result = VerifyResult(target=str(run_dir))
    expected = recorded_files(manifest)
    if os.path.lexists(run_dir / CHECKSUMS):
        _check_checksum_list(run_dir, expected, result)
    for (root, shown), digest in sorted(expected.items()):
        if root == RUN_ROOT:
            kind = run_file_kind(run_dir, shown)
            if kind != "file":
                (result.missing if kind == "missing" else result.links).append(shown)
                continue
            path = run_dir / shown
        else:
            if not external:
                continue
            path = Path(shown)
            if path.resolve().parts[1:2] in (("proc",), ("sys",), ("dev",)):  # no run records these; some never end
                result.mismatched.append(f"{shown} (a system file, not read)")
                continue
            if not path.is_file():
                (result.missing if strict else result.not_checked).append(shown)
                continue
        result.checked.append(shown)
        if sha256_file(path) != digest:
            result.mismatched.append(shown)
    unrecorded, links = unrecorded_adapter_files(run_dir, {path for root, path in expected if root == RUN_ROOT})
    result.unexpected += unrecorded
    result.links += links
    return result


def _check_checksum_list(run_dir: Path, expected: dict[tuple[str, str], str], result: VerifyResult) -> None:
    """An unpacked bundle: its checksum list must agree with the manifest and name nothing the manifest does not
    record, but the model card (README.md), which export writes beside the run's files."""
    try:
        text = read_run_file(run_dir / CHECKSUMS)
    except UnicodeDecodeError:
        raise VerifyFailed(f"{run_dir / CHECKSUMS}: not UTF-8 text; the checksum file is damaged") from None
    for path, digest in parse_checksums(text).items():
        if (RUN_ROOT, path) in expected:
            if expected[(RUN_ROOT, path)] != digest:
                result.mismatched.append(f"{path} (manifest and {CHECKSUMS} disagree)")
        elif path in (RunDir.CARD, RunDir.MANIFEST):
            expected[(RUN_ROOT, path)] = digest
        else:
            result.unexpected.append(path)


def verify_before_loading(run_dir: Path, manifest_required: bool = True) -> VerifyResult | None:
    """What merge, generate, chat and eval do before loading anything from a run folder (as push and export do):
    the run's own files must match its manifest. Files outside the run (data, base model) are not hashed here.

    Without `manifest_required`, a folder with no manifest (an adapter saved by other tools) is not checked.
    """
    run_dir = Path(run_dir)
    if not manifest_required and not os.path.lexists(RunDir(run_dir) / RunDir.MANIFEST):
        return None
    try:
        result = verify_run_dir(run_dir, external=False)
    except ManifestError as exc:
        raise VerifyFailed(f"{exc}, or pass --no-verify to load the run unverified") from None
    if not result.ok:
        raise VerifyFailed(
            f"{result.describe()}; the run changed after it was recorded: restore it, or pass --no-verify to load "
            "it anyway"
        )
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
        if path in entries:
            raise VerifyFailed(f"{CHECKSUMS}:{number}: {path!r} is listed twice; the checksum file is damaged")
        entries[path] = digest
    return entries
