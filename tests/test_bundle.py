"""`sovtune export` / `sovtune verify BUNDLE`: round trip, tamper detection, atomic writes, hostile archives."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from helpers import invoke, make_run
from sovtune import pipeline
from sovtune.publish import bundle
from sovtune.run import verify as verification


@pytest.fixture
def run(make_recipe):
    return make_run(make_recipe("bund"))


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def rewrite(source: Path, target: Path, change) -> None:
    """Copy a bundle member by member, letting `change(name, data)` return new bytes (or None to drop)."""
    with tarfile.open(target, "w") as out:
        for name, data in members(source).items():
            new = change(name, data)
            if new is not None:
                info = tarfile.TarInfo(name)
                info.size = len(new)
                out.addfile(info, io.BytesIO(new))


def test_export_verify_round_trip(run, tmp_path: Path) -> None:
    path = tmp_path / "out" / "bundle.tar"
    cli = invoke("export", str(run.run_dir), str(path))
    assert cli.exit_code == 0, cli.output
    files = members(path)
    assert {"bund/manifest.json", "bund/SHA256SUMS", "bund/README.md", "bund/recipe.yaml",
            "bund/adapter/adapter_model.safetensors", "bund/adapter/adapter_config.json"} <= set(files)  # fmt: skip
    sums = verification.parse_checksums(files["bund/SHA256SUMS"].decode())
    assert set(sums) == {name.removeprefix("bund/") for name in files} - {"SHA256SUMS"}
    for name, digest in sums.items():
        assert hashlib.sha256(files[f"bund/{name}"]).hexdigest() == digest
    assert (
        files["bund/adapter/adapter_model.safetensors"]
        == (run.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    assert b"library_name: peft" in files["bund/README.md"]  # the model card
    result = pipeline.verify(path)
    assert result.ok and "adapter/adapter_model.safetensors" in result.checked
    assert result.not_checked  # data and base-model files live outside the bundle
    cli = invoke("verify", str(path))
    assert cli.exit_code == 0 and "match their recorded SHA-256" in cli.output


def test_export_is_reproducible_and_leaves_no_temporary_files(run, tmp_path: Path) -> None:
    first, second = bundle.export(run.run_dir, tmp_path / "a.tar"), bundle.export(run.run_dir, tmp_path / "b.tar")
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tar" or p.name.endswith(".tmp")) == [
        "a.tar",
        "b.tar",
    ]


def test_tampered_member_fails_verify(run, tmp_path: Path) -> None:
    good = bundle.export(run.run_dir, tmp_path / "good.tar")
    bad = tmp_path / "bad.tar"

    def flip(name: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith("adapter_model.safetensors") else data

    rewrite(good, bad, flip)
    with pytest.raises(verification.VerifyFailed, match="hash mismatch: adapter/adapter_model.safetensors"):
        pipeline.verify(bad)
    cli = invoke("verify", str(bad))
    assert cli.exit_code == 2 and "adapter/adapter_model.safetensors" in cli.output


def test_rewritten_checksums_still_disagree_with_the_manifest(run, tmp_path: Path) -> None:
    """Changing a file and its SHA256SUMS line together is caught by the manifest inside the bundle."""
    good = bundle.export(run.run_dir, tmp_path / "good.tar")
    files = members(good)
    weights = "bund/adapter/adapter_model.safetensors"
    changed = files[weights][:-1] + bytes([files[weights][-1] ^ 1])
    old, new = hashlib.sha256(files[weights]).hexdigest(), hashlib.sha256(changed).hexdigest()

    def forge(name: str, data: bytes) -> bytes:
        if name == weights:
            return changed
        return data.replace(old.encode(), new.encode()) if name.endswith("SHA256SUMS") else data

    forged = tmp_path / "forged.tar"
    rewrite(good, forged, forge)
    with pytest.raises(verification.VerifyFailed, match="manifest and SHA256SUMS disagree"):
        pipeline.verify(forged)


def test_added_and_removed_members_are_reported(run, tmp_path: Path) -> None:
    good = bundle.export(run.run_dir, tmp_path / "good.tar")
    dropped = tmp_path / "dropped.tar"
    rewrite(good, dropped, lambda name, data: None if name.endswith("adapter_config.json") else data)
    with pytest.raises(verification.VerifyFailed, match="missing: adapter/adapter_config.json"):
        pipeline.verify(dropped)
    extra = tmp_path / "extra.tar"
    rewrite(good, extra, lambda name, data: data)
    with tarfile.open(extra, "a") as tar:
        info = tarfile.TarInfo("bund/adapter/evil.py")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"pass"))
    with pytest.raises(verification.VerifyFailed, match="not recorded in the manifest: adapter/evil.py"):
        pipeline.verify(extra)


def test_escaping_or_linked_members_are_refused(run, tmp_path: Path) -> None:
    good = bundle.export(run.run_dir, tmp_path / "good.tar")
    hostile = tmp_path / "hostile.tar"
    rewrite(good, hostile, lambda name, data: data)
    with tarfile.open(hostile, "a") as tar:
        link = tarfile.TarInfo("bund/adapter/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(bundle.BundleError, match="not a plain file"):
        pipeline.verify(hostile)


def test_export_refuses_a_tampered_run_and_writes_nothing(run, tmp_path: Path) -> None:
    weights = run.run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    target = tmp_path / "never.tar"
    cli = invoke("export", str(run.run_dir), str(target))
    assert cli.exit_code == 2 and "refusing to export" in cli.output and "adapter_model.safetensors" in cli.output
    assert not target.exists() and not list(tmp_path.glob(".never.tar*"))


def test_unpacked_bundle_verifies_as_a_folder(run, tmp_path: Path) -> None:
    path = bundle.export(run.run_dir, tmp_path / "b.tar.gz")
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    folder = tmp_path / "unpacked" / "bund"
    assert pipeline.verify(folder).ok
    (folder / "README.md").write_text("edited card")
    with pytest.raises(verification.VerifyFailed, match="hash mismatch: README.md"):
        pipeline.verify(folder)


def test_export_needs_a_trained_run(tmp_path: Path) -> None:
    cli = invoke("export", str(tmp_path / "missing"), str(tmp_path / "x.tar"))
    assert cli.exit_code == 2 and "not a run directory" in cli.output
