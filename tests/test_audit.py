"""Audit log: one JSON line per event, appended, located where the recipe or environment says, and never a secret."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from helpers import invoke, make_run
from sovtune import audit
from sovtune.config import load_recipe
from sovtune.errors import GateFailed, SovtuneError

PLANTED = "hf_" + "Zq8Wx7Ec6Rv5Tb4Yn3Um2Ik1OlPa0SdFgH"  # token-shaped, built at runtime


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_events_are_appended_with_who_what_where(make_recipe, tmp_path: Path) -> None:
    recipe = load_recipe(make_recipe("aud"))
    log = tmp_path / "audit.jsonl"
    audit.record("check", "ok", recipe, path=log)
    audit.record("export", "ok", recipe, path=log, destination="/air-gap/bundle.tar")
    first, second = lines(log)
    assert first["event"] == "check" and second["event"] == "export"
    assert second["destination"] == "/air-gap/bundle.tar" and second["outcome"] == "ok"
    for key in ("time", "user", "host", "recipe_sha256", "data"):
        assert second[key]
    data_file = Path(recipe.resolve(recipe.data.train[0].path))
    import hashlib

    assert second["data"] == [
        {"path": str(data_file.resolve()), "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest()}
    ]
    assert oct(log.stat().st_mode & 0o777) == "0o600"  # who did what is not for every local user


def test_no_secret_reaches_the_log(make_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "plain-looking-token-value-1234")
    log = tmp_path / "secret.jsonl"
    monkeypatch.setenv(audit.ENV_PATH, str(log))
    recipe = load_recipe(make_recipe("secret"))
    with pytest.raises(SovtuneError):
        with audit.audited("push", recipe, destination="https://hub.internal/org/x") as event:
            event["details"]["token"] = PLANTED
            event["details"]["note"] = f"used Bearer {PLANTED} and plain-looking-token-value-1234"
            raise SovtuneError(f"401 from hub with token {PLANTED}")
    text = log.read_text()
    assert PLANTED not in text and "plain-looking-token-value-1234" not in text
    entry = json.loads(text.splitlines()[-1])
    assert entry["outcome"] == "failed" and "401 from hub" in entry["error"]
    assert entry["details"]["token"] == "[REDACTED]"


def test_audited_outcomes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "outcomes.jsonl"
    monkeypatch.setenv(audit.ENV_PATH, str(log))
    with audit.audited("merge", destination="out"):
        pass
    with pytest.raises(GateFailed):
        with audit.audited("eval"):
            raise GateFailed("gate failed: sql/exact_match")
    with pytest.raises(ZeroDivisionError):
        with audit.audited("train"):
            1 / 0  # a bug: only its type is logged, its message could hold anything
    assert [(e["event"], e["outcome"]) for e in lines(log)] == [
        ("merge", "ok"),
        ("eval", "refused"),
        ("train", "failed"),
    ]
    assert lines(log)[2]["error"] == "ZeroDivisionError"


def test_log_location(make_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(audit.ENV_PATH)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert audit.log_path() == tmp_path / "home" / ".sovtune" / "audit.jsonl"
    monkeypatch.setenv(audit.ENV_PATH, str(tmp_path / "env.jsonl"))
    assert audit.log_path() == tmp_path / "env.jsonl"
    recipe = load_recipe(make_recipe("located", sovereignty={"audit_log": "logs/audit.jsonl"}))
    assert audit.log_path(recipe) == recipe.base_dir / "logs" / "audit.jsonl"  # relative to the recipe, like its paths


def _writer(path: str, worker: int) -> None:
    for index in range(40):
        audit.record("check", "ok", path=Path(path), details={"worker": worker, "index": index, "pad": "x" * 2000})


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    log = tmp_path / "shared.jsonl"
    workers = [multiprocessing.get_context("fork").Process(target=_writer, args=(str(log), n)) for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    entries = lines(log)  # every line parses: no torn or interleaved writes
    assert sorted((e["details"]["worker"], e["details"]["index"]) for e in entries) == [
        (w, i) for w in range(3) for i in range(40)
    ]


def test_unwritable_log_is_a_clear_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(audit.AuditError, match="cannot append to the audit log"):
        audit.record("check", "ok", path=blocked / "audit.jsonl")


def test_cli_commands_write_events(make_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "cli.jsonl"
    monkeypatch.setenv(audit.ENV_PATH, str(log))
    recipe_path = make_recipe("cliaudit")
    result = invoke("check", str(recipe_path))
    assert result.exit_code == 0, result.output
    recipe = make_run(recipe_path)
    bundle_path = tmp_path / "b.tar"
    assert invoke("export", str(recipe.run_dir), str(bundle_path)).exit_code == 0
    bad = invoke("check", str(tmp_path / "missing.yaml"))
    assert bad.exit_code == 2
    events = [(e["event"], e["outcome"], e["destination"]) for e in lines(log)]
    assert events == [("check", "ok", None), ("export", "ok", str(bundle_path)), ("check", "failed", None)]
    export_entry = lines(log)[1]
    assert export_entry["recipe_sha256"] and len(export_entry["details"]["bundle_sha256"]) == 64
    assert os.path.getsize(log) > 0


def test_push_and_pull_are_audited_without_the_token(
    make_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real huggingface_hub client against the hub double on 127.0.0.1 (tests/hub_server.py)."""
    from huggingface_hub import constants

    from hub_server import HubDouble
    from sovtune.publish import hub as hub_module

    recipe = make_run(make_recipe("pushaudit"))
    double = HubDouble().start()
    try:
        token = double.add_token("alice", "write")
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
        monkeypatch.setattr(hub_module, "RETRY_WAIT_S", 0.0)
        log = tmp_path / "hub.jsonl"
        monkeypatch.setenv(audit.ENV_PATH, str(log))
        pushed = invoke("push", str(recipe.run_dir), "--repo", "acme/audited", "--endpoint", double.url)
        assert pushed.exit_code == 0, pushed.output
        pulled = invoke("pull", "acme/audited", "--endpoint", double.url, "--out", str(tmp_path / "pulled"))
        assert pulled.exit_code == 0, pulled.output
        refused = invoke("push", str(recipe.run_dir), "--repo", "acme/other", "--endpoint", double.url + "/nope")
        assert refused.exit_code == 2
    finally:
        double.stop()
    entries = lines(log)
    assert [(e["event"], e["outcome"]) for e in entries] == [("push", "ok"), ("pull", "ok"), ("push", "failed")]
    assert (
        entries[0]["destination"].startswith(f"{double.url}/acme/audited@") and entries[0]["details"]["private"] is True
    )
    assert entries[0]["recipe_sha256"] and entries[1]["destination"] == str(tmp_path / "pulled")
    assert token not in log.read_text()
