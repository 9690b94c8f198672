"""Every recipe in recipes/ loads, says what it does and how to run it, and its local files exist and parse."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from sovtune.config import DataSource, Recipe, TrainSource, load_recipe, looks_like_local_path
from sovtune.data import Row, read_rows, to_example
from sovtune.model import builtin_templates

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    assert RECIPES, f"no recipes in {RECIPES_DIR}"


def test_run_names_are_unique() -> None:
    names = [load_recipe(path).name for path in RECIPES]
    assert len(set(names)) == len(names), names  # two recipes must not share runs/<name>


@pytest.fixture(params=RECIPES, ids=[path.name for path in RECIPES])
def shipped(request: pytest.FixtureRequest) -> tuple[Path, Recipe]:
    return request.param, load_recipe(request.param)


def test_recipe_starts_with_what_it_does_and_the_command(shipped: tuple[Path, Recipe]) -> None:
    path, _ = shipped
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 20, "first line: a comment saying what the recipe does"
    header = [line for line in lines if line.startswith("#")]
    command = re.compile(rf"sovtune \w+ recipes/{re.escape(path.name)}\b")
    assert any(command.search(line) for line in header), f"no `sovtune <command> recipes/{path.name}` in the header"


def test_hub_models_are_pinned(shipped: tuple[Path, Recipe]) -> None:
    _, recipe = shipped
    if not recipe.model_is_local:
        assert recipe.model.revision and re.fullmatch(r"[0-9a-f]{40}", recipe.model.revision), (
            "pin hub models to a commit sha"
        )


def local_sources(recipe: Recipe) -> list[DataSource]:
    sources = [*recipe.data.train, *([recipe.data.eval] if recipe.data.eval else [])]
    return [source for source in sources if looks_like_local_path(source.path) or recipe.resolve(source.path).exists()]


def test_local_files_exist(shipped: tuple[Path, Recipe]) -> None:
    _, recipe = shipped
    for source in local_sources(recipe):
        assert recipe.resolve(source.path).exists(), source.path
    template = recipe.data.chat_template
    if template and "{" not in template and template not in builtin_templates():
        assert recipe.resolve(template).is_file(), template


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_shipped_data_parses_in_the_recipes_format_without_train_eval_overlap(
    shipped: tuple[Path, Recipe], tiny_tokenizer: Any
) -> None:
    """Rows -> examples with the recipe's own template (or a ChatML stand-in when it uses the model's)."""
    from sovtune.model import read_chat_template

    _, recipe = shipped
    tokenizer = tiny_tokenizer
    original = tokenizer.chat_template
    if recipe.data.chat_template:
        tokenizer.chat_template = read_chat_template(recipe)
    try:
        keys: dict[str, set[str]] = {}
        for role, sources in (("train", recipe.data.train), ("eval", [recipe.data.eval] if recipe.data.eval else [])):
            keys[role] = set()
            for source in sources:
                if source not in local_sources(recipe):
                    continue
                view = recipe.data.source_view(source) if isinstance(source, TrainSource) else recipe.data
                rows: list[Row] = read_rows(source, view.format, recipe.base_dir)
                assert rows, f"{source.path} is empty"
                for row in rows:
                    keys[role].add(to_example(row, view, tokenizer).key())  # RowError names the row
        assert not keys["train"] & keys.get("eval", set()), "shipped eval rows duplicate training rows"
    finally:
        tokenizer.chat_template = original
