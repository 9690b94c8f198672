"""A run folder is data (issue 14): no command runs code or unpickles anything because of what a run folder, a
bundle or a checkpoint contains, and export/verify never follow a symbolic link nor pack or accept an unrecorded
file. Each hostile folder carries a payload that writes a marker file; the marker must never appear.

The hostile folders come with a forged manifest (a manifest is a record, not a signature: whoever builds a folder can
write one), so every defence is tested on its own, not only behind `sovtune verify`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from helpers import declare_remote_code, invoke, make_run, run_cli, write_recipe


class Payload:
    """Unpickling this writes the marker: what a malicious .bin/.pt does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> Any:
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def error_line(result: Any) -> str:
    """The one `error:` line of a failed command (nothing else on stderr but progress bars), exit code 2."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.replace("\r", "\n").split("\n") if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and all("%|" in line for line in lines if line not in errors), result.stderr
    return errors[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def forge_manifest(run_dir: Path) -> None:
    """Record the run's files as they are now, as the author of a hostile folder would: entries of files that are
    gone are dropped, every other file (links read through) gets a fresh entry in a last stage."""
    manifest = json.loads((run_dir / "manifest.json").read_text())

    def keep(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("root") == "run" and "sha256" in node and not (run_dir / node["path"]).exists():
                return None
            return {key: keep(value) for key, value in node.items()}
        if isinstance(node, list):
            return [kept for kept in (keep(item) for item in node) if kept is not None]
        return node

    manifest = keep(manifest)
    files = [
        {"path": rel, "root": "run", "sha256": sha256(path), "bytes": path.stat().st_size}
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
        and (rel := path.relative_to(run_dir).as_posix()) != "manifest.json"
        and not any(part.startswith(".") for part in rel.split("/"))
    ]
    manifest["stages"].append({"stage": "forged", "files": files})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def set_recipe(run_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    change(recipe)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


@pytest.fixture(scope="module")
def sent_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `sovtune train` leaves it (adapter, recipe, manifest), the raw material of each attack."""
    folder = tmp_path_factory.mktemp("sent")
    recipe = write_recipe(folder, tiny_model_dir, name="sent", eval={"samples": 1, "generation": {"max_new_tokens": 2}})
    return make_run(recipe).run_dir


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture
def received(sent_run: Path, tmp_path: Path) -> Callable[[str], Path]:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(sent_run, tmp_path / name))

    return copy


REMOTE_MODELING = """
from pathlib import Path
from transformers import LlamaForCausalLM
from .configuration_tiny import TinyConfig

Path({marker!r}).write_text("remote code ran")


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
"""


def remote_code_model(tiny_model_dir: Path, folder: Path, marker: Path) -> Path:
    """The tiny model declared as custom code (auto_map) whose module writes the marker when imported."""
    shutil.copytree(tiny_model_dir, folder)
    configuration = (
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'sovtune_tiny'\n"
    )
    return declare_remote_code(folder, configuration, REMOTE_MODELING.format(marker=str(marker)))


