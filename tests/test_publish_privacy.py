"""Nothing private leaves by default (issue 15, requirement 4): a real evaluated run, trained under a home folder, user
and host name made distinctive for the test, is pushed to the hub double; then every pushed byte is searched."""

from __future__ import annotations

import json
import platform
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from helpers import invoke, make_run, qa_rows, write_jsonl
from hub_server import HubDouble

USER = "quokka-tester-5e1f"
HOST = "buildhost-7c2d9a.corp.internal"
REPO = "acme/private-check"


def held_out_rows() -> list[dict[str, Any]]:
    """Held-out questions and references that occur nowhere else (not in training data, vocabulary or code)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is the quokka payroll code of unit {n} in Wombat county?"},
                {"role": "assistant", "content": f"QUOKKA-{n}-ZEBRA-PAYROLL"},
            ]
        }
        for n in range(101, 105)
    ]


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, Any]]:
    """An evaluated run whose base, data, recipe and run folder all live under a home folder named after the user,
    made while the process believes it runs on HOST as USER."""
    import torch

    from sovtune.evaluation import HeldOut, evaluate

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("homes") / USER
    project = home / "projects" / "support"
    project.mkdir(parents=True)
    base = shutil.copytree(tiny_model_dir, home / "models" / "tiny-base")
    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(home))
    for name in ("USER", "LOGNAME"):
        patch.setenv(name, USER)
    patch.setattr(socket, "gethostname", lambda: HOST)
    patch.setattr(platform, "node", lambda: HOST)
    patch.chdir(project)
    try:
        eval_file = write_jsonl(project / "heldout.jsonl", held_out_rows())
        train_file = write_jsonl(project / "train.jsonl", qa_rows(16))
        recipe_path = project / "support.yaml"
        recipe_path.write_text(
            yaml.safe_dump(
                {
                    "name": "support",
                    "model": {"name_or_path": str(base), "license": "apache-2.0"},
                    "adapter": {"r": 4},
                    "data": {"train": str(train_file), "eval": str(eval_file), "max_length": 64},
                    "eval": {"generation": {"max_new_tokens": 8}, "samples": 4},
                    "output": {"dir": str(project / "runs" / "support")},
                }
            ),
            encoding="utf-8",
        )
        recipe = make_run(recipe_path)
        evaluate(recipe, run_dir=recipe.run_dir, held_out=HeldOut.from_run(recipe.run_dir))
        yield {"home": home, "run_dir": recipe.run_dir, "base": base, "patch": patch}
    finally:
        patch.undo()


@pytest.fixture
def hub(machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubDouble]:
    from huggingface_hub import constants

    double = HubDouble(lfs_threshold=8 * 1024).start()
    monkeypatch.setenv("HF_TOKEN", double.add_token("alice", "write"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    yield double
    double.stop()


def pushed_bytes(hub: HubDouble) -> dict[str, bytes]:
    """Every file at the head of main, LFS objects resolved to their content."""
    commit = hub.repos[REPO].commit_for("main")
    return {path: hub.file_bytes(REPO, path) for path in commit.files}


def push(run_dir: Path, hub: HubDouble, *flags: str) -> Any:
    done = invoke("push", str(run_dir), "--repo", REPO, "--endpoint", hub.url, *flags)
    assert done.exit_code == 0, done.output
    return done


def test_no_held_out_example_local_path_user_or_host_name_in_any_pushed_byte(
    machine: dict[str, Any], hub: HubDouble
) -> None:
    run_dir = machine["run_dir"]
    local_report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    predictions = [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").read_text().splitlines()]
    # The run itself holds all of it: the test could fail.
    assert local_report["samples"] and str(machine["home"]) in (run_dir / "manifest.json").read_text()
    assert str(machine["base"]) in (run_dir / "adapter" / "adapter_config.json").read_text()

    push(run_dir, hub)
    files = pushed_bytes(hub)
    assert "eval_predictions.jsonl" not in files and "report.md" not in files
    forbidden = [str(machine["home"]), USER, HOST, str(Path.cwd())]
    for row in held_out_rows():
        forbidden += [message["content"] for message in row["messages"]]
    # Predictions long enough not to occur by chance (the tiny model's answers are often a few sub-words).
    forbidden += [text for record in predictions for text in record["predictions"].values() if len(text.strip()) >= 12]
    for path, data in files.items():
        for text in forbidden:
            assert text.encode("utf-8") not in data, f"{path} carries {text!r}"
    published = json.loads(files["report.json"])
    assert published["samples"] == []
    # The most frequent answer per dataset is a prediction too: its count is published, its text is not.
    frequent = {name: outputs["most_frequent"] for name, outputs in local_report["outputs"].items()}
    assert frequent and all(entry["text"] is not None for entry in frequent.values())
    assert {name: outputs["most_frequent"] for name, outputs in published["outputs"].items()} == {
        name: {"text": None, "count": entry["count"]} for name, entry in frequent.items()
    }
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "tiny-base"
    assert "`tiny-base`" in files["README.md"].decode()


def test_include_examples_publishes_the_samples_and_says_so(machine: dict[str, Any], hub: HubDouble) -> None:
    run_dir = machine["run_dir"]
    done = push(run_dir, hub, "--include-examples")
    samples = json.loads(pushed_bytes(hub)["report.json"])["samples"]
    local = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))["samples"]
    assert [(s["prompt"], s["reference"], s["predictions"]) for s in samples] == [
        (s["prompt"], s["reference"], s["predictions"]) for s in local
    ]
    # Their origins still lose the local folder: examples opt in, paths do not.
    assert [s["origin"] for s in samples] == [Path(s["origin"]).name for s in local]
    local_outputs = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))["outputs"]
    assert json.loads(pushed_bytes(hub)["report.json"])["outputs"] == local_outputs
    assert "not published" not in done.output
    listing = json.loads(pushed_bytes(hub)["publish_manifest.json"])
    changes = next(entry for entry in listing["files"] if entry["path"] == "report.json")["derived_from"]["changes"]
    assert not any("withheld" in change for change in changes)


def test_a_local_path_the_public_forms_miss_is_refused_before_anything_is_sent(
    machine: dict[str, Any], hub: HubDouble, tmp_path: Path
) -> None:
    """The last line of defence: a file that would still carry the home folder is not published at all."""
    from sovtune.run import manifest

    run_dir = Path(shutil.copytree(machine["run_dir"], tmp_path / "run"))
    chat_template = run_dir / "adapter" / "chat_template.jinja"
    chat_template.write_text(chat_template.read_text() + f"{{# built in {machine['home']}/work #}}")
    manifest.append_stage(run_dir, "train", {}, [chat_template])  # recorded, so only the privacy check objects
    done = invoke("push", str(run_dir), "--repo", REPO, "--endpoint", hub.url)
    assert done.exit_code == 2
    said = " ".join(done.output.split())
    assert f"chat_template.jinja would publish the local path '{machine['home']}'" in said
    assert hub.requests == []


def test_base_model_name_or_path_is_the_hub_id_of_a_hub_base(tmp_path: Path) -> None:
    from sovtune.publish.card import base_model_facts, public_base_name

    hub_base = base_model_facts({}, {"base_model": {"name_or_path": "mistralai/Mistral-7B-v0.3", "local": False}})
    assert public_base_name(hub_base) == "mistralai/Mistral-7B-v0.3"
    local = base_model_facts({}, {"base_model": {"name_or_path": "/home/ana/models/llama-8b/", "local": True}})
    assert public_base_name(local) == "llama-8b"
    relative = base_model_facts({"model": {"name_or_path": "../data/base-model"}}, None)
    assert public_base_name(relative) == "base-model"
