"""Push and pull through the real huggingface_hub client against the hub double on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import invoke, make_run, qa_rows, write_jsonl
from hub_server import HubDouble

REPO = "acme/support-adapter"
HELD_OUT_PROMPT = "Which held-out question about quokka payroll must never leave this machine?"
LFS_THRESHOLD = 8 * 1024  # tokenizer.json of the tiny model is larger: it must go through LFS by size


@pytest.fixture(scope="session")
def template_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A run directory as `sovtune run` leaves it: recipe.yaml + manifest (provenance), adapter/, report.json."""
    from sovtune.metrics import Scores, paired_bootstrap
    from sovtune.report import MetricResult, Report
    from sovtune.run import manifest

    root = tmp_path_factory.mktemp("hub-run")
    run_dir = root / "runs" / "support"
    data = write_jsonl(root / "train.jsonl", qa_rows(8))
    recipe_path = root / "support.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "name": "support",
                "model": {"name_or_path": str(tiny_model_dir), "license": "apache-2.0"},
                "adapter": {"r": 4},
                "data": {"train": str(data), "max_length": 64},
                "output": {"dir": str(run_dir)},
            }
        ),
        encoding="utf-8",
    )
    make_run(recipe_path)
    comparison = paired_bootstrap(
        Scores.mean([0, 0, 1, 0, 0, 1]), Scores.mean([1, 1, 1, 0, 1, 1]), resamples=1000, seed=0
    )
    result = MetricResult(
        dataset="eval", metric="exact_match", higher_is_better=True, aggregate="mean", **comparison.to_json()
    )
    sample = {
        "dataset": "eval",
        "prompt": HELD_OUT_PROMPT,
        "reference": "SELECT 1;",
        "predictions": {"base": "no", "tuned": "SELECT 1;"},
    }
    report = Report(run="support", base_model={"name_or_path": str(tiny_model_dir)}, adapter=str(run_dir / "adapter"),
                    settings={}, results=[result], gates=[], samples=[sample], notes={}, timing={})  # fmt: skip
    (run_dir / "report.json").write_text(json.dumps(report.to_json()), encoding="utf-8")
    manifest.append_stage(run_dir, "eval", {}, [run_dir / "report.json"])
    assert (run_dir / "adapter" / "tokenizer.json").stat().st_size > LFS_THRESHOLD
    return run_dir