def run_commands(run_dir: Path, tmp_path: Path) -> dict[str, list[Any]]:
    """The commands that load a run's model, with the arguments each needs."""
    return {
        "generate": ["generate", run_dir, "--prompt", "hi", "--max-new-tokens", "2"],
        "chat": ["chat", run_dir, "--max-new-tokens", "2"],
        "eval": ["eval", run_dir],
        "merge": ["merge", run_dir, tmp_path / "merged"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Settings in a received recipe: code runs only when the command line opts in


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "merge"])
def test_remote_code_in_a_received_recipe_needs_the_flag(
    command: str, received: Callable[[str], Path], tiny_model_dir: Path, tmp_path: Path, marker: Path
) -> None:
    run_dir = received("remote")
    model = remote_code_model(tiny_model_dir, tmp_path / "remote-model", marker)
    set_recipe(run_dir, lambda r: r["model"].update(trust_remote_code=True, name_or_path=str(model)))
    forge_manifest(run_dir)
    line = error_line(invoke(*run_commands(run_dir, tmp_path)[command], input="y\nhello\n"))
    assert f"{run_dir / 'recipe.yaml'}: model.trust_remote_code: true would run code shipped with the model" in line
    assert "pass --trust-remote-code" in line
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_the_flag_lets_the_received_recipe_run_its_model_code(
    received: Callable[[str], Path], tiny_model_dir: Path, tmp_path: Path, marker: Path
) -> None:
    """The other side: with --trust-remote-code the same folder runs (the marker test above can fail)."""
    run_dir = received("remote")
    model = remote_code_model(tiny_model_dir, tmp_path / "remote-model", marker)
    set_recipe(run_dir, lambda r: r["model"].update(trust_remote_code=True, name_or_path=str(model)))
    forge_manifest(run_dir)
    done = run_cli(
        "generate", run_dir, "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code",
        env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "remote code ran"


USER_METRIC = """
from pathlib import Path

Path({marker!r}).write_text("user metric ran")


def score(prediction, reference, row):
    return 1.0
"""


def test_user_metrics_of_a_received_recipe_need_the_flag(
    received: Callable[[str], Path], tmp_path: Path, marker: Path
) -> None:
    run_dir = received("metrics")
    (run_dir / "metric.py").write_text(USER_METRIC.format(marker=str(marker)))
    user = {"name": "planted", "module": str(run_dir / "metric.py"), "function": "score"}
    set_recipe(run_dir, lambda r: r["eval"]["datasets"][0].update(user_metrics=[user]))
    forge_manifest(run_dir)
    line = error_line(invoke("eval", run_dir))
    assert "eval.datasets[0].user_metrics" in line and "would import and run these Python files" in line
    assert "pass --allow-user-metrics" in line and not marker.exists()
    assert not (run_dir / "report.json").exists()
    # Commands that compute no metric never import them: generate runs.
    generated = invoke("generate", run_dir, "--prompt", "hi", "--max-new-tokens", "2")
    assert generated.exit_code == 0, generated.output
    assert not marker.exists()
    # Opted in, the metric runs and scores.
    allowed = invoke("eval", run_dir, "--allow-user-metrics")
    assert allowed.exit_code == 0, allowed.output
    assert marker.read_text() == "user metric ran"
    assert "planted" in (run_dir / "report.md").read_text()


def test_a_users_own_recipe_keeps_its_settings(received: Callable[[str], Path], tmp_path: Path) -> None:
    """`--recipe` names the user's own recipe: its settings apply without flags, as for train, run and check."""
    from sovtune.config import load_run_recipe

    run_dir = received("own")
    own = tmp_path / "own.yaml"
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["model"]["trust_remote_code"] = True
    own.write_text(yaml.safe_dump(recipe))
    assert load_run_recipe(run_dir, recipe_path=own, evaluates=True).model.trust_remote_code is True


def test_a_received_recipe_is_not_interpolated_and_has_no_extends(
    received: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its values were resolved when the run started: a ${VAR} in it stays text (a run folder must not pull this
    machine's secrets into its fields), and extends is refused."""
    from sovtune.config import load_run_recipe

    token = "hf_sovtunePLANTEDtoken0123456789abcdefghijklmnop"
    monkeypatch.setenv("HF_TOKEN", token)
    run_dir = received("env")
    set_recipe(run_dir, lambda r: r.update(description="sent by ${HF_TOKEN}"))
    assert load_run_recipe(run_dir).description == "sent by ${HF_TOKEN}"
    forge_manifest(run_dir)
    result = invoke("eval", run_dir)
    assert result.exit_code == 0, result.output
    assert token not in result.output
    assert not [p for p in run_dir.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    set_recipe(run_dir, lambda r: r.update(extends=str(tmp_path / "other.yaml")))
    forge_manifest(run_dir)
    line = error_line(invoke("generate", run_dir, "--prompt", "hi"))
    assert "a run's recorded recipe is already resolved and has no extends" in line


# ---------------------------------------------------------------------------------------------------------------
# Safetensors only: adapters, shards an index names, the weights file config.json names


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "merge"])
def test_a_pickle_adapter_is_refused(
    command: str, received: Callable[[str], Path], tmp_path: Path, marker: Path
) -> None:
    run_dir = received("pickled")
    (run_dir / "adapter" / "adapter_model.safetensors").unlink()
    (run_dir / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    forge_manifest(run_dir)
    line = error_line(invoke(*run_commands(run_dir, tmp_path)[command]))
    assert f"{run_dir / 'adapter' / 'adapter_model.bin'}: pickle weights and no adapter_model.safetensors" in line
    assert "pass --allow-pickle-weights" in line and not marker.exists()


def test_the_pickle_flag_still_loads_weights_only(received: Callable[[str], Path], marker: Path) -> None:
    """--allow-pickle-weights lets peft unpickle the .bin, with the weights-only unpickler: code still never runs."""
    run_dir = received("pickled")
    (run_dir / "adapter" / "adapter_model.safetensors").unlink()
    (run_dir / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    forge_manifest(run_dir)
    result = invoke("generate", run_dir, "--prompt", "hi", "--allow-pickle-weights")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "warning: loading the pickle weights" in result.stderr  # said once, before loading
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {run_dir / 'adapter'}: the pickle weights hold more than tensors (torch's weights-only unpickler "
        "refused them); they were not written by a training run: do not use this adapter"
    ]
    assert not marker.exists()


def test_a_received_recipe_cannot_allow_pickle_weights(
    received: Callable[[str], Path], tiny_model_dir: Path, tmp_path: Path, marker: Path
) -> None:
    run_dir = received("pickle-base")
    set_recipe(run_dir, lambda r: r["model"].update(allow_pickle_weights=True))
    forge_manifest(run_dir)
    line = error_line(invoke("merge", run_dir, tmp_path / "merged"))
    assert "model.allow_pickle_weights: true would unpickle weights" in line and "--allow-pickle-weights" in line


def pickle_shard_model(tiny_model_dir: Path, folder: Path, marker: Path, how: str) -> Path:
    """The tiny model whose weights transformers would look for in a pickle: through a safetensors index naming a
    .bin shard, or through config.json's `transformers_weights`."""
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model-00001.bin").write_bytes(pickle.dumps(Payload(marker)))
    if how == "index":
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "pytorch_model-00001.bin"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        config = json.loads((folder / "config.json").read_text())
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
        config["transformers_weights"] = "adapter_model.bin"
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("how", ["index", "transformers_weights"])
@pytest.mark.parametrize("command", ["generate", "train"])
def test_pickle_weights_behind_a_safetensors_name_are_refused(
    how: str, command: str, received: Callable[[str], Path], tiny_model_dir: Path, tmp_path: Path, marker: Path
) -> None:
    model = pickle_shard_model(tiny_model_dir, tmp_path / "model", marker, how)
    if command == "train":  # the user's own recipe: held to safetensors as well unless it opts in
        args: list[Any] = ["train", write_recipe(tmp_path, model, train={"max_steps": 1})]
    else:
        run_dir = received("shards")
        set_recipe(run_dir, lambda r: r["model"].update(name_or_path=str(model)))
        forge_manifest(run_dir)
        args = ["generate", run_dir, "--prompt", "hi"]
    line = error_line(invoke(*args))
    shown = "naming the shard 'pytorch_model-00001.bin'" if how == "index" else "naming 'adapter_model.bin'"
    assert f"model.name_or_path: {model} has a" in line and shown in line
    assert "set model.allow_pickle_weights: true" in line and not marker.exists()


def test_a_damaged_index_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    line = error_line(invoke("train", write_recipe(tmp_path, model, train={"max_steps": 1})))
    assert "has no weight_map of file names; it is not a valid index" in line


# ---------------------------------------------------------------------------------------------------------------
# The adapter folder: tokenizer code, non-LoRA configs, chat templates


def test_tokenizer_code_in_the_adapter_never_runs_even_when_stdin_says_yes(
    received: Callable[[str], Path], marker: Path
) -> None:
    """Left unset, trust_remote_code makes transformers ask on stdin; `chat` reads stdin, so "y" would answer it."""
    run_dir = received("tokenizer")
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PlantedTokenizer", auto_map={"AutoTokenizer": [None, "planted.PlantedTokenizer"]})
    (adapter / "tokenizer_config.json").write_text(json.dumps(config))
    (adapter / "planted.py").write_text(
        f"open({str(marker)!r}, 'w').write('tokenizer code ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass PlantedTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    forge_manifest(run_dir)
    for args in (["chat", run_dir], ["generate", run_dir, "--prompt", "hi"]):
        line = error_line(invoke(*args, input="y\nyes\nhello\n"))
        assert "the tokenizer saved with the adapter cannot be loaded" in line and "auto_map" in line
        assert not marker.exists()


def test_only_lora_adapter_configs_load(received: Callable[[str], Path], marker: Path) -> None:
    """Other peft types can name tokenizers and kwargs to load (prompt tuning: tokenizer_kwargs)."""
    run_dir = received("prompt-tuning")
    config_path = run_dir / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(peft_type="PROMPT_TUNING", tokenizer_kwargs={"trust_remote_code": True})
    config_path.write_text(json.dumps(config))
    forge_manifest(run_dir)
    line = error_line(invoke("generate", run_dir, "--prompt", "hi"))
    assert "peft_type 'PROMPT_TUNING'; sovtune loads LoRA adapters (lora, dora, rslora) only" in line


def test_an_absurd_rank_is_refused_before_peft_allocates_it(received: Callable[[str], Path]) -> None:
    run_dir = received("rank")
    config_path = run_dir / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 10**9}))
    forge_manifest(run_dir)
    line = error_line(invoke("generate", run_dir, "--prompt", "hi"))
    assert "r '1000000000' is not a LoRA rank sovtune trains (1..4096)" in line


def test_the_base_named_in_adapter_config_is_never_loaded(
    received: Callable[[str], Path], tiny_model_dir: Path, tmp_path: Path, marker: Path
) -> None:
    """peft's AutoPeftModel would load adapter_config.json's base_model_name_or_path; sovtune loads the base the
    recipe names and hands it to peft, so a remote-code repository named there runs nothing."""
    run_dir = received("named-base")
    model = remote_code_model(tiny_model_dir, tmp_path / "remote-model", marker)
    config_path = run_dir / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(model)}))
    forge_manifest(run_dir)
    result = invoke("generate", run_dir, "--prompt", "hi", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert not marker.exists()


def test_an_adapter_given_with_eval_adapter_is_held_to_the_same_rules(
    received: Callable[[str], Path], tmp_path: Path, marker: Path
) -> None:
    run_dir = received("own-run")
    adapter = Path(shutil.copytree(run_dir / "adapter", tmp_path / "sent-adapter"))
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    line = error_line(invoke("eval", run_dir, "--adapter", adapter))
    assert "pickle weights and no adapter_model.safetensors" in line and not marker.exists()


def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "damage, said",
    [
        pytest.param(
            lambda adapter: (adapter / "tokenizer_config.json").write_text("[1]"),
            "adapter/tokenizer_config.json: a JSON list, not an object",
            id="tokenizer-config-a-list",
        ),
        pytest.param(
            lambda adapter: (adapter / "tokenizer.json").write_text("{not json"),
            "adapter/tokenizer.json: not a readable JSON file",
            id="tokenizer-not-json",
        ),
        pytest.param(
            lambda adapter: (adapter / "adapter_model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}"),
            "adapter/adapter_model.safetensors: not a valid safetensors file",
            id="safetensors-header-2^60",
        ),
        pytest.param(
            lambda adapter: (adapter / "adapter_model.safetensors").write_bytes(
                (adapter / "adapter_model.safetensors").read_bytes()[:100]
            ),
            "adapter/adapter_model.safetensors: not a valid safetensors file",
            id="safetensors-truncated",
        ),
        pytest.param(
            lambda adapter: _edit_json(adapter / "adapter_config.json", lora_alpha="x"),
            "the adapter cannot be loaded onto",
            id="config-alpha-not-a-number",
        ),
        pytest.param(
            lambda adapter: _edit_json(adapter / "adapter_config.json", target_modules=["nope"]),
            "the adapter cannot be loaded onto",
            id="config-targets-absent",
        ),
    ],
)
def test_a_damaged_adapter_is_one_line(
    damage: Callable[[Path], Any], said: str, received: Callable[[str], Path]
) -> None:
    run_dir = received("damaged")
    damage(run_dir / "adapter")
    forge_manifest(run_dir)
    assert said in error_line(invoke("generate", run_dir, "--prompt", "hi"))


