"""`sovtune export`: a run packed into one tar for air-gapped transfer, with a checksum list; and its verification.

The bundle is read member by member and never extracted, so a hostile archive cannot write anywhere. Export packs
exactly what the manifest records (and the model card), never through a symbolic link; verification accepts no
member the manifest does not record.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from sovtune.core.files import atomic_writer, check_output_place
from sovtune.core.hashing import RUN_ROOT, sha256_bytes, sha256_stream
from sovtune.core.rundir import RunDir
from sovtune.errors import SovtuneError
from sovtune.publish.card import build_card
from sovtune.run.manifest import read_manifest, recorded_files
from sovtune.run.verify import CHECKSUMS, VerifyResult, checksums_text, parse_checksums, verify_run_dir

CARD = RunDir.CARD
MANIFEST = RunDir.MANIFEST
# The bundle's top folder is the run's name: a plain name, so no member can land outside it when unpacked by tar.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class BundleError(SovtuneError):
    """The run cannot be exported, or a bundle is malformed."""


def bundle_files(run_dir: Path) -> list[str]:
    """Run-relative paths to pack: the manifest and every run file it records (adapter, recipe, metrics, report),
    plus the model card when the run has one (a pulled run does)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if not (RunDir(run_dir).adapter_dir / RunDir.ADAPTER_CONFIG).is_file():
        raise BundleError(f"{run_dir}: no adapter/adapter_config.json; train first (sovtune train) before exporting")
    listed = {path for root, path in recorded_files(manifest) if root == RUN_ROOT}
    card = {CARD} if (run_dir / CARD).is_file() and not (run_dir / CARD).is_symlink() else set()
    return sorted(listed | card | {MANIFEST})


def export(run_dir: str | Path, bundle_path: str | Path) -> Path:
    """Write `bundle_path` (tar, optionally .tar.gz) atomically; every member sits under `<run name>/`.

    The run is verified first: a bundle of files that no longer match their manifest, or of files it does not
    record, would carry a false record. Files are read without following symbolic links.
    """
    run_dir, bundle_path = Path(run_dir), Path(bundle_path)
    if not run_dir.is_dir():
        raise BundleError(f"{run_dir}: not a run directory; give the folder `sovtune train` wrote (runs/<name>)")
    _check_replaceable(bundle_path)
    names = bundle_files(run_dir)
    result = verify_run_dir(run_dir)
    if result.mismatched or result.missing or result.unexpected or result.links:
        raise BundleError(f"refusing to export: {result.describe()}")
    top = _run_name(read_manifest(run_dir), run_dir)
    digests = {name: _hash_in_run(run_dir, name) for name in names}
    generated = {} if CARD in names else {CARD: model_card(run_dir, top).encode("utf-8")}
    digests.update({name: sha256_bytes(data) for name, data in generated.items()})
    mtime = int(os.lstat(run_dir / MANIFEST).st_mtime)
    mode = "w:gz" if bundle_path.name.endswith((".tar.gz", ".tgz")) else "w"
    try:
        bundle_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(bundle_path) as raw:
            with tarfile.open(fileobj=raw, mode=mode, format=tarfile.PAX_FORMAT) as tar:
                listing = checksums_text(digests).encode()
                tar.addfile(_member(f"{top}/{CHECKSUMS}", len(listing), mtime), io.BytesIO(listing))
                for name, data in generated.items():
                    tar.addfile(_member(f"{top}/{name}", len(data), mtime), io.BytesIO(data))
                for name in names:
                    with _open_in_run(run_dir, name) as handle:
                        size = os.fstat(handle.fileno()).st_size
                        tar.addfile(_member(f"{top}/{name}", size, mtime), handle)
            raw.flush()
            # The files may have changed while they were packed: what went in must match the checksums written.
            verify_bundle(Path(raw.name), expect_ok=True)
    except OSError as exc:
        raise BundleError(
            f"{bundle_path}: cannot write the bundle ({exc.strerror or exc}: {exc.filename or bundle_path}); "
            "choose a writable place for it with free space"
        ) from None
    return bundle_path


def _run_name(manifest: dict[str, Any], run_dir: Path) -> str:
    name = (manifest.get("run") or {}).get("name") if isinstance(manifest.get("run"), dict) else None
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise BundleError(
            f"{run_dir / MANIFEST}: run.name {str(name)[:80]!r} is not a plain run name (letters, digits, . _ -); "
            "restore the manifest"
        )
    return name


