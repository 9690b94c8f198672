"""Licence gate: the base model's declared licence (card, then config) against sovereignty.allowed_licenses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import invoke
from sovtune.config import load_recipe
from sovtune.licence import LicenceRefused, check_licence


def model_folder(
    tmp_path: Path, card: str | None = None, config: dict | None = None, source: Path | None = None
) -> Path:
    folder = tmp_path / "model"
    if source is not None:
        shutil.copytree(source, folder)
    folder.mkdir(exist_ok=True)
    if card is not None:
        (folder / "README.md").write_text(card)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def recipe_for(make_recipe, folder: Path, allowed: list[str] | None = None, stated: str | None = None):
    model = {"name_or_path": str(folder), **({"license": stated} if stated else {})}
    sovereignty = {"allowed_licenses": allowed} if allowed is not None else {}
    return load_recipe(make_recipe("lic", model=model, sovereignty=sovereignty))


def test_card_licence_allowed(make_recipe, tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "---\nlicense: Apache-2.0\n---\n# model\n")
    result = check_licence(recipe_for(make_recipe, folder, ["apache-2.0", "mit"]))
    assert result.passed and result.licences == ["apache-2.0"] and result.source == "model card"


def test_card_licence_not_allowed(make_recipe, tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "---\nlicense: other\nlicense_name: llama3.1\n---\n")
    with pytest.raises(
        LicenceRefused, match=r"licence llama3.1 \(from model card\) is not in sovereignty.allowed_licenses"
    ):
        check_licence(recipe_for(make_recipe, folder, ["apache-2.0"]))


def test_config_licence_is_the_fallback(make_recipe, tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "# a card without YAML\n", {"model_type": "llama", "license": "mit"})
    result = check_licence(recipe_for(make_recipe, folder, ["mit"]))
    assert result.licences == ["mit"] and result.source == "config.json"


def test_unknown_licence_needs_the_recipe_to_state_it(make_recipe, tmp_path: Path) -> None:
    folder = model_folder(tmp_path, config={"model_type": "llama"})
    with pytest.raises(LicenceRefused, match="cannot be determined.*model.license"):
        check_licence(recipe_for(make_recipe, folder, ["apache-2.0"]))
    stated = check_licence(recipe_for(make_recipe, folder, ["apache-2.0"], stated="apache-2.0"))
    assert stated.passed and stated.source == "recipe (model.license)"


def test_stated_licence_cannot_contradict_the_card(make_recipe, tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "---\nlicense: cc-by-nc-4.0\n---\n")
    with pytest.raises(LicenceRefused, match="declares cc-by-nc-4.0"):
        check_licence(recipe_for(make_recipe, folder, ["apache-2.0"], stated="apache-2.0"))


def test_without_allow_list_the_licence_is_only_recorded(make_recipe, tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "---\nlicense: cc-by-nc-4.0\n---\n")
    result = check_licence(recipe_for(make_recipe, folder))
    assert result.passed and result.licences == ["cc-by-nc-4.0"] and "no allow-list" in result.describe()


def test_check_fails_and_train_stops_before_loading_weights(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "---\nlicense: cc-by-nc-4.0\n---\n", source=tiny_model_dir)
    recipe_path = make_recipe(
        "gated", model={"name_or_path": str(folder)}, sovereignty={"allowed_licenses": ["apache-2.0"]}
    )
    check = invoke("check", str(recipe_path))
    assert check.exit_code == 2 and "cc-by-nc-4.0" in check.output and "FAIL" in check.output
    train = invoke("train", str(recipe_path))
    assert train.exit_code == 2 and "not in sovereignty.allowed_licenses" in train.output
    assert not load_recipe(recipe_path).run_dir.exists()


def test_allowed_licences_are_validated_and_normalised(make_recipe) -> None:
    from sovtune.errors import RecipeError

    recipe = load_recipe(make_recipe("norm", sovereignty={"allowed_licenses": ["Apache-2.0", "MIT"]}))
    assert recipe.sovereignty.allowed_licenses == ["apache-2.0", "mit"]
    with pytest.raises(RecipeError, match="not licence ids"):
        load_recipe(make_recipe("badlic", sovereignty={"allowed_licenses": ["Apache 2.0"]}))