def test_a_received_chat_template_is_sandboxed(received: Callable[[str], Path], marker: Path) -> None:
    """transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment: a template reaching for Python
    internals fails in one line, and runs nothing."""
    run_dir = received("template")
    escape = (
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (run_dir / "adapter" / "chat_template.jinja").write_text(escape)
    forge_manifest(run_dir)
    line = error_line(invoke("generate", run_dir, "--prompt", "hi"))
    assert "the chat template saved with the adapter failed" in line and not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# A tampered run is refused before anything loads, unless --no-verify


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "merge"])
def test_a_tampered_adapter_is_refused_unless_no_verify(
    command: str, received: Callable[[str], Path], tmp_path: Path
) -> None:
    run_dir = received("tampered")
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # same size, other values
    args = run_commands(run_dir, tmp_path)[command]
    line = error_line(invoke(*args, input="hello\n"))
    assert f"{run_dir}: hash mismatch: adapter/adapter_model.safetensors" in line
    assert "pass --no-verify to load it anyway" in line
    assert not (run_dir / "report.json").exists() and not (tmp_path / "merged").exists()
    if command in ("generate", "chat"):
        result = invoke(*args, "--no-verify", input="hello\n")
        assert result.exit_code == 0, result.output


def test_a_run_without_its_manifest_is_refused_unless_no_verify(received: Callable[[str], Path]) -> None:
    run_dir = received("no-manifest")
    (run_dir / "manifest.json").unlink()
    line = error_line(invoke("generate", run_dir, "--prompt", "hi"))
    assert "no manifest" in line and "pass --no-verify" in line
    assert invoke("generate", run_dir, "--prompt", "hi", "--no-verify").exit_code == 0


