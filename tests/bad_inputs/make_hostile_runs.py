"""Writes the hostile run folders (runs/) and bundles (bundles/) of this corpus; cases.yaml says what each must get.

Run it again after changing one (`python tests/bad_inputs/make_hostile_runs.py`): each manifest records its folder's
files as the folder's author would (correctly, but for the planted mismatch of tampered_adapter), so every case
reaches the defence it names rather than stopping at verification.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import Any, Callable

import yaml

CORPUS = Path(__file__).parent
RUNS, BUNDLES = CORPUS / "runs", CORPUS / "bundles"
# What every payload does if it ever runs: a file in the working directory, which tests/test_bad_inputs.py snapshots.
PAYLOAD = 'open("PAYLOAD_RAN", "w").write("a run folder ran code")'


class Payload:
    """Unpickling this runs PAYLOAD."""

    def __reduce__(self) -> Any:
        return (exec, (PAYLOAD,))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


SAFETENSORS_HEADER = b'{"__metadata__":{"format":"pt"}}'
SAFETENSORS_EMPTY = len(SAFETENSORS_HEADER).to_bytes(8, "little") + SAFETENSORS_HEADER
ADAPTER_CONFIG = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
    "base_model_name_or_path": "./model",
}  # fmt: skip
RECIPE = {
    "schema_version": 1, "name": "received", "model": {"name_or_path": "./model"},
    "data": {"train": "../../data/good.jsonl", "max_length": 64}, "train": {"max_steps": 2},
}  # fmt: skip


def run(
    name: str,
    recipe_change: Callable[[dict[str, Any]], None] | None = None,
    files: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
    manifest: str | None = None,
    wrong_hash: tuple[str, ...] = (),
) -> Path:
    """A run folder: recorded recipe (no source_path: paths are relative to the folder), adapter, manifest."""
    folder = RUNS / name
    recipe = json.loads(json.dumps(RECIPE))
    recipe["name"] = name
    if recipe_change:
        recipe_change(recipe)
    content = {
        "recipe.yaml": (
            "# A received run's recorded recipe (see ../../cases.yaml).\n" + yaml.safe_dump(recipe)
        ).encode(),
        "adapter/adapter_config.json": json.dumps(ADAPTER_CONFIG, indent=2).encode(),
        "adapter/adapter_model.safetensors": SAFETENSORS_EMPTY,
        **(files or {}),
    }
    for path in drop:
        content.pop(path)
    for path, data in content.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    if manifest is None:
        entries = [
            {"path": path, "root": "run", "sha256": "0" * 64 if path in wrong_hash else sha(data), "bytes": len(data)}
            for path, data in sorted(content.items())
            if not path.endswith(".py") or path.startswith("adapter/")
        ]
        stages = [{"stage": "train", "files": entries}]
        manifest = json.dumps({"manifest_version": 1, "run": {"name": name}, "stages": stages}, indent=1)
    (folder / "manifest.json").write_text(manifest)
    return folder


def bundle(name: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(BUNDLES / f"{name}.tar", "w") as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def main() -> None:
    shutil.rmtree(RUNS, ignore_errors=True)
    shutil.rmtree(BUNDLES, ignore_errors=True)
    BUNDLES.mkdir(parents=True)
    planted = (PAYLOAD + "\n").encode()
    # Settings of a recorded recipe that would run code or unpickle.
    remote_config = {
        "model_type": "planted", "architectures": ["Planted"],
        "auto_map": {"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.Planted"},
    }  # fmt: skip
    run(
        "remote_code",
        lambda r: r["model"].update(trust_remote_code=True),
        files={"model/config.json": json.dumps(remote_config).encode(), "model/planted.py": planted},
    )
    run(
        "pickle_weights",
        lambda r: r["model"].update(allow_pickle_weights=True),
        files={"model/pytorch_model.bin": pickle.dumps(Payload())},
    )
    metric = {"name": "planted", "module": "metric.py", "function": "score"}
    run(
        "user_metrics",
        lambda r: r.update(eval={"datasets": [{"name": "eval", "metrics": ["exact_match"], "user_metrics": [metric]}]}),
        files={"metric.py": (PAYLOAD + "\n\n\ndef score(prediction, reference, row):\n    return 1.0\n").encode()},
    )
    run("recorded_extends", lambda r: r.update(extends="../remote_code/recipe.yaml"))
    # The adapter folder.
    run(
        "pickle_adapter",
        files={"adapter/adapter_model.bin": pickle.dumps(Payload())},
        drop=("adapter/adapter_model.safetensors",),
    )
    prompt_tuning = {
        "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "./planted",
        "tokenizer_kwargs": {"trust_remote_code": True},
    }  # fmt: skip
    run("prompt_tuning_adapter", files={"adapter/adapter_config.json": json.dumps(prompt_tuning).encode()})
    tokenizer_config = {
        "tokenizer_class": "PlantedTokenizer", "auto_map": {"AutoTokenizer": [None, "planted.PlantedTokenizer"]},
    }  # fmt: skip
    run(
        "tokenizer_auto_map",
        files={"adapter/tokenizer_config.json": json.dumps(tokenizer_config).encode(), "adapter/planted.py": planted},
    )
    # Verification before loading, and manifests that are not what sovtune writes.
    run("tampered_adapter", wrong_hash=("adapter/adapter_model.safetensors",))
    run("unrecorded_adapter_file")
    (RUNS / "unrecorded_adapter_file" / "adapter" / "planted.py").write_bytes(planted)
    run("no_manifest")
    (RUNS / "no_manifest" / "manifest.json").unlink()
    run("manifest_list", manifest="[]")
    run("manifest_nested", manifest="[" * 50_000 + "]" * 50_000)
    good_rows = sha((CORPUS / "data" / "good.jsonl").read_bytes())
    escaping = {"path": "../../data/good.jsonl", "root": "run", "sha256": good_rows}
    run("manifest_escaping_path", manifest=json.dumps({"run": {"name": "x"}, "stages": [{"files": [escaping]}]}))
    not_text = {"path": {"nested": 1}, "root": "run", "sha256": "0" * 64}
    run("manifest_entry_not_text", manifest=json.dumps({"run": {"name": "x"}, "stages": [{"files": [not_text]}]}))
    escaping_name = run("run_name_escaping")
    recorded = json.loads((escaping_name / "manifest.json").read_text())
    recorded["run"]["name"] = "../../escaped"
    (escaping_name / "manifest.json").write_text(json.dumps(recorded))
    # Bundles.
    config = json.dumps(ADAPTER_CONFIG).encode()
    entry = {"path": "adapter/adapter_config.json", "root": "run", "sha256": sha(config)}
    manifest = json.dumps({"run": {"name": "b"}, "stages": [{"files": [entry]}]}).encode()

    def sums(**extra: str) -> bytes:
        listed = {"adapter/adapter_config.json": sha(config), "manifest.json": sha(manifest), **extra}
        return "".join(f"{digest}  {path}\n" for path, digest in sorted(listed.items())).encode()

    common = [("b/manifest.json", manifest), ("b/adapter/adapter_config.json", config)]
    bundle(
        "unrecorded_member",
        [("b/SHA256SUMS", sums(**{"adapter/planted.py": sha(planted)})), *common, ("b/adapter/planted.py", planted)],
    )
    bundle("duplicate_member", [("b/SHA256SUMS", sums()), *common, ("b/adapter/adapter_config.json", planted)])
    bundle("manifest_list", [("b/SHA256SUMS", sums()), ("b/manifest.json", b"[1, 2]"), common[1]])
    bundle("two_top_folders", [("b/SHA256SUMS", sums()), *common, ("c/adapter/adapter_config.json", config)])


if __name__ == "__main__":
    main()
