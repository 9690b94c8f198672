"""docs/recipe-reference.md is generated from the schema, lists every field at every depth, and a stale copy fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from sovtune.config import Recipe

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_recipe_reference.py"
REFERENCE = ROOT / "docs" / "recipe-reference.md"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )


def test_the_recipe_reference_is_up_to_date() -> None:
    done = run_script("--check")
    assert done.returncode == 0, (
        f"{done.stdout}\n{done.stderr}\ndocs/recipe-reference.md is stale: run `python scripts/gen_recipe_reference.py`"
    )


def test_a_stale_reference_fails_the_check_and_says_how_to_regenerate(tmp_path: Path) -> None:
    stale = tmp_path / "recipe-reference.md"
    stale.write_text(REFERENCE.read_text(encoding="utf-8").replace("`eval.gates.<name>.min_gain`", "`gone`"))
    done = run_script("--check", "--out", str(stale))
    assert done.returncode == 1
    assert "+| `eval.gates.<name>.min_gain` |" in done.stdout and "-| `gone` |" in done.stdout
    assert "is stale: the recipe schema changed; regenerate it with `python scripts/gen_recipe_reference.py`" in (
        done.stderr
    )
    assert run_script("--out", str(stale)).returncode == 0
    assert stale.read_text(encoding="utf-8") == REFERENCE.read_text(encoding="utf-8")


def schema_paths() -> set[str]:
    """Every field path of the recipe, found through pydantic's JSON schema (not the generator's own walk):
    sections as `a.b`, list entries as `a[].b`, mapping values as `a.<name>.b`."""
    schema = Recipe.model_json_schema()
    definitions = schema.get("$defs", {})
    paths: set[str] = set()

    def resolve(node: dict[str, Any]) -> list[dict[str, Any]]:
        if "$ref" in node:
            return resolve(definitions[node["$ref"].split("/")[-1]])
        options = node.get("anyOf") or node.get("oneOf")
        return [found for option in options for found in resolve(option)] if options else [node]

    def walk(node: dict[str, Any], prefix: str) -> None:
        for shape in resolve(node):
            for name, child in (shape.get("properties") or {}).items():
                if name == "source_path":
                    continue
                path = f"{prefix}.{name}" if prefix else name
                paths.add(path)
                walk(child, path)
            if shape.get("type") == "array" and isinstance(shape.get("items"), dict):
                walk(shape["items"], prefix + "[]")
            if isinstance(shape.get("additionalProperties"), dict):
                walk(shape["additionalProperties"], prefix + ".<name>")

    walk(schema, "")
    return paths


def test_every_field_at_every_depth_is_documented() -> None:
    documented = {
        line.split("`")[1] for line in REFERENCE.read_text(encoding="utf-8").splitlines() if line[:3] == "| `"
    }
    paths = schema_paths()
    # The fields the issue found missing, nested ones included.
    for expected in ("eval.datasets[].metrics", "eval.datasets[].user_metrics[].function", "eval.gates.<name>.min_gain",
                     "eval.generation.max_new_tokens", "eval.general.window", "hub.repo", "train.liger_kernel",
                     "train.torch_compile", "data.train[].path", "data.separator"):  # fmt: skip
        assert expected in paths
    assert sorted(paths - documented) == []
    assert sorted(documented - paths) == []


def test_defaults_are_shown_as_the_schema_has_them() -> None:
    rows = {
        line.split("`")[1]: [cell.strip() for cell in line.split(" | ")]
        for line in REFERENCE.read_text(encoding="utf-8").splitlines()
        if line[:3] == "| `"
    }
    assert rows["data.packing"][2] == "`auto`"  # not bool False
    assert rows["eval.datasets[].metrics"][2] == "`[loss, perplexity, token_accuracy, exact_match]`"
    assert rows["eval.gates"][1] == "mapping of names to entries (eval.gates.<name>.*)"
    assert "one of `loss`, `perplexity`" in rows["eval.datasets[].metrics"][1]