# ---------------------------------------------------------------------------------------------------------------
# Links and unrecorded files: never followed, packed or accepted


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "private.txt"
    secret.parent.mkdir()
    secret.write_text("a file outside the run: must never be packed")
    return secret


def bundle_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda run, out: (run / "adapter" / "notes.txt").symlink_to(out), id="symlinked-file"),
        pytest.param(lambda run, out: (run / "adapter" / "more").symlink_to(out.parent), id="symlinked-folder"),
        pytest.param(
            lambda run, out: (
                (run / "adapter" / "tokenizer.json").unlink() or (run / "adapter" / "tokenizer.json").symlink_to(out)
            ),
            id="recorded-file-replaced-by-a-link",
        ),
        pytest.param(lambda run, out: (run / "adapter" / "extra.bin").write_bytes(b"unrecorded"), id="unrecorded"),
        pytest.param(lambda run, out: os.link(out, run / "adapter" / "hardlink.txt"), id="unrecorded-hardlink"),
    ],
)
def test_export_and_verify_refuse_links_and_unrecorded_files(
    plant: Callable[[Path, Path], Any], received: Callable[[str], Path], outside: Path, tmp_path: Path
) -> None:
    run_dir = received("linked")
    plant(run_dir, outside)
    before = {str(p): p.lstat().st_mtime_ns for p in tmp_path.rglob("*")}
    line = error_line(invoke("export", run_dir, tmp_path / "bundle.tar"))
    assert line.startswith("error: refusing to export") and "adapter/" in line
    assert "not a regular file (links are not followed)" in line or "not recorded in the manifest" in line
    assert {str(p): p.lstat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # no bundle, no temporary file
    assert "adapter/" in error_line(invoke("verify", run_dir))
    # push publishes the run's files: never through a link, never one the manifest does not record
    pushed = error_line(invoke("push", run_dir, "--repo", "acme/x", "--endpoint", "http://127.0.0.1:9"))
    assert "adapter/" in pushed and ("symbolic links are not published" in pushed or "not in the manifest" in pushed)


def test_a_link_is_not_exported_even_with_a_forged_manifest(
    received: Callable[[str], Path], outside: Path, tmp_path: Path
) -> None:
    run_dir = received("linked")
    (run_dir / "adapter" / "notes.txt").symlink_to(outside)
    forge_manifest(run_dir)  # records the link's target bytes under adapter/notes.txt
    line = error_line(invoke("export", run_dir, tmp_path / "bundle.tar"))
    assert "not a regular file (links are not followed): adapter/notes.txt" in line
    assert not (tmp_path / "bundle.tar").exists()


def test_a_hardlinked_recorded_file_is_a_regular_file(received: Callable[[str], Path], tmp_path: Path) -> None:
    """Decided: a hard link is a regular file (its bytes are what the manifest records); it is packed as bytes."""
    run_dir = received("hardlinked")
    config = run_dir / "adapter" / "adapter_config.json"
    os.link(config, tmp_path / "elsewhere.json")
    result = invoke("export", run_dir, tmp_path / "bundle.tar")
    assert result.exit_code == 0, result.output
    assert bundle_members(tmp_path / "bundle.tar")["sent/adapter/adapter_config.json"] == config.read_bytes()


@pytest.mark.parametrize("target", ["manifest.json", "recipe.yaml"])
def test_symlinked_run_records_are_refused(
    target: str, received: Callable[[str], Path], tmp_path: Path, outside: Path
) -> None:
    run_dir = received("records")
    moved = tmp_path / f"moved-{target}"
    shutil.move(run_dir / target, moved)
    (run_dir / target).symlink_to(moved)
    for args in (["verify", run_dir], ["generate", run_dir, "--prompt", "hi"], ["export", run_dir, tmp_path / "b.tar"]):
        line = error_line(invoke(*args))
        assert target in line and ("symbolic link" in line or "links are not followed" in line), line
    if target == "recipe.yaml":  # read without following the link even when verification is skipped
        assert "symbolic link" in error_line(invoke("generate", run_dir, "--prompt", "hi", "--no-verify"))


SYSTEM_FILE = {"path": "/proc/self/mem", "root": "absolute", "sha256": "0" * 64}  # reading it never ends well


def files_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {"stages": [{"files": [entry]}], "run": {"name": "x"}}


@pytest.mark.parametrize(
    "manifest, found",
    [
        pytest.param([1, 2, 3], "must be a JSON object, found list", id="a-list"),
        pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="nested-100k"),
        pytest.param(
            files_entry({"path": "../outside/private.txt", "root": "run", "sha256": "0" * 64}),
            "is not a path inside the run",
            id="escaping-path",
        ),
        pytest.param(
            files_entry({"path": "/etc/passwd", "root": "run", "sha256": "0" * 64}),
            "is not a path inside the run",
            id="absolute-path",
        ),
        pytest.param(
            files_entry({"path": 7, "root": "run", "sha256": "0" * 64}),
            "not a path, root and SHA-256",
            id="path-not-text",
        ),
    ],
)
def test_a_hostile_manifest_is_one_line(
    manifest: Any, found: str, received: Callable[[str], Path], tmp_path: Path
) -> None:
    run_dir = received("manifest")
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (run_dir / "manifest.json").write_text(text)
    for args in (
        ["verify", run_dir],
        ["export", run_dir, tmp_path / "b.tar"],
        ["generate", run_dir, "--prompt", "hi"],
        ["eval", run_dir],
        ["push", run_dir, "--repo", "acme/x", "--endpoint", "http://127.0.0.1:9"],
    ):
        assert found in error_line(invoke(*args)), args
    assert not (tmp_path / "b.tar").exists()


