"""`sovtune verify` of a run directory: every hash the manifest records, recomputed; and the checksum list format
an exported bundle carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sovtune.core.hashing import RUN_ROOT, sha256_file
from sovtune.core.rundir import RunDir
from sovtune.errors import SovtuneError
from sovtune.run.manifest import recorded_files

CHECKSUMS = RunDir.CHECKSUMS


class VerifyFailed(SovtuneError):
    """A recorded hash no longer matches the file: the run or bundle was changed after it was written."""


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


def verify_run_dir(run_dir: Path, strict: bool = False) -> VerifyResult:
    run_dir = Path(run_dir)
    manifest = RunDir(run_dir).manifest()
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
