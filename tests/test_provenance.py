"""The manifest: what it records, that stages only append, and that `verify` catches any changed file (exit 2)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from helpers import invoke, make_run, qa_rows
from sovtune import data as data_module
from sovtune import pipeline
from sovtune.run import manifest as manifests
from sovtune.run import verify as verification


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def run(make_recipe, tmp_path: Path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    recipe_path = make_recipe("prov")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", recipe_path.name], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "recipe"], check=True)
    return make_run(recipe_path)


def test_manifest_records_inputs_environment_and_outputs(run, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    manifest = manifests.read_manifest(run.run_dir)
    recipe_file = run.run_dir / "recipe.yaml"
    assert manifest["recipe"]["sha256"] == sha(recipe_file) == manifest["recipe"]["file"]["sha256"]
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert manifest["recipe"]["git"]["commit"] == head
    [data] = manifest["data"]
    data_file = Path(run.resolve(run.data.train[0].path))
    assert data["files"] == [
        {
            "path": str(data_file.resolve()),
            "root": "absolute",
            "sha256": sha(data_file),
            "bytes": data_file.stat().st_size,
        }
    ]
    base = manifest["base_model"]
    weights = {Path(e["path"]).name: e["sha256"] for e in base["files"]}
    assert base["local"] and weights["model.safetensors"] == sha(tiny_model_dir / "model.safetensors")
    assert weights["config.json"] == sha(tiny_model_dir / "config.json")
    tokenizer = manifest["tokenizer"]
    template = (tiny_model_dir / "chat_template.jinja").read_text()
    assert tokenizer["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert {Path(e["path"]).name for e in tokenizer["files"]} >= {"tokenizer.json", "tokenizer_config.json"}
    assert len(tokenizer["tokenizer_sha256"]) == 64
    env = manifest["environment"]
    assert env["packages"]["torch"] and env["packages"]["peft"] and env["hardware"]["cpu_count"]
    assert torch.__version__.startswith(env["packages"]["torch"].split("+")[0])
    assert manifest["run"]["seed"] == run.train.seed == 0
    [stage] = manifest["stages"]
    assert stage["stage"] == "train" and stage["metrics"] == {"train_loss": 1.25, "global_step": 0}
    assert datetime.fromisoformat(manifest["run"]["started_at"]) <= datetime.fromisoformat(stage["ended_at"])
    outputs = {e["path"]: e["sha256"] for e in stage["files"]}
    adapter_weights = run.run_dir / "adapter" / "adapter_model.safetensors"
    assert outputs["adapter/adapter_model.safetensors"] == sha(adapter_weights)
    assert "adapter/adapter_config.json" in outputs and "train_metrics.json" in outputs
    assert manifest["base_model"]["licence"]["allowed"] == []


def test_verify_passes_on_untouched_run(run) -> None:
    result = pipeline.verify(run.run_dir)
    assert result.ok and "adapter/adapter_model.safetensors" in result.checked and not result.not_checked
    cli = invoke("verify", str(run.run_dir))
    assert cli.exit_code == 0 and "match their recorded SHA-256" in cli.output


def test_tampered_adapter_fails_with_exit_2(run) -> None:
    flip_byte(run.run_dir / "adapter" / "adapter_model.safetensors")
    with pytest.raises(verification.VerifyFailed, match="hash mismatch: adapter/adapter_model.safetensors"):
        pipeline.verify(run.run_dir)
    cli = invoke("verify", str(run.run_dir))
    assert cli.exit_code == 2 and "adapter/adapter_model.safetensors" in cli.output


def test_tampered_data_and_deleted_adapter_file_are_listed(run) -> None:
    data_file = Path(run.resolve(run.data.train[0].path))
    data_file.write_text(data_file.read_text() + '{"messages": []}\n')
    (run.run_dir / "adapter" / "adapter_config.json").unlink()
    cli = invoke("verify", str(run.run_dir))
    assert cli.exit_code == 2
    assert (
        str(data_file.resolve()) in cli.output.replace("\n", "")
        and "missing: adapter/adapter_config.json" in cli.output
    )


def test_absent_external_file_is_reported_not_checked_unless_strict(run) -> None:
    Path(run.resolve(run.data.train[0].path)).unlink()
    result = pipeline.verify(run.run_dir)
    assert result.ok and len(result.not_checked) == 1 and "not checked" in result.describe()
    with pytest.raises(verification.VerifyFailed, match="missing"):
        pipeline.verify(run.run_dir, strict=True)


def test_stages_append_and_never_rewrite(run) -> None:
    before = manifests.read_manifest(run.run_dir)
    manifests.append_stage(run.run_dir, "eval", {"metrics": {"sql/exact_match": {"base": 0.1, "tuned": 0.6}}})
    after = manifests.read_manifest(run.run_dir)
    assert after["stages"][:-1] == before["stages"] and {k: v for k, v in after.items() if k != "stages"} == {
        k: v for k, v in before.items() if k != "stages"
    }
    assert after["stages"][-1]["stage"] == "eval"
    with pytest.raises(manifests.ManifestError, match="exists already"):
        manifests.start(run, run.run_dir)
    manifests.start(run, run.run_dir, resume=True)
    assert manifests.read_manifest(run.run_dir)["stages"][-1]["stage"] == "resume"


def test_a_later_stage_supersedes_an_earlier_entry(run) -> None:
    """A retrained adapter is recorded by its own stage; verify checks the latest hash, not the stale one."""
    flip_byte(run.run_dir / "adapter" / "adapter_model.safetensors")
    manifests.record_train(run.run_dir, run, {"train_loss": 1.0})
    assert pipeline.verify(run.run_dir).ok


def test_manifest_write_is_atomic(run, monkeypatch: pytest.MonkeyPatch) -> None:
    path = run.run_dir / manifests.MANIFEST
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)  # the disk fills after the temporary file was written
    with pytest.raises(OSError):
        manifests.append_stage(run.run_dir, "eval", {})
    assert path.read_bytes() == before
    assert [p.name for p in run.run_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_scan_counts_reach_the_manifest_without_values(make_recipe) -> None:
    rows = qa_rows()
    rows[0]["messages"][1]["content"] = "mail jane.doe@example.org, card 4111 1111 1111 1111"
    recipe = make_run(make_recipe("scanned", rows=rows, sovereignty={"data_scan": "redact"}))
    text = (recipe.run_dir / manifests.MANIFEST).read_text()
    scan = json.loads(text)["data_scan"]
    assert scan["findings"] == {"email": 1, "card_number": 1} and scan["redacted"] is True
    assert "jane.doe" not in text and "4111" not in text


def test_verify_rejects_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(manifests.ManifestError, match="no manifest"):
        pipeline.verify(tmp_path)
    with pytest.raises(verification.VerifyFailed, match="neither a run directory nor a bundle"):
        pipeline.verify(tmp_path / "nope.tar")


def test_hub_model_and_dataset_record_revision_and_resolved_commit(make_recipe, tmp_path: Path, monkeypatch) -> None:
    """Hub ids: the pinned revision plus the commit it resolved to, read from the local cache (no network)."""
    import huggingface_hub.constants as hub_constants

    cache, commit = tmp_path / "hub-cache", "0123456789abcdef0123456789abcdef01234567"
    for folder, filename in (("models--org--tiny", "config.json"), ("datasets--org--sql", "train.jsonl")):
        snapshot = cache / folder / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / filename).write_text("{}\n")
        (cache / folder / "refs").mkdir()
        (cache / folder / "refs" / "v1").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    from sovtune.config import load_recipe

    recipe = load_recipe(
        make_recipe(
            "hubids",
            model={"name_or_path": "org/tiny", "revision": "v1"},
            data={"train": {"path": "org/sql", "revision": "v1"}},
        )
    )
    base = manifests.base_model_record(recipe)
    assert (base["revision"], base["commit"], base["local"]) == ("v1", commit, False)
    assert [Path(entry["path"]).name for entry in base["files"]] == ["config.json"]
    [data] = data_module.data_records(recipe.data, recipe.base_dir)
    assert data["hub"] == {"id": "org/sql", "revision": "v1", "commit": commit, "subset": None, "split": "train"}
    uncached = load_recipe(make_recipe("uncached", model={"name_or_path": "org/other", "revision": "v1"}))
    assert manifests.base_model_record(uncached)["commit"] is None  # recorded later by the train stage