def test_verify_reads_no_system_file_a_manifest_names(received: Callable[[str], Path]) -> None:
    run_dir = received("system")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"].append({"stage": "planted", "files": [SYSTEM_FILE]})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert "hash mismatch: /proc/self/mem (a system file, not read)" in error_line(invoke("verify", run_dir))


def test_an_unpacked_bundles_checksum_list_that_is_not_text_is_one_line(received: Callable[[str], Path]) -> None:
    run_dir = received("sums")
    (run_dir / "SHA256SUMS").write_bytes(b"\xff\xfe")
    assert "SHA256SUMS: not UTF-8 text; the checksum file is damaged" in error_line(invoke("verify", run_dir))


def test_export_packs_only_what_the_manifest_records(received: Callable[[str], Path], tmp_path: Path) -> None:
    run_dir = received("packed")
    (run_dir / "notes.txt").write_text("not part of the run's record")  # at the top: not loaded, not packed
    result = invoke("export", run_dir, tmp_path / "bundle.tar")
    assert result.exit_code == 0, result.output
    from sovtune.run.manifest import recorded_files

    recorded = {
        path for root, path in recorded_files(json.loads((run_dir / "manifest.json").read_text())) if root == "run"
    }
    packed = {name.removeprefix("sent/") for name in bundle_members(tmp_path / "bundle.tar")}
    assert packed == recorded | {"manifest.json", "SHA256SUMS", "README.md"}


