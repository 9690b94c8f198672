"""`sovtune export`: a run packed into one tar for air-gapped transfer, with a checksum list; and its verification.

The bundle is read member by member and never extracted, so a hostile archive cannot write anywhere.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from sovtune.core.files import atomic_writer
from sovtune.core.hashing import RUN_ROOT, sha256_bytes, sha256_file, sha256_stream
from sovtune.core.rundir import RunDir
from sovtune.errors import SovtuneError
from sovtune.publish.card import build_card
from sovtune.run.manifest import read_manifest, recorded_files
from sovtune.run.verify import CHECKSUMS, VerifyResult, checksums_text, parse_checksums, verify_run_dir

CARD = RunDir.CARD
MANIFEST = RunDir.MANIFEST
# Besides the adapter and the manifest: what a receiving site needs to judge and use the adapter.
RUN_FILES = (
    RunDir.RECIPE, CARD, RunDir.REPORT, RunDir.REPORT_MD, RunDir.REPORT_PNG, RunDir.DATA_STATS, RunDir.TRAIN_METRICS,
)  # fmt: skip


class BundleError(SovtuneError):
    """The run cannot be exported, or a bundle is malformed."""


def bundle_files(run_dir: Path) -> list[str]:
    """Run-relative paths to pack: adapter files, manifest, card, report, and every run file the manifest lists."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    adapter = RunDir(run_dir).adapter_dir
    if not (adapter / RunDir.ADAPTER_CONFIG).is_file():
        raise BundleError(f"{run_dir}: no adapter/adapter_config.json; train first (sovtune train) before exporting")
    names = {MANIFEST}
    names |= {
        p.relative_to(run_dir).as_posix() for p in adapter.rglob("*") if p.is_file() and not p.name.startswith(".")
    }
    names |= {name for name in RUN_FILES if (run_dir / name).is_file()}
    listed = {path for root, path in recorded_files(manifest) if root == RUN_ROOT}
    missing = sorted(path for path in listed if not (run_dir / path).is_file())
    if missing:
        raise BundleError(
            f"{run_dir}: files in the manifest are missing ({', '.join(missing)}); run `sovtune verify {run_dir}`"
        )
    return sorted(names | listed)


def export(run_dir: str | Path, bundle_path: str | Path) -> Path:
    """Write `bundle_path` (tar, optionally .tar.gz) atomically; every member sits under `<run name>/`.

    The run is verified first: a bundle of files that no longer match their manifest would carry a false record.
    """
    run_dir, bundle_path = Path(run_dir), Path(bundle_path)
    if not run_dir.is_dir():
        raise BundleError(f"{run_dir}: not a run directory; give the folder `sovtune train` wrote (runs/<name>)")
    names = bundle_files(run_dir)
    result = verify_run_dir(run_dir)
    if result.mismatched or result.missing:
        raise BundleError(f"refusing to export: {result.describe()}")
    top = read_manifest(run_dir)["run"]["name"]
    digests = {name: sha256_file(run_dir / name) for name in names}
    generated = {} if CARD in names else {CARD: model_card(run_dir, top).encode("utf-8")}
    digests.update({name: sha256_bytes(data) for name, data in generated.items()})
    mtime = int((run_dir / MANIFEST).stat().st_mtime)
    mode = "w:gz" if bundle_path.name.endswith((".tar.gz", ".tgz")) else "w"
    bundle_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(bundle_path) as raw:
        with tarfile.open(fileobj=raw, mode=mode, format=tarfile.PAX_FORMAT) as tar:
            listing = checksums_text(digests).encode()
            tar.addfile(_member(f"{top}/{CHECKSUMS}", len(listing), mtime), io.BytesIO(listing))
            for name, data in generated.items():
                tar.addfile(_member(f"{top}/{name}", len(data), mtime), io.BytesIO(data))
            for name in names:
                with open(run_dir / name, "rb") as handle:
                    tar.addfile(_member(f"{top}/{name}", (run_dir / name).stat().st_size, mtime), handle)
        raw.flush()
        # The files may have changed while they were packed: what went in must match the checksums written.
        verify_bundle(Path(raw.name), expect_ok=True)
    return bundle_path


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


def verify_bundle(bundle_path: str | Path, expect_ok: bool = False) -> VerifyResult:
    """Hash every member; compare with SHA256SUMS and with the manifest inside. External files are not in a bundle."""
    bundle_path = Path(bundle_path)
    result = VerifyResult(target=str(bundle_path))
    actual: dict[str, str] = {}
    checksums: dict[str, str] | None = None
    manifest: dict | None = None
    try:
        with tarfile.open(bundle_path, mode="r:*") as tar:
            for member in tar:
                name = _member_name(member, bundle_path)
                if name is None:
                    continue
                handle = tar.extractfile(member)
                if name == CHECKSUMS:
                    checksums = parse_checksums(handle.read().decode("utf-8"))
                    continue
                if name == MANIFEST:
                    data = handle.read()
                    manifest = json.loads(data.decode("utf-8"))
                    actual[name] = sha256_bytes(data)
                    continue
                actual[name] = sha256_stream(handle)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(
            f"{bundle_path}: not a readable tar bundle ({exc}); export it again with `sovtune export`"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError(
            f"{bundle_path}: {MANIFEST} inside the bundle is not valid JSON; the bundle was damaged"
        ) from None
    if checksums is None or manifest is None:
        raise BundleError(f"{bundle_path}: no {CHECKSUMS} or {MANIFEST} inside; it was not written by `sovtune export`")
    expected = dict(checksums)
    for (root, path), digest in recorded_files(manifest).items():
        if root != RUN_ROOT:
            result.not_checked.append(path)
        elif path in expected and expected[path] != digest:
            result.mismatched.append(f"{path} (manifest and {CHECKSUMS} disagree)")
        else:
            expected.setdefault(path, digest)
    for path, digest in sorted(expected.items()):
        if path not in actual:
            result.missing.append(path)
        else:
            result.checked.append(path)
            if actual[path] != digest:
                result.mismatched.append(path)
    result.unexpected = sorted(set(actual) - set(expected))
    if expect_ok and not result.ok:
        raise BundleError(f"bundle check after writing failed: {result.describe()}; the run changed while exporting")
    return result


def _member_name(member: tarfile.TarInfo, bundle_path: Path) -> str | None:
    """The member's path below the top folder; links, devices and escaping paths make the bundle invalid."""
    if member.isdir():
        return None
    parts = Path(member.name).parts
    if not member.isfile() or member.name.startswith("/") or ".." in parts or len(parts) < 2:
        raise BundleError(f"{bundle_path}: unexpected member {member.name!r} (not a plain file under the run folder)")
    return Path(*parts[1:]).as_posix()