@pytest.fixture
def run_dir(template_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(template_run, tmp_path / "run"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A fresh hub double, HF_TOKEN = a write token, no saved login, no HF_ENDPOINT, retries without waiting."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from sovtune.publish import hub as hub_module

    double = HubDouble(lfs_threshold=LFS_THRESHOLD).start()
    double.write_token = double.add_token("alice", "write")
    double.read_token = double.add_token("bob", "read")
    monkeypatch.setenv("HF_TOKEN", double.write_token)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setattr(hub_module, "RETRY_WAIT_S", 0.0)
    disable_progress_bars()
    yield double
    enable_progress_bars()
    double.stop()


# Published as they are; adapter_config.json, report.json and manifest.json are published in their public form.
DERIVED = {"adapter_config.json", "report.json", "manifest.json"}
MADE_FOR_PUBLISHING = {"README.md", "publish_manifest.json"}


def run_files(run_dir: Path) -> dict[str, bytes]:
    """The run files a push publishes, by their path in the repository: the adapter folder (without peft's
    placeholder card) at the root, report.json and manifest.json beside it."""
    files = {
        p.relative_to(run_dir / "adapter").as_posix(): p.read_bytes()
        for p in (run_dir / "adapter").rglob("*")
        if p.is_file()
    }
    files.pop("README.md", None)  # peft's placeholder card is replaced by ours
    files.update({name: (run_dir / name).read_bytes() for name in ("report.json", "manifest.json")})
    return files


def repo_files(hub: HubDouble, repo_id: str = REPO, revision: str = "main") -> dict[str, bytes]:
    commit = hub.repos[repo_id].commit_for(revision)
    return {path: hub.file_bytes(repo_id, path, revision) for path in commit.files}


def commits(hub: HubDouble) -> int:
    return sum(r["route"] == "commit" for r in hub.requests)


def push(run_dir: Path, hub: HubDouble, **kwargs: Any) -> Any:
    from sovtune.publish.hub import push as push_run

    return push_run(run_dir, kwargs.pop("repo_id", REPO), endpoint=kwargs.pop("endpoint", hub.url), **kwargs)


def push_error(run_dir: Path, hub: HubDouble, **kwargs: Any) -> str:
    from sovtune.publish.publication import PublishError

    with pytest.raises(PublishError) as caught:
        push(run_dir, hub, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for token in hub.tokens:
        assert token not in message
    return message


def cli(*args: Any) -> Any:
    return invoke(*(str(arg) for arg in args))


def said(done: Any) -> str:
    """The command's output with the terminal's line wrapping undone."""
    return " ".join(done.output.split())


# ---------------------------------------------------------------------------------------------------------------
# Round trip


def test_push_creates_a_private_repo_and_pull_returns_every_file_byte_identical(
    run_dir: Path, hub: HubDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture, tiny_model_dir: Path
) -> None:
    from sovtune.publish.card import build_card
    from sovtune.publish.hub import pull

    caplog.set_level(logging.INFO, logger="sovtune")
    result = push(run_dir, hub)
    lines = caplog.messages

    repo = hub.repos[REPO]
    assert repo.private is True and result.private is True
    originals = run_files(run_dir)
    held = repo_files(hub)
    assert set(held) == set(originals) | MADE_FOR_PUBLISHING | {".gitattributes"}
    for path, data in originals.items():
        if path not in DERIVED:
            assert held[path] == data, path
    # The public forms: the same content, with the base model named and no path of this machine.
    config = json.loads(held["adapter_config.json"])
    assert config["base_model_name_or_path"] == tiny_model_dir.name
    assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in json.loads(originals["adapter_config.json"]).items() if k != "base_model_name_or_path"
    }
    assert json.loads(held["report.json"])["results"] == json.loads(originals["report.json"])["results"]
    assert json.loads(held["report.json"])["samples"] == []
    for path in DERIVED:
        assert str(tmp_path).encode() not in held[path] and str(tiny_model_dir).encode() not in held[path], path
    # The publish manifest hashes every other file the repository holds, the card included.
    listing = json.loads(held["publish_manifest.json"])
    assert {entry["path"]: entry["sha256"] for entry in listing["files"]} == {
        path: hashlib.sha256(data).hexdigest()
        for path, data in held.items()
        if path not in ("publish_manifest.json", ".gitattributes")
    }
    assert listing["signature"] is None and result.signed is False
    # Large or binary files went through LFS: the batch API, then a PUT to the pre-signed URL without credentials.
    assert hub.is_lfs(REPO, "adapter_model.safetensors") and hub.is_lfs(REPO, "tokenizer.json")
    assert not hub.is_lfs(REPO, "adapter_config.json")
    uploads = [r for r in hub.requests if r["route"] == "lfs_upload"]
    assert len(uploads) == 2 and not any(r["authorized"] for r in uploads)
    # One commit on top of the repository's initial commit; the card was validated by the hub first.
    commit = repo.commits[repo.branches["main"]]
    assert commit.oid == result.commit and repo.commits[commit.parent].parent is None
    assert any(r["route"] == "validate_yaml" for r in hub.requests)
    assert held["README.md"] == str(build_card(run_dir, REPO, revision="main")).encode()
    assert any("no Xet storage" in line for line in lines)  # fell back to LFS by itself
    published = len(held) - 1  # .gitattributes is the hub's
    assert any(line.startswith(f"published {published} files (unsigned)") and "(private)" in line for line in lines)

    out = tmp_path / "pulled"
    pulled = pull(REPO, endpoint=hub.url, out=out)
    assert pulled.commit == result.commit
    # The pulled folder is the repository's tree (the hub's own .gitattributes aside), byte for byte.
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == {
        path: data for path, data in held.items() if path != ".gitattributes"
    }
    assert "adapter_model.safetensors" in pulled.verified and "README.md" in pulled.verified
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


def test_the_token_is_in_no_published_or_written_file_and_no_log(
    run_dir: Path, hub: HubDouble, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from sovtune.publish.hub import pull

    caplog.set_level(logging.DEBUG)
    push(run_dir, hub)
    out = pull(REPO, endpoint=hub.url, out=tmp_path / "pulled").out_dir
    lines = caplog.messages
    token = hub.write_token.encode()
    assert all(token not in data for data in repo_files(hub).values())
    assert all(token not in path.read_bytes() for path in [*out.rglob("*"), *run_dir.rglob("*")] if path.is_file())
    captured = capfd.readouterr()
    assert hub.write_token not in captured.out + captured.err + caplog.text + "\n".join(lines)


def test_pulled_adapter_loads_with_peft_and_keeps_the_chat_template(
    run_dir: Path, hub: HubDouble, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from sovtune.publish.hub import pull

    push(run_dir, hub)
    out = pull(REPO, endpoint=hub.url, out=tmp_path / "pulled").out_dir
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), out)
    assert model.peft_config["default"].r == 4
    assert (
        AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    )


def test_push_works_while_the_hub_libraries_are_offline(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    push(run_dir, hub)
    assert constants.HF_HUB_OFFLINE is True


def test_push_honours_hf_hub_disable_xet_set_after_import(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub  # noqa: F401  (imported long before the variable is set)
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    before = constants.HF_HUB_DISABLE_XET
    push(run_dir, hub)
    assert not any(r["route"] == "xet_token" for r in hub.requests)
    assert constants.HF_HUB_DISABLE_XET == before  # the client's switches are restored


# ---------------------------------------------------------------------------------------------------------------
# Exact repository state (issue 15, requirement 2)


def test_a_push_leaves_exactly_the_published_files_and_deletes_an_earlier_pushs_in_the_same_commit(
    run_dir: Path, hub: HubDouble, tmp_path: Path
) -> None:
    from sovtune.publish.hub import pull

    first = push(run_dir, hub)  # an evaluated run: report.json
    hub.commit_files(REPO, {"notes.txt": b"added on the hub by hand"})
    unevaluated = Path(shutil.copytree(run_dir, tmp_path / "unevaluated"))
    (unevaluated / "report.json").unlink()
    before = commits(hub)
    second = push(unevaluated, hub)

    assert commits(hub) == before + 1 and second.commit != first.commit
    held = repo_files(hub)
    assert set(held) == set(run_files(run_dir)) - {"report.json"} | MADE_FOR_PUBLISHING | {".gitattributes"}
    assert sorted(second.deleted) == ["notes.txt", "report.json"]
    head = hub.repos[REPO].commit_for("main")
    assert hub.repos[REPO].commits[head.parent].files.keys() >= {"report.json", "notes.txt"}  # one commit did both
    # The weights and tokenizer did not change: only the card, the listing and the manifest were uploaded.
    assert "adapter_model.safetensors" not in second.uploaded and "publish_manifest.json" in second.uploaded
    assert not (pull(REPO, endpoint=hub.url, out=tmp_path / "pulled").out_dir / "report.json").exists()


def test_a_push_that_changes_nothing_says_so_and_makes_no_commit(run_dir: Path, hub: HubDouble) -> None:
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 0, done.output
    count = len(repo_files(hub)) - 1  # .gitattributes is the hub's
    assert f"published {count} files" in done.output
    head = hub.repos[REPO].branches["main"]
    before = commits(hub)

    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)  # create answers 409 + url: "exists"
    assert done.exit_code == 0, done.output
    assert "no change:" in done.output and f"already holds exactly these {count} files" in done.output
    assert "no commit made" in done.output and f"published {count} files" not in done.output
    assert commits(hub) == before and hub.repos[REPO].branches["main"] == head
    assert [r["status"] for r in hub.requests if r["route"] == "create"] == [200, 409]


def test_push_to_a_new_branch_creates_it_and_leaves_main_alone(run_dir: Path, hub: HubDouble, tmp_path: Path) -> None:
    from sovtune.publish.hub import pull

    result = push(run_dir, hub, revision="release/v1")
    repo = hub.repos[REPO]
    assert repo.branches["release/v1"] == result.commit
    assert set(repo.commit_for("main").files) == {".gitattributes"}
    assert [r["status"] for r in hub.requests if r["route"] == "branch"] == [200]
    assert pull(REPO, endpoint=hub.url, revision="release/v1", out=tmp_path / "pulled").commit == result.commit
    assert push(run_dir, hub, revision="release/v1").changed is False  # the branch exists now (409, fine)


def test_a_hub_that_cannot_create_the_branch_says_so_not_that_the_repo_is_missing(
    run_dir: Path, hub: HubDouble
) -> None:
    hub.fail("branch", 404, "Not Found")
    message = push_error(run_dir, hub, revision="release")
    assert "answered 404 to creating branch 'release' in acme/support-adapter" in message
    assert "create 'release' on the hub, or push to main" in message
    assert "is not on" not in message
    assert not any(r["route"] == "commit" for r in hub.requests)


def test_public_only_when_asked_and_an_existing_public_repo_is_refused_for_a_private_push(
    run_dir: Path, hub: HubDouble
) -> None:
    assert push(run_dir, hub, public=True).private is False
    assert hub.repos[REPO].private is False
    message = push_error(run_dir, hub)
    assert "exists on" in message and "is public" in message and "--public" in message and "--private" in message


@pytest.mark.parametrize("flag, before, after", [("--public", True, False), ("--private", False, True)])
def test_visibility_changes_only_with_a_flag_and_the_output_and_audit_say_what_it_is(
    run_dir: Path, hub: HubDouble, flag: str, before: bool, after: bool
) -> None:
    from sovtune.audit import log_path

    hub.create_repo(REPO, private=before)
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url, flag)
    assert done.exit_code == 0, done.output
    assert hub.repos[REPO].private is after
    shown = "private" if after else "public"
    assert f"({shown}, changed from {'private' if before else 'public'})" in done.output
    event = json.loads(log_path().read_text().splitlines()[-1])
    assert event["details"]["private"] is after and event["details"]["visibility_changed"] is True


def test_without_a_flag_an_existing_private_repo_stays_private_even_if_the_recipe_says_public(
    run_dir: Path, hub: HubDouble
) -> None:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["hub"] = {"repo": REPO, "endpoint": hub.url, "private": False}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    hub.create_repo(REPO, private=True)
    done = cli("push", run_dir, "--use-run-hub")
    assert done.exit_code == 0, done.output
    assert hub.repos[REPO].private is True and "(private)" in done.output and "public" not in done.output
    assert not any(r["route"] == "settings" for r in hub.requests)


# ---------------------------------------------------------------------------------------------------------------
# Failures: one clear line each, never the token


def test_bad_token_is_a_clear_401(run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token_this_hub_knows")
    message = push_error(run_dir, hub)
    assert "rejected the token (401" in message and "HF_TOKEN" in message
    assert "hf_not_a_token_this_hub_knows" not in message
    assert REPO not in hub.repos


@pytest.mark.parametrize("repo_exists", [False, True])
def test_read_only_token_is_a_clear_403(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch, repo_exists: bool
) -> None:
    if repo_exists:
        hub.create_repo(REPO, private=True)
    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    message = push_error(run_dir, hub)
    assert "may not write acme/support-adapter" in message and "403" in message and "write access to acme" in message
    assert not any(r["route"] == "commit" for r in hub.requests)


def test_conflict_is_a_clear_409(run_dir: Path, hub: HubDouble) -> None:
    hub.fail("commit", 409, "another commit to this branch is in progress", times=None)
    message = push_error(run_dir, hub)
    assert message.startswith(
        "upload: conflict on acme/support-adapter (409: another commit to this branch is in progress)"
    )


def test_branch_moved_under_the_push_is_a_clear_412_and_nothing_is_published(run_dir: Path, hub: HubDouble) -> None:
    hub.before("commit", lambda: hub.commit_files(REPO, {"notes.txt": b"pushed by someone else"}))
    message = push_error(run_dir, hub)
    assert "branch main moved during the push (412" in message and "run the push again" in message
    assert set(hub.repos[REPO].commit_for("main").files) == {".gitattributes", "notes.txt"}


def test_metadata_rejected_by_validate_yaml_is_a_clear_400_before_any_upload(run_dir: Path, hub: HubDouble) -> None:
    reason = '"base_model" with value "/srv/models/llama" is not valid. Use a model id from https://hf.co/models.'
    hub.fail("validate_yaml", 400, "Invalid metadata in README.md", errors=[reason])
    message = push_error(run_dir, hub)
    assert "rejected the model card metadata (400 from validate-yaml" in message and reason in message
    assert not any(r["route"] in ("lfs_upload", "commit") for r in hub.requests)


def test_the_hub_double_really_rejects_a_local_path_in_base_model(
    hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the client used directly, without hub.py
    api = HfApi(endpoint=hub.url, token=hub.write_token)
    with pytest.raises(ValueError, match="base_model.*is not valid"):
        api._validate_yaml("---\nbase_model: /srv/models/llama\n---\n")
    api._validate_yaml("---\nbase_model: meta-llama/Llama-3.1-8B\nlibrary_name: peft\n---\n")


def test_xet_forced_on_a_hub_without_xet_explains_the_misleading_404(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0")
    message = push_error(run_dir, hub)
    assert "has no Xet storage" in message and "HF_HUB_DISABLE_XET=1" in message
    assert not any(r["route"] == "commit" for r in hub.requests)


def test_transient_failures_are_retried(run_dir: Path, hub: HubDouble, caplog: pytest.LogCaptureFixture) -> None:
    hub.fail("create", 503, times=1)
    hub.fail("commit", 502, times=2)
    caplog.set_level(logging.INFO, logger="sovtune")
    result = push(run_dir, hub)
    lines = caplog.messages
    assert hub.repos[REPO].branches["main"] == result.commit
    assert sum("retrying" in line for line in lines) == 3


def test_a_hub_that_stays_down_is_a_clear_error_after_the_retries(run_dir: Path, hub: HubDouble) -> None:
    from sovtune.publish import hub as hub_module

    hub.fail("create", 503, "maintenance", times=None)
    message = push_error(run_dir, hub)
    assert f"unavailable (503: maintenance) after {hub_module.RETRY_ATTEMPTS} attempts" in message
    assert sum(r["route"] == "create" for r in hub.requests) == hub_module.RETRY_ATTEMPTS


def test_unreachable_endpoint(run_dir: Path, hub: HubDouble) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    message = push_error(run_dir, hub, endpoint=closed)
    assert f"cannot reach the hub at {closed}" in message


def test_adapter_changed_after_training_is_refused_before_contacting_the_hub(run_dir: Path, hub: HubDouble) -> None:
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    (run_dir / "adapter" / "extra.txt").write_text("added later")
    message = push_error(run_dir, hub)
    assert (
        "hash mismatch: adapter/adapter_model.safetensors" in message
        and "not in the manifest: adapter/extra.txt" in message
    )
    assert hub.requests == []


def test_settings_errors(run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sovtune.publish.hub import HubError, resolve_endpoint

    assert "not a repository id" in push_error(run_dir, hub, repo_id="acme/bad--name")
    assert "is not an http(s) URL" in push_error(run_dir, hub, endpoint="hub.internal")
    assert "--revision: 'my branch' is not a branch name" in push_error(run_dir, hub, revision="my branch")
    with pytest.raises(HubError, match="no hub endpoint: pass --endpoint"):
        resolve_endpoint(None, None)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.internal.example/")
    assert resolve_endpoint(None, None) == "https://hub.internal.example"  # read when called, not at import
    assert resolve_endpoint(None, "https://recipe.example") == "https://recipe.example"
    assert resolve_endpoint("https://flag.example", "https://recipe.example") == "https://flag.example"
    monkeypatch.delenv("HF_TOKEN")
    assert "no token for" in push_error(run_dir, hub)
    shutil.rmtree(run_dir / "adapter")
    assert "no adapter folder" in push_error(run_dir, hub)


# ---------------------------------------------------------------------------------------------------------------
# Pull: exactly the listed files, each checked (issue 15, requirement 3)


def test_pull_refuses_files_that_do_not_match_and_writes_nothing(run_dir: Path, hub: HubDouble, tmp_path: Path) -> None:
    from sovtune.publish.hub import HubError, pull

    push(run_dir, hub)
    hub.commit_files(REPO, {"adapter_model.safetensors": b"not the trained weights"})
    out = tmp_path / "pulled"
    with pytest.raises(HubError, match="hash mismatch: adapter_model.safetensors \\(changed after they were recorded"):
        pull(REPO, endpoint=hub.url, out=out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_card_edited_on_the_hub_is_refused(run_dir: Path, hub: HubDouble, tmp_path: Path) -> None:
    from sovtune.publish.hub import HubError, pull

    push(run_dir, hub)
    card = hub.file_bytes(REPO, "README.md").decode()
    gain = json.loads(hub.file_bytes(REPO, "report.json"))["results"][0]["tuned"]
    edited = card.replace(f"{gain:.4g}", "0.986")
    assert edited != card
    hub.commit_files(REPO, {"README.md": edited.encode()})
    with pytest.raises(HubError, match="hash mismatch: README.md"):
        pull(REPO, endpoint=hub.url, out=tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_a_revision_with_unlisted_or_missing_files_is_refused_before_anything_but_the_listing_is_downloaded(
    run_dir: Path, hub: HubDouble, tmp_path: Path
) -> None:
    from sovtune.publish.hub import HubError, pull

    push(run_dir, hub)
    hub.commit_files(REPO, {"report_extra.json": b"{}", "nested/extra.py": b"print()"})
    hub.delete_files(REPO, ["report.json"])
    hub.requests.clear()
    with pytest.raises(HubError) as caught:
        pull(REPO, endpoint=hub.url, out=tmp_path / "pulled")
    message = str(caught.value)
    assert "not listed in publish_manifest.json: nested/extra.py, report_extra.json" in message
    assert "missing: report.json" in message and "nothing was downloaded" in message
    downloads = {r["path"].rsplit("/", 1)[-1] for r in hub.requests if r["route"] == "resolve"}
    assert downloads == {"publish_manifest.json"}
    assert not (tmp_path / "pulled").exists()


def test_the_pulled_folder_passes_sovtune_verify_which_names_what_was_not_published(
    run_dir: Path, hub: HubDouble, tmp_path: Path
) -> None:
    from sovtune.publish.hub import pull

    push(run_dir, hub)
    out = pull(REPO, endpoint=hub.url, out=tmp_path / "pulled").out_dir
    done = cli("verify", out)
    assert done.exit_code == 0, done.output
    listed = len(list(out.iterdir())) - 1  # the publish manifest lists every other file
    assert f"{listed} files match their recorded SHA-256" in said(done)
    assert (
        "not published, absent by design: adapter/README.md, data_stats.json, recipe.yaml, train_metrics.json"
        in said(done)
    )
    assert "not signed" in said(done)

    (out / "report.json").unlink()
    done = cli("verify", out)
    assert done.exit_code == 2
    assert "missing: report.json (recorded, not present)" in said(done) and "changed" not in said(done)

    weights = out / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    (out / "stray.txt").write_text("added by hand")
    done = cli("verify", out)
    assert done.exit_code == 2
    assert "hash mismatch: adapter_model.safetensors (changed after they were recorded)" in said(done)
    assert "not listed in publish_manifest.json: stray.txt" in said(done)


def test_verify_of_a_run_names_missing_files_as_missing_not_changed(run_dir: Path) -> None:
    (run_dir / "report.json").unlink()
    done = cli("verify", run_dir)
    assert done.exit_code == 2
    assert "missing: report.json (recorded, not present)" in said(done)
    assert "changed" not in said(done)


def test_pull_errors(run_dir: Path, hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sovtune.publish.hub import HubError, pull

    with pytest.raises(HubError, match="acme/missing is not on .* \\(404\\)"):
        pull("acme/missing", endpoint=hub.url, out=tmp_path / "a")
    push(run_dir, hub)
    with pytest.raises(HubError, match="revision 'nope' is not in acme/support-adapter"):
        pull(REPO, endpoint=hub.url, revision="nope", out=tmp_path / "b")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="private and needs a token \\(401\\)"):
        pull(REPO, endpoint=hub.url, out=tmp_path / "c")
    busy = tmp_path / "busy"
    (busy / "x").mkdir(parents=True)
    with pytest.raises(HubError, match="exists and is not empty"):
        pull(REPO, endpoint=hub.url, out=busy)
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_pull_of_a_bad_repository_argument_talks_about_the_argument(hub: HubDouble, tmp_path: Path) -> None:
    done = cli("pull", "nope", "--endpoint", hub.url, "--out", tmp_path / "pulled")
    assert done.exit_code == 2
    assert "REPO: 'nope' is not a repository id" in done.output and "--repo" not in done.output
    assert hub.requests == []


def test_pull_needs_a_publish_manifest(hub: HubDouble, tmp_path: Path) -> None:
    from sovtune.publish.hub import HubError, pull

    hub.create_repo(REPO, private=True)
    hub.commit_files(REPO, {"adapter_config.json": b"{}", "manifest.json": b"{}"})
    with pytest.raises(HubError, match="no publish_manifest.json, so the files cannot be verified"):
        pull(REPO, endpoint=hub.url, out=tmp_path / "pulled")


@pytest.mark.parametrize(
    "listing, reason",
    [
        (b"[1, 2", "is not valid JSON"),
        (json.dumps({"kind": "other"}).encode(), "is not a sovtune publish manifest"),
        (json.dumps({"kind": "sovtune.publication", "version": 1, "files": [{"path": "../x", "sha256": "0"}]}).encode(),
         "invalid or repeated entry"),
    ],
)  # fmt: skip
def test_a_damaged_publish_manifest_is_one_line(
    run_dir: Path, hub: HubDouble, tmp_path: Path, listing: bytes, reason: str
) -> None:
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 0, done.output
    hub.commit_files(REPO, {"publish_manifest.json": listing})
    done = cli("pull", REPO, "--endpoint", hub.url, "--out", tmp_path / "pulled")
    assert done.exit_code == 2 and reason in done.output and "Traceback" not in done.output
    assert not (tmp_path / "pulled").exists() and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_push_and_pull_exit_codes(
    run_dir: Path, hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 0, done.output
    assert hub.repos[REPO].private is True

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # pull takes the endpoint from the environment
    done = cli("pull", REPO, "--out", tmp_path / "pulled")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "pulled" / "adapter_model.safetensors").is_file()
    assert f"verified in {tmp_path / 'pulled'}: not signed" in said(done)

    hub.commit_files(REPO, {"adapter_config.json": b"{}"})
    done = cli("pull", REPO, "--out", tmp_path / "tampered")
    assert done.exit_code == 2 and "hash mismatch: adapter_config.json" in done.output
    assert not (tmp_path / "tampered").exists()

    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    done = cli("push", run_dir, "--repo", "acme/other")
    assert done.exit_code == 2 and "403" in done.output and hub.read_token not in done.output
    assert done.output.count("\n") <= 2  # one error line (wrapped at most once by the terminal width)


def test_cli_push_takes_repo_endpoint_and_visibility_from_the_runs_recipe_when_asked(
    run_dir: Path, hub: HubDouble
) -> None:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["hub"] = {"repo": "acme/from-recipe", "endpoint": hub.url, "private": False}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    done = cli("push", run_dir, "--use-run-hub")
    assert done.exit_code == 0, done.output
    assert hub.repos["acme/from-recipe"].private is False


def test_preflight_of_push_settings_and_a_bad_hub_section_in_the_run(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sovtune.config import HubSection
    from sovtune.errors import SovtuneError
    from sovtune.publish.hub import HubError, check_push_settings, run_hub_settings

    check_push_settings(HubSection())  # nothing to publish, nothing to check
    check_push_settings(HubSection(repo=REPO, endpoint=hub.url, push=True))
    with pytest.raises(SovtuneError, match="keys/missing.pem: no such signing key file"):
        check_push_settings(HubSection(signing_key="keys/missing.pem"), tmp_path)
    with pytest.raises(HubError, match="no hub endpoint"):
        check_push_settings(HubSection(repo=REPO, push=True))
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no token for"):
        check_push_settings(HubSection(repo=REPO, endpoint=hub.url, push=True))
    assert hub.requests == []  # no network in a preflight

    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["hub"] = {"repo": "not-an-org-slash-name"}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.raises(HubError, match="recipe.yaml: hub.repo: 'not-an-org-slash-name' is not a repository id"):
        run_hub_settings(run_dir)


# ---------------------------------------------------------------------------------------------------------------
# Signed publications (issue 15, requirement 5): OpenSSF model signing with a key pair through the model-signing
# package; pulled folders checked by sovtune and by the reference CLI (`model_signing verify key`) as a subprocess.


def write_key_pair(folder: Path, name: str = "key", password: bytes | None = None) -> tuple[Path, Path]:
    """An ECDSA P-256 key pair as `openssl ecparam -name prime256v1 -genkey -noout` and `openssl ec -pubout` write
    them (PEM); the private key encrypted when a password is given."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    private = folder / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, encryption)
    )
    public = folder / f"{name}.pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "keys").mkdir()
    return write_key_pair(tmp_path / "keys")


def reference_verify(folder: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    """The reference CLI of the OpenSSF model signing project, as a user would run it."""
    script = Path(sys.executable).parent / "model_signing"
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "model_signing"]
    command = [*program, "verify", "key", "--public_key", str(public_key), "--signature", str(folder / "model.sig")]
    return subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=300)


def test_sign_then_push_then_pull_trust_and_the_reference_cli_verifies_the_pulled_folder(
    run_dir: Path, hub: HubDouble, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    done = cli("sign", run_dir, "--key", private, "--repo", REPO)
    assert done.exit_code == 0, done.output
    assert (run_dir / "model.sig").is_file() and "sovtune push` publishes it" in said(done)
    from sovtune.audit import log_path

    event = json.loads(log_path().read_text().splitlines()[-1])
    assert (event["event"], event["outcome"], event["run_dir"]) == ("sign", "ok", str(run_dir))
    assert event["destination"] == str(run_dir / "model.sig") and event["details"]["repo"] == REPO

    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 0, done.output
    held = repo_files(hub)
    assert held["model.sig"] == (run_dir / "model.sig").read_bytes()
    assert json.loads(held["publish_manifest.json"])["signature"] == "model.sig"
    assert "(signed)" in said(done)

    out = tmp_path / "pulled"
    done = cli("pull", REPO, "--endpoint", hub.url, "--out", out, "--trust", public)
    assert done.exit_code == 0, done.output
    assert f"signature verified with {public}" in said(done)
    assert (out / "model.sig").is_file()

    checked = reference_verify(out, public)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Verification succeeded" in checked.stdout

    weights = out / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    checked = reference_verify(out, public)
    assert checked.returncode != 0 and "adapter_model.safetensors" in checked.stderr
    done = cli("verify", out, "--trust", public)
    assert done.exit_code == 2 and "hash mismatch: adapter_model.safetensors" in said(done)


def test_push_signs_with_a_key_from_the_command_line_or_the_recipe(
    run_dir: Path, hub: HubDouble, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url, "--sign-key", private)
    assert done.exit_code == 0, done.output
    assert not (run_dir / "model.sig").exists()  # signed for the push, not left in the run
    # ECDSA signs differently each time; the hub's signature by this key over these files is kept.
    before = commits(hub)
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url, "--sign-key", private)
    assert done.exit_code == 0 and "no change:" in said(done) and commits(hub) == before
    other_private, _ = write_key_pair(tmp_path, "other")
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url, "--sign-key", other_private)
    assert done.exit_code == 0 and commits(hub) == before + 1  # another key: a new signature is published
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url, "--sign-key", private)
    assert done.exit_code == 0 and commits(hub) == before + 2
    assert cli("pull", REPO, "--endpoint", hub.url, "--out", tmp_path / "a", "--trust", public).exit_code == 0

    # hub.signing_key, relative to the folder of the recipe the run was trained from.
    recipes = tmp_path / "recipes"
    (recipes / "keys").mkdir(parents=True)
    other_private, other_public = write_key_pair(recipes / "keys", "release")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["source_path"] = str(recipes / "support.yaml")
    recipe["hub"] = {"repo": "acme/from-recipe", "endpoint": hub.url, "signing_key": "keys/release.pem"}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    done = cli("push", run_dir, "--use-run-hub")
    assert done.exit_code == 0, done.output
    out = tmp_path / "b"
    assert cli("pull", "acme/from-recipe", "--endpoint", hub.url, "--out", out, "--trust", other_public).exit_code == 0
    assert reference_verify(out, other_public).returncode == 0


def test_pull_trust_refuses_an_unsigned_repo_and_a_bad_signature_with_one_line(
    run_dir: Path, hub: HubDouble, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    intruder_private, intruder_public = write_key_pair(tmp_path, "intruder")
    assert cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url).exit_code == 0
    hub.requests.clear()
    done = cli("pull", REPO, "--endpoint", hub.url, "--out", tmp_path / "unsigned", "--trust", public)
    assert done.exit_code == 2 and "not signed, but --trust" in said(done) and said(done).count("error:") == 1
    assert {r["path"].rsplit("/", 1)[-1] for r in hub.requests if r["route"] == "resolve"} == {"publish_manifest.json"}

    assert cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url, "--sign-key", private).exit_code == 0
    done = cli("pull", REPO, "--endpoint", hub.url, "--out", tmp_path / "wrong-key", "--trust", intruder_public)
    assert done.exit_code == 2 and f"model.sig does not verify with {intruder_public}" in said(done)

    # Someone with write access edits the card, lists its new hash and re-signs with their own key...
    held = repo_files(hub)
    card = held["README.md"] + b"\nNow with 98.6% accuracy.\n"
    listing = json.loads(held["publish_manifest.json"])
    for entry in listing["files"]:
        if entry["path"] == "README.md":
            entry["sha256"], entry["bytes"] = hashlib.sha256(card).hexdigest(), len(card)
    forged = tmp_path / "forged"
    forged.mkdir()
    for path, data in held.items():
        if path not in (".gitattributes", "model.sig"):
            (forged / path).write_bytes(data)
    (forged / "README.md").write_bytes(card)
    (forged / "publish_manifest.json").write_bytes(json.dumps(listing).encode())
    hub.commit_files(
        REPO, {"README.md": card, "publish_manifest.json": (forged / "publish_manifest.json").read_bytes()}
    )
    # ...without re-signing, pull --trust sees the files no longer match the signature:
    done = cli("pull", REPO, "--endpoint", hub.url, "--out", tmp_path / "edited", "--trust", public)
    assert done.exit_code == 2 and "does not verify" in said(done) and "changed: README.md" in said(done)
    # ...and re-signed with another key, the signature is not by the trusted key:
    from sovtune.publish.signing import sign_folder

    hub.commit_files(REPO, {"model.sig": sign_folder(forged, intruder_private)})
    done = cli("pull", REPO, "--endpoint", hub.url, "--out", tmp_path / "resigned", "--trust", public)
    assert done.exit_code == 2 and "does not verify" in said(done)
    assert not any((tmp_path / name).exists() for name in ("unsigned", "wrong-key", "edited", "resigned"))


def test_a_signature_made_for_other_files_is_not_pushed(run_dir: Path, hub: HubDouble, keys: tuple[Path, Path]) -> None:
    private, _ = keys
    assert cli("sign", run_dir, "--key", private, "--repo", "acme/elsewhere").exit_code == 0
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 2
    assert "model.sig does not cover what this push publishes (changed: README.md, publish_manifest.json)" in said(done)
    assert hub.requests == []


def test_bad_keys_are_one_line(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    not_a_key = tmp_path / "notes.pem"
    not_a_key.write_text("hello")
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    locked, _ = write_key_pair(tmp_path, "locked", password=b"s3cret-passphrase")
    cases = [
        (tmp_path / "absent.pem", "no such signing key file; create one with `openssl ecparam"),
        (not_a_key, "not a usable signing key"),
        (rsa_key, "not a usable signing key"),
        (locked, "the key is encrypted; export SOVTUNE_SIGNING_KEY_PASSWORD"),
    ]
    for key, message in cases:
        done = cli("sign", run_dir, "--key", key, "--repo", REPO)
        assert done.exit_code == 2 and message in said(done), (key, done.output)
        assert said(done).count("error:") == 1 and "Traceback" not in done.output
        assert not (run_dir / "model.sig").exists()
    monkeypatch.setenv("SOVTUNE_SIGNING_KEY_PASSWORD", "s3cret-passphrase")
    assert cli("sign", run_dir, "--key", locked, "--repo", REPO).exit_code == 0
    done = cli("pull", REPO, "--endpoint", "http://127.0.0.1:9", "--trust", not_a_key, "--out", tmp_path / "p")
    assert done.exit_code == 2 and "not a usable public key" in said(done)


def test_signing_and_verifying_need_no_network(run_dir: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    from sovtune import offline
    from sovtune.publish import publication
    from sovtune.publish.signing import verify_folder

    private, public = keys
    with offline.session(True):
        published = publication.sign_run(run_dir, private, REPO)
        folder = published.write(tmp_path / "published")
        shutil.copy(run_dir / "model.sig", folder / "model.sig")
        verify_folder(folder, public)
        assert offline.refused_attempts() == []
    assert not offline.is_active()


# ---------------------------------------------------------------------------------------------------------------
# Offline mode holds for push, pull and doctor's probe (issue 15, requirement 1)

SOCKET_PROBE = """
import json, os, sys
events = []
def hook(event, args):
    if event in ("socket.getaddrinfo", "socket.connect", "socket.sendto", "socket.sendmsg"):
        where = args[0] if event == "socket.getaddrinfo" else args[-1]
        events.append([event, str(where[0] if isinstance(where, tuple) else where)])
sys.addaudithook(hook)
from sovtune.cli import app
try:
    app(sys.argv[1:])
finally:
    with open(os.environ["SOCKET_EVENTS"], "w") as handle:
        json.dump(events, handle)
"""


def run_with_socket_audit(args: list[Any], env: dict[str, str], events: Path) -> tuple[Any, list[list[str]]]:
    """The command in a fresh interpreter whose audit hook records every name lookup and connect attempt made by
    C code (the socket module's own calls), below anything sovtune or the HTTP client could hide."""
    import os

    environment = {**os.environ, **env, "SOCKET_EVENTS": str(events), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", SOCKET_PROBE, *map(str, args)], capture_output=True, text=True, env=environment
    )
    return done, json.loads(events.read_text())


@pytest.mark.parametrize("source", ["HF_HUB_OFFLINE", "run recipe", "--offline"], ids=["environment", "recipe", "flag"])
def test_offline_push_and_pull_refuse_a_host_not_allowed_with_zero_connection_attempts(
    run_dir: Path, tmp_path: Path, source: str
) -> None:
    endpoint = "https://hub.example.com"  # a real name: a lookup would leave the machine
    env = {"HF_TOKEN": "hf_offline_test_token", "HF_HUB_OFFLINE": "1" if source == "HF_HUB_OFFLINE" else "0"}
    flags = ["--offline"] if source == "--offline" else []
    if source == "run recipe":
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
        recipe["sovereignty"] = {"offline": True, "allowed_hosts": ["hub.internal.example"]}
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    commands = [["push", run_dir, "--repo", REPO, "--endpoint", endpoint, *flags]]
    if source != "run recipe":  # pull has no run recipe
        commands.append(["pull", REPO, "--endpoint", endpoint, "--out", tmp_path / "pulled", *flags])
    for number, command in enumerate(commands):
        done, events = run_with_socket_audit(command, env, tmp_path / f"events-{number}.json")
        assert done.returncode == 2, done.stdout + done.stderr
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        why = {"HF_HUB_OFFLINE": "HF_HUB_OFFLINE is set", "run recipe": "sovereignty.offline: true"}.get(source, source)
        assert len(errors) == 1 and errors[0].startswith(f"error: offline mode ({why}): the hub at https://hub.example")
        assert "--allow-host hub.example.com" in errors[0] and "nothing was sent" in errors[0]
        assert [event for event in events if "example.com" in event[1]] == []
        assert [event for event in events if event[0] != "socket.getaddrinfo"] == []  # no connect at all
    assert not (tmp_path / "pulled").exists()


def test_offline_push_reaches_an_allowed_host_and_refuses_a_storage_host_the_hub_redirects_to(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --allow-host the named hub is reachable; an upload URL the hub hands out on another host is refused by
    the socket guard before any lookup, and nothing is committed."""
    from sovtune import offline

    port = hub.url.rsplit(":", 1)[1]
    hub.upload_base = f"http://storage.internal.example:{port}"
    with offline.session(True):
        real = offline._guard.originals["getaddrinfo"]

        def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:  # stands in for the site's DNS
            internal = host in ("hub.internal.example", "storage.internal.example")
            return real("127.0.0.1" if internal else host, port, *args, **kwargs)

        monkeypatch.setitem(offline._guard.originals, "getaddrinfo", resolve)
        endpoint = f"http://hub.internal.example:{port}"
        done = cli("push", run_dir, "--repo", REPO, "--endpoint", endpoint, "--allow-host", "hub.internal.example")
        assert done.exit_code == 2, done.output
        assert "offline mode refused a connection to storage.internal.example" in said(done)
        assert {attempt.host for attempt in offline.refused_attempts()} == {"storage.internal.example"}
        assert not any(r["route"] in ("lfs_upload", "commit") for r in hub.requests)
        assert any(r["route"] == "lfs_batch" for r in hub.requests)  # the allowed hub was reached

        flags = ["--allow-host", "hub.internal.example", "--allow-host", "storage.internal.example"]
        done = cli("push", run_dir, "--repo", REPO, "--endpoint", endpoint, *flags)
        assert done.exit_code == 0, done.output
    assert not offline.is_active()


def test_push_and_pull_contact_nothing_but_the_hub(
    run_dir: Path, hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard as a sensor (loopback only): it records attempts a library catches and hides, such as the
    client's telemetry asking the public hub for its "agent harnesses" while building request headers."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    from sovtune import offline

    # The client caches that list per process and on disk: start from neither, as a fresh process would.
    monkeypatch.setattr(_detect_agent, "_registry", None)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "no-cached-harnesses.json"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    with offline.session(True):
        assert cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url).exit_code == 0
        assert cli("pull", REPO, "--endpoint", hub.url, "--out", tmp_path / "pulled").exit_code == 0
        assert cli("doctor", "--endpoint", hub.url).exit_code == 0
        assert offline.refused_attempts() == []


def test_offline_mode_moves_files_over_lfs_only(run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    """Xet's transfers run in Rust on sockets the guard cannot see: offline, they are never tried."""
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url, "--offline")
    assert done.exit_code == 0, done.output
    assert not any(r["route"] == "xet_token" for r in hub.requests)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0")
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url, "--offline")
    assert done.exit_code == 2 and "offline mode and HF_HUB_DISABLE_XET=0 do not go together" in said(done)


def test_doctor_probes_only_a_hub_it_was_given_and_honours_offline_mode(
    hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sovtune import doctor, offline

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    rows = {row.item: row for row in doctor.diagnose()}
    assert rows["hub endpoint"].value.startswith("not set: not probed") and hub.requests == []

    rows = {row.item: row for row in doctor.diagnose(endpoint=hub.url)}
    assert rows["hub endpoint"].status == "ok" and "token is accepted (user alice)" in rows["hub endpoint"].value
    monkeypatch.setenv("HF_TOKEN", "hf_unknown_token_value")
    rows = {row.item: row for row in doctor.diagnose(endpoint=hub.url)}
    assert "token was rejected (401)" in rows["hub endpoint"].value
    assert "hf_unknown_token_value" not in str(rows)

    with offline.session(True):
        rows = {row.item: row for row in doctor.diagnose(endpoint="https://hub.example.com")}
        shown = rows["hub endpoint"].value
        assert shown.endswith(
            "not contacted: offline mode allows loopback and the allow-list only (--allow-host hub.example.com)"
        )
        assert rows["offline mode"].value == "on: loopback only" and offline.refused_attempts() == []
    done = cli("doctor", "--endpoint", hub.url, "--offline", "--allow-host", "hub.internal.example")
    assert done.exit_code == 0, done.output
    assert not offline.is_active()


# ---------------------------------------------------------------------------------------------------------------
# The audit log of hub events (issue 15, requirement 6)


def test_every_hub_event_is_audited_with_its_endpoint_run_and_destination(
    run_dir: Path, hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SOVTUNE_AUDIT_LOG", str(log))
    monkeypatch.chdir(tmp_path)
    assert cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url).exit_code == 0
    assert cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url).exit_code == 0  # nothing changed
    assert cli("pull", REPO, "--endpoint", hub.url, "--out", "pulled").exit_code == 0  # a relative destination
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token_this_hub_knows")
    assert cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url).exit_code == 2
    assert cli("pull", REPO, "--endpoint", hub.url, "--out", "again").exit_code == 2

    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["outcome"]) for e in events] == [
        ("push", "ok"), ("push", "ok"), ("pull", "ok"), ("push", "failed"), ("pull", "failed"),
    ]  # fmt: skip
    pushes = [e for e in events if e["event"] == "push"]
    for event in pushes:
        assert event["destination"].startswith(f"{hub.url}/{REPO}") and event["details"]["endpoint"] == hub.url
        assert event["run_dir"] == str(run_dir) and event["recipe"] == str(run_dir / "recipe.yaml")
    assert pushes[0]["details"]["change"] == "published" and pushes[0]["details"]["uploaded"] > 0
    assert pushes[1]["details"]["change"] == "no change" and pushes[1]["details"]["uploaded"] == 0
    assert pushes[1]["destination"] == pushes[0]["destination"]  # the same commit
    assert "rejected the token (401" in pushes[2]["error"]
    pulls = [e for e in events if e["event"] == "pull"]
    assert pulls[0]["destination"] == str(tmp_path / "pulled") and pulls[1]["destination"] == str(tmp_path / "again")
    assert all(e["details"]["endpoint"] == hub.url for e in pulls)
    assert pulls[0]["details"]["source"].startswith(f"{hub.url}/{REPO}@")
    assert "hf_not_a_token_this_hub_knows" not in log.read_text() and hub.write_token not in log.read_text()


@pytest.mark.slow
def test_run_with_hub_push_publishes_after_its_gates_through_the_same_push(
    make_recipe: Any, hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sovtune run` with hub.push: train, evaluate, then the same audited push as `sovtune push` (offline here, as
    the recipe says, with the hub's host allowed)."""
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SOVTUNE_AUDIT_LOG", str(log))
    recipe = make_recipe(
        "published",
        eval={"generation": {"max_new_tokens": 8}},
        hub={"repo": REPO, "endpoint": hub.url, "push": True},
        sovereignty={"offline": True, "allowed_hosts": ["127.0.0.1"]},
    )
    done = cli("run", recipe)
    assert done.exit_code == 0, done.output
    run_dir = tmp_path / "runs" / "published"
    held = repo_files(hub)
    assert json.loads(held["report.json"])["results"] and json.loads(held["report.json"])["samples"] == []
    assert set(held) >= {"adapter_model.safetensors", "publish_manifest.json", "README.md", "manifest.json"}
    event = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert (event["event"], event["outcome"], event["run_dir"]) == ("push", "ok", str(run_dir))
    assert event["details"]["endpoint"] == hub.url and event["details"]["offline"] is True


# ---------------------------------------------------------------------------------------------------------------
# A run folder someone sent: it decides nothing about where the token goes, and never publishes a pickle


def record_in_manifest(run_dir: Path, *relative: str) -> None:
    """Record files of the run in its manifest, as the author of a hostile folder would."""
    from sovtune.run import manifest

    manifest.append_stage(run_dir, "forged", {}, [run_dir / path for path in relative])


@pytest.fixture
def elsewhere(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A second hub double on 127.0.0.1: the server a received run folder names in its recipe.yaml."""
    double = HubDouble(lfs_threshold=LFS_THRESHOLD).start()
    yield double
    double.stop()


def test_a_received_run_does_not_choose_where_the_token_goes(
    run_dir: Path, hub: HubDouble, elsewhere: HubDouble, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("SOVTUNE_AUDIT_LOG", str(log))
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["hub"] = {"repo": "their/collector", "endpoint": elsewhere.url, "private": False, "include_examples": True}
    recipe["source_path"] = str(tmp_path / "theirs.yaml")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")

    # Nothing on the command line or in the environment: refused, naming what the run asks for and the way to agree.
    done = cli("push", run_dir)
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert done.output.count("\n") <= 3, done.output
    assert f"names hub.repo their/collector, hub.endpoint {elsewhere.url}" in said(done)
    assert "--use-run-hub" in said(done) and "--repo ORG/NAME" in said(done)
    done = cli("push", run_dir, "--repo", REPO)  # still no endpoint of the user's own
    assert done.exit_code == 2 and "--endpoint URL (or export HF_ENDPOINT)" in said(done)
    assert elsewhere.requests == [] and hub.requests == []

    # The user's endpoint (environment) and repository (flag): the run's endpoint, visibility and examples are unused.
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    done = cli("push", run_dir, "--repo", REPO)
    assert done.exit_code == 0, done.output
    assert elsewhere.requests == [] and hub.repos[REPO].private is True
    assert json.loads(repo_files(hub)["report.json"])["samples"] == []
    assert "not used from" in said(done) and f"hub.endpoint: {elsewhere.url}" in said(done)

    # Only when the user says so does the run's recipe pick the hub.
    monkeypatch.delenv("HF_ENDPOINT")
    elsewhere.write_token = elsewhere.add_token("alice", "write")
    monkeypatch.setenv("HF_TOKEN", elsewhere.write_token)
    done = cli("push", run_dir, "--use-run-hub")
    assert done.exit_code == 0, done.output
    assert elsewhere.repos["their/collector"].private is False and elsewhere.requests
    assert HELD_OUT_PROMPT.encode() in elsewhere.file_bytes("their/collector", "report.json")
    pushes = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["outcome"], e["details"].get("hub_settings")) for e in pushes] == [
        ("failed", "flags"), ("failed", "flags"), ("ok", "flags"), ("ok", "the run's recipe (--use-run-hub)"),
    ]  # fmt: skip


def test_push_never_publishes_pickle_weights_even_when_the_manifest_records_them(run_dir: Path, hub: HubDouble) -> None:
    (run_dir / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04pickle that runs code")
    record_in_manifest(run_dir, "adapter/adapter_model.bin")
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 2 and "Traceback" not in done.output
    assert "adapter/adapter_model.bin: pickle weights are never published" in said(done)

    # Only the pickle, and a manifest that records only the pickle: the same refusal.
    (run_dir / "adapter" / "adapter_model.safetensors").unlink()
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))

    def without_safetensors(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: without_safetensors(value) for key, value in node.items()}
        if isinstance(node, list):
            kept = [
                item
                for item in node
                if not (isinstance(item, dict) and item.get("path") == "adapter/adapter_model.safetensors")
            ]
            return [without_safetensors(item) for item in kept]
        return node

    (run_dir / "manifest.json").write_text(json.dumps(without_safetensors(manifest)), encoding="utf-8")
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 2 and "adapter/adapter_model.bin: pickle weights are never published" in said(done)
    assert hub.requests == []


def test_pull_refuses_a_publication_listing_pickle_weights_before_downloading_them(
    run_dir: Path, hub: HubDouble, tmp_path: Path
) -> None:
    assert cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url).exit_code == 0
    pickle = b"\x80\x04pickle that runs code"
    listing = json.loads(hub.file_bytes(REPO, "publish_manifest.json"))
    entry = {"path": "adapter_model.bin", "sha256": hashlib.sha256(pickle).hexdigest(), "bytes": len(pickle)}
    listing["files"] = sorted([*listing["files"], entry], key=lambda item: item["path"])
    hub.commit_files(REPO, {"adapter_model.bin": pickle, "publish_manifest.json": json.dumps(listing).encode()})
    before = len(hub.requests)
    done = cli("pull", REPO, "--endpoint", hub.url, "--out", tmp_path / "pulled")
    assert done.exit_code == 2 and "adapter_model.bin: pickle weights" in said(done)
    assert not (tmp_path / "pulled").exists()
    assert not any(r["path"].endswith("adapter_model.bin") for r in hub.requests[before:])


def _set_report(run_dir: Path, change: Any) -> None:
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    change(report)
    (run_dir / "report.json").write_text(json.dumps(report), encoding="utf-8")
    record_in_manifest(run_dir, "report.json")  # the hostile folder's manifest agrees with it


def _set_manifest(run_dir: Path, change: Any) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    change(manifest)
    (run_dir / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _set_recipe(run_dir: Path, change: Any) -> None:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    change(recipe)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda run: _set_report(run, lambda r: r["results"][0].update(base=[0.1, 0.2])),
         "report.json: results.0.base: input should be a valid number, found list"),
        (lambda run: _set_report(run, lambda r: r.update(gates={"gate": "x"})),
         "report.json: gates: input should be a valid list, found dict"),
        (lambda run: _set_manifest(run, lambda m: m.update(base_model=["x"])),
         "manifest.json: base_model: input should be a valid dictionary, found list"),
        (lambda run: _set_manifest(run, lambda m: m.setdefault("environment", {}).update(hardware={"cpu_count": [2]})),
         "manifest.json: environment.hardware.cpu_count: input should be a valid integer, found list"),
        (lambda run: _set_recipe(run, lambda r: r["model"].update(revision=["main"])),
         "recipe.yaml: model.revision: input should be a valid string, found list"),
    ],
)  # fmt: skip
def test_the_card_type_checks_what_it_reads_from_a_received_run(
    run_dir: Path, hub: HubDouble, edit: Any, where: str
) -> None:
    edit(run_dir)
    done = cli("push", run_dir, "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 2 and "Traceback" not in done.output, done.output
    assert where in said(done) and "restore it" in said(done)
    assert hub.requests == []