def rewrite_bundle(source: Path, target: Path, extra: dict[str, bytes], change: Callable[[str, bytes], bytes]) -> None:
    with tarfile.open(target, "w") as out:
        for name, data in [*bundle_members(source).items(), *extra.items()]:
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_verify_accepts_no_bundle_member_the_manifest_does_not_record(
    received: Callable[[str], Path], tmp_path: Path
) -> None:
    run_dir = received("bundled")
    good = tmp_path / "good.tar"
    assert invoke("export", run_dir, good).exit_code == 0
    planted = b"import os  # would be loaded by nobody, and accepted by nobody"
    digest = hashlib.sha256(planted).hexdigest()

    def add_checksum(name: str, data: bytes) -> bytes:  # listed in SHA256SUMS, so only the manifest can tell
        return data + f"{digest}  adapter/planted.py\n".encode() if name.endswith("SHA256SUMS") else data

    listed = tmp_path / "listed.tar"
    rewrite_bundle(good, listed, {"sent/adapter/planted.py": planted}, add_checksum)
    assert "not recorded in the manifest: adapter/planted.py" in error_line(invoke("verify", listed))
    twice = tmp_path / "twice.tar"
    config = bundle_members(good)["sent/adapter/adapter_config.json"]
    rewrite_bundle(good, twice, {"sent/adapter/adapter_config.json": config}, lambda name, data: data)
    assert "appears twice" in error_line(invoke("verify", twice))
    as_list = tmp_path / "list.tar"
    rewrite_bundle(good, as_list, {}, lambda name, data: b"[]" if name.endswith("manifest.json") else data)
    assert "must be a JSON object, found list" in error_line(invoke("verify", as_list))
    deep = tmp_path / "deep.tar"
    nested = b"[" * 100_000 + b"]" * 100_000
    rewrite_bundle(good, deep, {}, lambda name, data: nested if name.endswith("manifest.json") else data)
    assert "nested absurdly deep" in error_line(invoke("verify", deep))


