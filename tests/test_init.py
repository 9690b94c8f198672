"""`sovtune init`: the starter recipe it writes loads, keeps absolute paths absolute, sets up eval data, metrics and
the forgetting check, and takes `--set train.max_steps=N` for a quick try."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import invoke
from sovtune.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with the shipped data and base model (linked), as the working directory."""
    (tmp_path / "data").mkdir()
    for name in ("base-model", "sql", "general"):
        (tmp_path / "data" / name).symlink_to(ROOT / "data" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def written(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_defaults_give_a_recipe_with_a_forgetting_check_that_loads(workdir: Path) -> None:
    result = invoke("init", "recipes/mine.yaml")
    assert result.exit_code == 0, result.output
    assert "the forgetting check uses ../data/general/eval.jsonl" in " ".join(result.stdout.split())
    recipe = load_recipe(workdir / "recipes" / "mine.yaml")
    assert recipe.eval.general is not None and recipe.eval.general.train is not None
    assert recipe.resolve(recipe.eval.general.path) == workdir / "data" / "general" / "eval.jsonl"
    assert recipe.resolve(recipe.eval.general.train) == workdir / "data" / "general" / "train.jsonl"
    assert recipe.resolve(recipe.data.train[0].path) == workdir / "data" / "sql" / "train.jsonl"
    assert recipe.data.eval_fraction == 0.1 and recipe.eval.datasets[0].metrics[-1] == "exact_match"
    text = (workdir / "recipes" / "mine.yaml").read_text()
    assert "# - {general: true, weight: 0.1}" in text  # replay, offered as a comment
    assert "#   general_perplexity: {max_increase: 0.10, confident: true}" in text


def test_eval_metric_database_and_general_options(workdir: Path) -> None:
    (workdir / "mine").mkdir()
    (workdir / "mine" / "general.jsonl").write_text('{"text": "' + "general words " * 10 + '"}\n')
    result = invoke(
        "init", "recipes/sql.yaml", "--eval", "data/sql/eval.jsonl", "--metric", "sql_execution", "--metric", "chrf",
        "--database", "data/sql/company.db", "--general", "mine/general.jsonl",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    recipe = load_recipe(workdir / "recipes" / "sql.yaml")
    assert recipe.data.eval is not None and recipe.resolve(recipe.data.eval.path) == workdir / "data/sql/eval.jsonl"
    dataset = recipe.eval.datasets[0]
    assert dataset.metrics == ["loss", "perplexity", "token_accuracy", "sql_execution", "chrf"]
    assert dataset.database is not None and recipe.resolve(dataset.database) == workdir / "data/sql/company.db"
    assert recipe.eval.general is not None and recipe.eval.general.train is None  # no train.jsonl beside it
    assert recipe.resolve(recipe.eval.general.path) == workdir / "mine" / "general.jsonl"
    assert "#   eval/sql_execution: {min_gain: 0.05, significant: true}" in (workdir / "recipes/sql.yaml").read_text()


def test_no_general_writes_no_forgetting_check_and_says_so(workdir: Path) -> None:
    result = invoke("init", "recipes/plain.yaml", "--no-general")
    assert result.exit_code == 0, result.output
    assert "no forgetting check" in result.stdout
    assert "general" not in written(workdir / "recipes" / "plain.yaml")["eval"]


def test_absolute_paths_stay_absolute(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    target = elsewhere / "deep" / "recipe.yaml"
    model, data = str(ROOT / "data" / "base-model"), str(workdir / "data" / "sql" / "train.jsonl")
    result = invoke("init", target, "--model", model, "--data", data, "--eval", str(ROOT / "data/sql/eval.jsonl"))
    assert result.exit_code == 0, result.output
    values = written(target)
    # Before: the absolute model path was rewritten as ../../..., relative to the recipe's folder.
    assert values["model"]["name_or_path"] == model
    assert values["data"]["train"] == [data] and values["data"]["eval"] == str(ROOT / "data/sql/eval.jsonl")
    assert load_recipe(target).model_location == model


def test_relative_paths_become_relative_to_the_recipe(workdir: Path) -> None:
    assert invoke("init", "recipes/team/r.yaml", "--model", "data/base-model").exit_code == 0
    values = written(workdir / "recipes" / "team" / "r.yaml")
    assert values["model"]["name_or_path"] == "../../data/base-model"
    assert values["data"]["train"] == ["../../data/sql/train.jsonl"]


def test_set_max_steps_works_on_the_written_recipe(workdir: Path) -> None:
    assert invoke("init", "recipes/quick.yaml").exit_code == 0
    assert written(workdir / "recipes" / "quick.yaml")["train"]["epochs"] == 2
    recipe = load_recipe(workdir / "recipes" / "quick.yaml", ["train.max_steps=20"])
    assert recipe.train.max_steps == 20 and not recipe.train.explicitly_set("epochs")
    checked = invoke("check", workdir / "recipes" / "quick.yaml", "--set", "train.max_steps=20", "--json")
    assert checked.exit_code == 0, checked.output


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--metric", "exact_match", "--format", "text"], "--metric exact_match: format text has no prompt"),
        (["--general", "nowhere.jsonl"], "--general nowhere.jsonl: not found"),
        (["--general", "data/general/eval.jsonl", "--no-general"], "--general and --no-general: give one of them"),
        (["--metric", "sql_execution"], "sql_execution needs database"),
        (["--metric", "bleu"], "found 'bleu', allowed:"),
    ],
)
def test_bad_answers_are_one_line_and_write_nothing(workdir: Path, args: list[str], expected: str) -> None:
    result = invoke("init", "recipes/bad.yaml", *args)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "recipes").exists()