def _open_in_run(run_dir: Path, name: str) -> BinaryIO:
    """A run file opened without following a symbolic link at the last step (verify_run_dir refused links on the
    way), so a link swapped in after the check is refused, not packed."""
    try:
        return os.fdopen(os.open(run_dir / name, os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except OSError as exc:
        raise BundleError(
            f"{run_dir / name}: cannot be read as a regular file ({exc.strerror}); not exported"
        ) from None


def _hash_in_run(run_dir: Path, name: str) -> str:
    with _open_in_run(run_dir, name) as handle:
        return sha256_stream(handle)


def _check_replaceable(bundle_path: Path) -> None:
    """The bundle file is replaced only when it is an earlier bundle; a folder, a link or any other file stays."""
    if bundle_path.is_symlink():
        raise BundleError(f"{bundle_path}: is a symbolic link; sovtune never writes through one; give a new file name")
    if bundle_path.is_dir():
        raise BundleError(f"{bundle_path}: is a folder; give the bundle's file name, e.g. {bundle_path / 'run.tar'}")
    check_output_place(bundle_path, "the bundle")
    if bundle_path.exists() and not _is_bundle(bundle_path):
        raise BundleError(
            f"{bundle_path}: exists and is not a bundle from `sovtune export`, so it is not replaced; "
            "give a new file name"
        )


def _is_bundle(path: Path) -> bool:
    """A tar whose first member is `<run>/SHA256SUMS`, as `export` writes it."""
    try:
        with tarfile.open(path, mode="r:*") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError):
        return False
    return first is not None and first.isfile() and Path(first.name).name == CHECKSUMS


def model_card(run_dir: Path, run_name: str) -> str:
    """The same card `sovtune push` publishes (eval results, provenance), named after hub.repo when the recipe has
    one."""
    repo_id = (RunDir(run_dir).recipe_data().get("hub") or {}).get("repo") or run_name
    return str(build_card(run_dir, repo_id))


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    # Fixed owner and mode so the same run always packs to the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, mtime, 0o644, 0, 0, "", ""
    return info


# The manifest and the checksum list are read into memory: far more than any run records, far less than a machine has.
MAX_RECORD_BYTES = 64 << 20


def verify_bundle(bundle_path: str | Path, expect_ok: bool = False) -> VerifyResult:
    """Hash every member; compare with SHA256SUMS and with the manifest inside. External files are not in a bundle.

    Accepted members: the manifest, the files it records, the checksum list and the model card; anything else, a
    link, a second member of the same name or a path outside the top folder fails."""
    bundle_path = Path(bundle_path)
    result = VerifyResult(target=str(bundle_path))
    actual: dict[str, str] = {}
    checksums: dict[str, str] | None = None
    manifest_data: bytes | None = None
    tops: set[str] = set()
    try:
        with tarfile.open(bundle_path, mode="r:*") as tar:
            for member in tar:
                name = _member_name(member, bundle_path, tops)
                if name is None:
                    continue
                if name in actual or (name == CHECKSUMS and checksums is not None):
                    raise BundleError(f"{bundle_path}: member {member.name!r} appears twice; the bundle was altered")
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file (checked by _member_name)
                if name in (CHECKSUMS, MANIFEST) and member.size > MAX_RECORD_BYTES:
                    raise BundleError(f"{bundle_path}: {name} is {member.size} bytes, not one `sovtune export` wrote")
                if name == CHECKSUMS:
                    checksums = parse_checksums(_utf8(handle.read(), name, bundle_path))
                elif name == MANIFEST:
                    manifest_data = handle.read()
                    actual[name] = sha256_bytes(manifest_data)
                else:
                    actual[name] = sha256_stream(handle)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(
            f"{bundle_path}: not a readable tar bundle ({exc}); export it again with `sovtune export`"
        ) from None
    if checksums is None or manifest_data is None:
        raise BundleError(f"{bundle_path}: no {CHECKSUMS} or {MANIFEST} inside; it was not written by `sovtune export`")
    recorded = _bundle_manifest(manifest_data, bundle_path)
    expected: dict[str, str] = {}
    for (root, path), digest in recorded.items():
        if root != RUN_ROOT:
            result.not_checked.append(path)
            continue
        expected[path] = digest
        if path in checksums and checksums[path] != digest:
            result.mismatched.append(f"{path} (manifest and {CHECKSUMS} disagree)")
    for path, digest in checksums.items():
        if path in (CARD, MANIFEST):  # the card is written by export; the manifest is the record itself
            expected.setdefault(path, digest)
        elif path not in expected:
            result.unexpected.append(path)
    for path, digest in sorted(expected.items()):
        if path not in actual:
            result.missing.append(path)
        else:
            result.checked.append(path)
            if actual[path] != digest:
                result.mismatched.append(path)
    result.unexpected = sorted(set(result.unexpected) | (set(actual) - set(expected) - {MANIFEST}))
    if expect_ok and not result.ok:
        raise BundleError(f"bundle check after writing failed: {result.describe()}; the run changed while exporting")
    return result


def _utf8(data: bytes, name: str, bundle_path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(
            f"{bundle_path}: {name} inside the bundle is not UTF-8 text; the bundle was damaged"
        ) from None


def _bundle_manifest(data: bytes, bundle_path: Path) -> dict[tuple[str, str], str]:
    """The file entries of the manifest inside a bundle; any damage is one BundleError naming the bundle."""
    try:
        return recorded_files(json.loads(_utf8(data, MANIFEST, bundle_path)))
    except (ValueError, RecursionError):  # ValueError: bad JSON or an integer of 5,000 digits
        raise BundleError(
            f"{bundle_path}: {MANIFEST} inside the bundle is not valid JSON (or nested absurdly deep); the bundle was "
            "damaged"
        ) from None
    except SovtuneError as exc:  # ManifestError: not an object, or a malformed entry
        raise BundleError(f"{bundle_path}: {exc}") from None


def _member_name(member: tarfile.TarInfo, bundle_path: Path, tops: set[str]) -> str | None:
    """The member's path below the top folder; links, devices, escaping paths and a second top folder make the
    bundle invalid."""
    if member.isdir():
        return None
    parts = Path(member.name).parts
    if not member.isfile() or member.name.startswith("/") or ".." in parts or len(parts) < 2:
        raise BundleError(f"{bundle_path}: unexpected member {member.name!r} (not a plain file under the run folder)")
    tops.add(parts[0])
    if len(tops) > 1:
        raise BundleError(
            f"{bundle_path}: members under more than one top folder ({', '.join(sorted(tops))}); a bundle "
            "one `sovtune export` writes has one"
        )
    return Path(*parts[1:]).as_posix()