def test_export_refuses_a_run_name_that_would_escape_the_bundle(
    received: Callable[[str], Path], tmp_path: Path
) -> None:
    run_dir = received("named")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["run"]["name"] = "../../escaped"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert "is not a plain run name" in error_line(invoke("export", run_dir, tmp_path / "b.tar"))


# ---------------------------------------------------------------------------------------------------------------
# A hostile folder pushed and verified runs nothing either


def test_push_and_verify_of_a_hostile_run_run_nothing(
    received: Callable[[str], Path], tiny_model_dir: Path, tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from hub_server import HubDouble

    run_dir = received("everything")
    model = remote_code_model(tiny_model_dir, tmp_path / "remote-model", marker)
    (run_dir / "metric.py").write_text(USER_METRIC.format(marker=str(marker)))
    user = {"name": "planted", "module": str(run_dir / "metric.py"), "function": "score"}

    def hostile(recipe: dict[str, Any]) -> None:
        recipe["model"].update(trust_remote_code=True, allow_pickle_weights=True, name_or_path=str(model))
        recipe["eval"]["datasets"][0]["user_metrics"] = [user]

    set_recipe(run_dir, hostile)
    (run_dir / "adapter" / "extra_weights.bin").write_bytes(pickle.dumps(Payload(marker)))
    forge_manifest(run_dir)
    assert invoke("verify", run_dir).exit_code == 0
    assert invoke("export", run_dir, tmp_path / "b.tar").exit_code == 0
    assert invoke("verify", tmp_path / "b.tar").exit_code == 0
    double = HubDouble().start()
    try:
        monkeypatch.setenv("HF_TOKEN", double.add_token("alice", "write"))
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
        refused = invoke("push", run_dir, "--repo", "acme/hostile", "--endpoint", double.url)
        # The pickle is never published (issue 15): one line, nothing sent. Without it, the rest is pushed.
        assert refused.exit_code == 2, refused.output
        assert "adapter/extra_weights.bin: pickle weights are never published" in refused.output
        assert double.requests == []
        (run_dir / "adapter" / "extra_weights.bin").unlink()
        forge_manifest(run_dir)
        result = invoke("push", run_dir, "--repo", "acme/hostile", "--endpoint", double.url)
    finally:
        double.stop()
    assert result.exit_code == 0, result.output
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: no pickled training arguments; --resume unpickles nothing that is not a plain tensor state


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checkpointed")
    recipe = write_recipe(folder, tiny_model_dir, name="ckpt", train={"max_steps": 2, "save_steps": 1})
    result = invoke("train", recipe)
    assert result.exit_code == 0, result.output
    return recipe


@pytest.mark.slow
def test_checkpoints_hold_the_training_arguments_as_json_not_a_pickle(checkpointed: Path) -> None:
    run_dir = checkpointed.parent / "runs" / "ckpt"
    saved = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in saved] == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in saved:
        assert not (checkpoint / "training_args.bin").exists()
        args = json.loads((checkpoint / "training_args.json").read_text())
        assert args["max_steps"] == 2 and args["output_dir"] == str(run_dir / "checkpoints")
    assert not list(run_dir.rglob("training_args.bin"))


