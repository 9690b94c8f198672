"""Push and pull through the real huggingface_hub client against the hub double on 127.0.0.1 (tests/hub_server.py)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import invoke, make_run, qa_rows, write_jsonl
from hub_server import HubDouble

REPO = "acme/support-adapter"
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
    report = Report(run="support", base_model={"name_or_path": str(tiny_model_dir)}, adapter="adapter", settings={},
                    results=[result], gates=[], samples=[], notes={}, timing={})  # fmt: skip
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


def published(run_dir: Path) -> dict[str, bytes]:
    """What a push must put in the repository: path in repo -> bytes."""
    files = {
        p.relative_to(run_dir / "adapter").as_posix(): p.read_bytes()
        for p in (run_dir / "adapter").rglob("*")
        if p.is_file()
    }
    files.pop("README.md", None)  # peft's placeholder card is replaced by ours
    files.update({name: (run_dir / name).read_bytes() for name in ("report.json", "manifest.json")})
    return files


def push_error(run_dir: Path, hub: HubDouble, **kwargs: Any) -> str:
    from sovtune.publish.hub import HubError, push

    with pytest.raises(HubError) as caught:
        push(run_dir, kwargs.pop("repo_id", REPO), endpoint=kwargs.pop("endpoint", hub.url), **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for token in hub.tokens:
        assert token not in message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Round trip


def test_push_creates_a_private_repo_and_pull_returns_every_file_byte_identical(
    run_dir: Path, hub: HubDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sovtune.publish.card import build_card
    from sovtune.publish.hub import pull, push

    caplog.set_level(logging.INFO, logger="sovtune")
    result = push(run_dir, REPO, endpoint=hub.url)
    lines = caplog.messages

    repo = hub.repos[REPO]
    assert repo.private is True and result.private is True
    expected = published(run_dir)
    assert set(repo.commit_for("main").files) == set(expected) | {"README.md", ".gitattributes"}
    for path, data in expected.items():
        assert hub.file_bytes(REPO, path) == data, path
    # Large or binary files went through LFS: the batch API, then a PUT to the pre-signed URL without credentials.
    assert hub.is_lfs(REPO, "adapter_model.safetensors") and hub.is_lfs(REPO, "tokenizer.json")
    assert not hub.is_lfs(REPO, "adapter_config.json")
    uploads = [r for r in hub.requests if r["route"] == "lfs_upload"]
    assert len(uploads) == 2 and not any(r["authorized"] for r in uploads)
    # One commit on top of the repository's initial commit; the card was validated by the hub first.
    commit = repo.commits[repo.branches["main"]]
    assert commit.oid == result.commit and repo.commits[commit.parent].parent is None
    assert any(r["route"] == "validate_yaml" for r in hub.requests)
    assert hub.file_bytes(REPO, "README.md") == str(build_card(run_dir, REPO, revision="main")).encode()
    assert any("no Xet storage" in line for line in lines)  # fell back to LFS by itself

    out = tmp_path / "pulled"
    pulled = pull(REPO, endpoint=hub.url, out=out)
    assert pulled.commit == result.commit
    for path, data in expected.items():
        local = out / path if path in ("report.json", "manifest.json") else out / "adapter" / path
        assert local.read_bytes() == data, path
    assert (out / "README.md").read_bytes() == hub.file_bytes(REPO, "README.md")
    assert "adapter/adapter_model.safetensors" in pulled.verified and "report.json" in pulled.verified
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


def test_the_token_is_in_no_published_or_written_file_and_no_log(
    run_dir: Path, hub: HubDouble, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from sovtune.publish.hub import pull, push

    caplog.set_level(logging.DEBUG)
    push(run_dir, REPO, endpoint=hub.url)
    out = pull(REPO, endpoint=hub.url, out=tmp_path / "pulled").out_dir
    lines = caplog.messages
    token = hub.write_token.encode()
    repo = hub.repos[REPO]
    assert all(token not in hub.file_bytes(REPO, path) for path in repo.commit_for("main").files)
    assert all(token not in path.read_bytes() for path in [*out.rglob("*"), *run_dir.rglob("*")] if path.is_file())
    captured = capfd.readouterr()
    assert hub.write_token not in captured.out + captured.err + caplog.text + "\n".join(lines)


def test_pulled_adapter_loads_with_peft_and_keeps_the_chat_template(
    run_dir: Path, hub: HubDouble, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    from sovtune.publish.hub import pull, push

    push(run_dir, REPO, endpoint=hub.url)
    out = pull(REPO, endpoint=hub.url, out=tmp_path / "pulled").out_dir
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert model.peft_config["default"].r == 4
    assert (
        AutoTokenizer.from_pretrained(out / "adapter").chat_template
        == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    )


def test_second_push_of_the_same_run_makes_no_new_commit(run_dir: Path, hub: HubDouble) -> None:
    from sovtune.publish.hub import push

    first = push(run_dir, REPO, endpoint=hub.url)
    second = push(run_dir, REPO, endpoint=hub.url)  # create answers 409 + url: the client treats it as "exists"
    assert second.commit == first.commit
    assert [r["status"] for r in hub.requests if r["route"] == "create"] == [200, 409]


def test_push_to_a_branch_creates_it_and_leaves_main_alone(run_dir: Path, hub: HubDouble, tmp_path: Path) -> None:
    from sovtune.publish.hub import pull, push

    result = push(run_dir, REPO, endpoint=hub.url, revision="release")
    repo = hub.repos[REPO]
    assert repo.branches["release"] == result.commit
    assert set(repo.commit_for("main").files) == {".gitattributes"}
    assert pull(REPO, endpoint=hub.url, revision="release", out=tmp_path / "pulled").commit == result.commit


def test_public_only_when_asked_and_an_existing_public_repo_is_refused_for_a_private_push(
    run_dir: Path, hub: HubDouble
) -> None:
    from sovtune.publish.hub import push

    assert push(run_dir, REPO, endpoint=hub.url, private=False).private is False
    assert hub.repos[REPO].private is False
    message = push_error(run_dir, hub)
    assert "exists on" in message and "is public" in message and "--public" in message


def test_push_honours_hf_hub_disable_xet_set_after_import(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub  # noqa: F401  (imported long before the variable is set)
    from huggingface_hub import constants

    from sovtune.publish.hub import push

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    before = constants.HF_HUB_DISABLE_XET
    push(run_dir, REPO, endpoint=hub.url)
    assert not any(r["route"] == "xet_token" for r in hub.requests)
    assert constants.HF_HUB_DISABLE_XET == before  # the client's switches are restored


def test_push_works_while_the_hub_libraries_are_offline(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from sovtune.publish.hub import push

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    push(run_dir, REPO, endpoint=hub.url)
    assert constants.HF_HUB_OFFLINE is True


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
    from sovtune.publish.hub import push

    hub.fail("create", 503, times=1)
    hub.fail("commit", 502, times=2)
    caplog.set_level(logging.INFO, logger="sovtune")
    result = push(run_dir, REPO, endpoint=hub.url)
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
# Pull


def test_pull_refuses_files_that_do_not_match_the_manifest_and_writes_nothing(
    run_dir: Path, hub: HubDouble, tmp_path: Path
) -> None:
    from sovtune.publish.hub import HubError, pull, push

    push(run_dir, REPO, endpoint=hub.url)
    hub.commit_files(REPO, {"adapter_model.safetensors": b"not the trained weights"})
    out = tmp_path / "pulled"
    with pytest.raises(
        HubError, match="files do not match manifest.json \\(hash mismatch: adapter/adapter_model.safetensors\\)"
    ):
        pull(REPO, endpoint=hub.url, out=out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pull_errors(run_dir: Path, hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sovtune.publish.hub import HubError, pull, push

    with pytest.raises(HubError, match="acme/missing is not on .* \\(404\\)"):
        pull("acme/missing", endpoint=hub.url, out=tmp_path / "a")
    push(run_dir, REPO, endpoint=hub.url)
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


def test_pull_needs_a_manifest(hub: HubDouble, tmp_path: Path) -> None:
    from sovtune.publish.hub import HubError, pull

    hub.create_repo(REPO, private=True)
    hub.commit_files(REPO, {"adapter_config.json": b"{}"})
    with pytest.raises(HubError, match="no manifest.json, so the adapter cannot be verified"):
        pull(REPO, endpoint=hub.url, out=tmp_path / "pulled")


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_push_and_pull_exit_codes(
    run_dir: Path, hub: HubDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = invoke("push", str(run_dir), "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 0, done.output
    assert hub.repos[REPO].private is True

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # pull takes the endpoint from the environment
    done = invoke("pull", REPO, "--out", str(tmp_path / "pulled"))
    assert done.exit_code == 0, done.output
    assert (tmp_path / "pulled" / "adapter" / "adapter_model.safetensors").is_file()

    hub.commit_files(REPO, {"adapter_config.json": b"{}"})
    done = invoke("pull", REPO, "--out", str(tmp_path / "tampered"))
    assert done.exit_code == 2 and "hash mismatch: adapter/adapter_config.json" in done.output
    assert not (tmp_path / "tampered").exists()

    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    done = invoke("push", str(run_dir), "--repo", "acme/other")
    assert done.exit_code == 2 and "403" in done.output and hub.read_token not in done.output
    assert done.output.count("\n") <= 2  # one error line (wrapped at most once by the terminal width)


def test_cli_push_takes_repo_endpoint_and_visibility_from_the_runs_recipe(run_dir: Path, hub: HubDouble) -> None:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["hub"] = {"repo": "acme/from-recipe", "endpoint": hub.url, "private": False}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    done = invoke("push", str(run_dir))
    assert done.exit_code == 0, done.output
    assert hub.repos["acme/from-recipe"].private is False


def test_preflight_of_push_settings_and_a_bad_hub_section_in_the_run(
    run_dir: Path, hub: HubDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sovtune.config import HubSection
    from sovtune.publish.hub import HubError, check_push_settings, run_hub_settings

    check_push_settings(HubSection())  # nothing to publish, nothing to check
    check_push_settings(HubSection(repo=REPO, endpoint=hub.url, push=True))
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