def plant(checkpoint: Path, name: str, kind: str, marker: Path) -> None:
    import torch

    if kind == "torch.save":
        torch.save({"state": Payload(marker)}, checkpoint / name)
    else:
        (checkpoint / name).write_bytes(pickle.dumps(Payload(marker)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "pytorch_model.bin"])
def test_resume_refuses_a_planted_pickle(
    name: str, kind: str, checkpointed: Path, tmp_path: Path, marker: Path
) -> None:
    recipe = write_recipe(tmp_path, Path(yaml.safe_load(checkpointed.read_text())["model"]["name_or_path"]),
                          name="ckpt", train={"max_steps": 2, "save_steps": 1})  # fmt: skip
    shutil.copytree(checkpointed.parent / "runs" / "ckpt", tmp_path / "runs" / "ckpt")
    plant(tmp_path / "runs" / "ckpt" / "checkpoints" / "checkpoint-2", name, kind, marker)
    line = error_line(invoke("train", recipe, "--resume"))
    assert "checkpoint-2" in line and "start without --resume" in line
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_resume_loads_state_weights_only_behind_the_static_check(
    name: str, checkpointed: Path, tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without sovtune's static check, transformers' own loading (torch.load(weights_only=True), as in the installed
    version) still refuses the payload, and the refusal is one line."""
    from sovtune.run import checkpoints

    monkeypatch.setattr(checkpoints, "check_checkpoint_files", lambda checkpoint: None)
    recipe = write_recipe(tmp_path, Path(yaml.safe_load(checkpointed.read_text())["model"]["name_or_path"]),
                          name="ckpt", train={"max_steps": 3, "save_steps": 1})  # fmt: skip
    shutil.copytree(checkpointed.parent / "runs" / "ckpt", tmp_path / "runs" / "ckpt")
    plant(tmp_path / "runs" / "ckpt" / "checkpoints" / "checkpoint-2", name, "torch.save", marker)
    result = invoke("train", recipe, "--resume", "--force")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    said = [line for line in result.stderr.splitlines() if line.startswith(("error:", "warning:"))]
    assert said[0].startswith("warning: resuming") and "(--force)" in said[0]  # the data path moved with the copy
    assert said[1:] == [
        f"error: {tmp_path / 'runs' / 'ckpt' / 'checkpoints' / 'checkpoint-2'}: a state file is not only tensors and "
        "plain values (torch's weights-only unpickler refused it); the trainer did not write it: remove the "
        "checkpoint, or start without --resume"
    ]
    assert not marker.exists()


@pytest.mark.slow
def test_resume_needs_safetensors_adapter_weights(checkpointed: Path, tmp_path: Path, marker: Path) -> None:
    recipe = write_recipe(tmp_path, Path(yaml.safe_load(checkpointed.read_text())["model"]["name_or_path"]),
                          name="ckpt", train={"max_steps": 2, "save_steps": 1})  # fmt: skip
    shutil.copytree(checkpointed.parent / "runs" / "ckpt", tmp_path / "runs" / "ckpt")
    checkpoint = tmp_path / "runs" / "ckpt" / "checkpoints" / "checkpoint-2"
    (checkpoint / "adapter_model.safetensors").unlink()
    (checkpoint / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    line = error_line(invoke("train", recipe, "--resume"))
    assert "adapter_model.bin: a pickle file the trainer does not write" in line and not marker.exists()
