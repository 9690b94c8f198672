"""Relative paths in recipes: each resolves against the folder of the recipe file that wrote it, through any depth of
`extends`; --set paths against the working directory; a run directory's recipe.yaml still loads with the same files.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sovtune.config import Recipe, load_recipe, load_run_recipe
from sovtune.errors import RecipeError


def at(recipe: Recipe, value: str | None) -> Path:
    """Where a recipe path points, normalised ("a/../b" -> "b")."""
    assert value is not None
    return recipe.resolve(value).resolve()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A project folder: data/, a model folder, a user metric and a SQLite file, each at its own place."""
    for name in ("data/train.jsonl", "data/eval.jsonl", "data/general.jsonl", "data/general-train.jsonl"):
        write(tmp_path / name, '{"text": "x"}\n')
    (tmp_path / "models" / "base").mkdir(parents=True)
    write(tmp_path / "metrics" / "score.py", "def score(prediction, reference, row):\n    return 1.0\n")
    write(tmp_path / "db" / "company.db", "")
    write(tmp_path / "templates" / "chat.jinja", "{{ messages }}")
    return tmp_path


# Every kind of path field, each written relative to base.yaml's folder (`recipes/`).
BASE = """\
model:
  name_or_path: ../models/base
data:
  train:
    - ../data/train.jsonl
    - {path: ../data/general-train.jsonl, format: text, weight: 0.2}
  eval: ../data/eval.jsonl
  chat_template: ../templates/chat.jinja
eval:
  datasets:
    - name: sql
      metrics: [loss, sql_execution]
      database: ../db/company.db
      user_metrics: [{name: mine, module: ../metrics/score.py, function: score}]
  general: {path: ../data/general.jsonl, train: ../data/general-train.jsonl}
sovereignty:
  audit_log: ../audit/log.jsonl
"""


def assert_every_path_found(project: Path, recipe_path: Path, overrides: tuple[str, ...] = ()) -> None:
    recipe = load_recipe(recipe_path, overrides)
    assert Path(recipe.model_location).resolve() == project / "models" / "base"
    assert [at(recipe, source.path) for source in recipe.data.train] == [
        project / "data" / "train.jsonl",
        project / "data" / "general-train.jsonl",
    ]
    assert recipe.data.eval is not None and at(recipe, recipe.data.eval.path) == project / "data" / "eval.jsonl"
    assert recipe.data.chat_template and at(recipe, recipe.data.chat_template) == project / "templates/chat.jinja"
    dataset = recipe.eval.datasets[0]
    assert dataset.database and at(recipe, dataset.database) == project / "db" / "company.db"
    assert at(recipe, dataset.user_metrics[0].module) == project / "metrics" / "score.py"
    general = recipe.eval.general
    assert general is not None and general.train is not None
    assert at(recipe, general.path) == project / "data" / "general.jsonl"
    assert at(recipe, general.train) == project / "data" / "general-train.jsonl"
    assert recipe.sovereignty.audit_log and at(recipe, recipe.sovereignty.audit_log) == project / "audit/log.jsonl"


def test_paths_of_the_loaded_recipe_resolve_against_its_folder(project: Path) -> None:
    assert_every_path_found(project, write(project / "recipes" / "base.yaml", BASE))


@pytest.mark.parametrize(
    "child, extends",
    [
        ("recipes/sub/child.yaml", "../base.yaml"),  # base in the parent folder (the case)
        ("other/child.yaml", "../recipes/base.yaml"),  # base in a sibling folder
        ("child.yaml", "recipes/base.yaml"),  # base in a child folder
    ],
)
def test_paths_of_an_extended_recipe_resolve_against_the_extended_file(project: Path, child: str, extends: str) -> None:
    write(project / "recipes" / "base.yaml", BASE)
    child_path = write(project / child, f"extends: {extends}\ntrain:\n  max_steps: 3\n")
    assert_every_path_found(project, child_path)


def test_three_levels_of_extends_each_in_its_own_folder(project: Path) -> None:
    write(project / "recipes" / "base.yaml", BASE)
    # The middle recipe overrides one path, relative to its own folder; the others come from base.yaml.
    write(project / "teams" / "sql" / "middle.yaml", "extends: ../../recipes/base.yaml\ndata:\n  eval: eval.jsonl\n")
    write(project / "teams" / "sql" / "eval.jsonl", '{"text": "y"}\n')
    top = write(project / "runs-config" / "a" / "b" / "top.yaml", "extends: ../../../teams/sql/middle.yaml\n")
    recipe = load_recipe(top)
    assert recipe.data.eval is not None
    assert at(recipe, recipe.data.eval.path) == project / "teams" / "sql" / "eval.jsonl"
    assert [at(recipe, source.path) for source in recipe.data.train][0] == project / "data" / "train.jsonl"
    assert Path(recipe.model_location).resolve() == project / "models" / "base"


def test_the_loaded_recipe_keeps_its_own_relative_paths_as_written(project: Path) -> None:
    write(project / "recipes" / "base.yaml", BASE)
    child = write(project / "recipes" / "sub" / "child.yaml", "extends: ../base.yaml\ndata:\n  eval: ../x.jsonl\n")
    recipe = load_recipe(child)
    assert recipe.data.eval is not None and recipe.data.eval.path == "../x.jsonl"  # the child's own path, as written
    assert at(recipe, recipe.data.eval.path) == project / "recipes" / "x.jsonl"


def test_set_paths_resolve_against_the_working_directory(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe_path = write(project / "recipes" / "base.yaml", BASE)
    write(project / "work" / "mine.jsonl", '{"text": "z"}\n')
    monkeypatch.chdir(project / "work")
    recipe = load_recipe(
        recipe_path,
        [
            "data.train=mine.jsonl",
            "eval.general.path=../data/general.jsonl",
            "model.name_or_path=org/m",
            "model.revision=abc",
        ],
    )
    assert [at(recipe, source.path) for source in recipe.data.train] == [project / "work" / "mine.jsonl"]
    assert recipe.eval.general is not None
    assert at(recipe, recipe.eval.general.path) == project / "data" / "general.jsonl"
    # A hub id stays a hub id (it is not a folder in the working directory).
    assert recipe.model.name_or_path == "org/m" and not recipe.model_is_local


def test_set_of_a_list_of_sources_resolves_every_item_against_the_working_directory(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe_path = write(project / "recipes" / "base.yaml", BASE)
    monkeypatch.chdir(project)
    recipe = load_recipe(recipe_path, ["data.train=[data/train.jsonl, {path: data/general-train.jsonl, weight: 0.5}]"])
    assert [at(recipe, source.path) for source in recipe.data.train] == [
        project / "data" / "train.jsonl",
        project / "data" / "general-train.jsonl",
    ]


def test_absolute_paths_hub_ids_and_inline_templates_are_kept(project: Path) -> None:
    write(project / "recipes" / "base.yaml", BASE)
    child = write(
        project / "recipes" / "sub" / "child.yaml",
        f"""\
        extends: ../base.yaml
        data:
          train: {project / "data" / "train.jsonl"}
          chat_template: "{{{{ bos_token }}}}{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}"
        """,
    )
    recipe = load_recipe(child)
    assert recipe.data.train[0].path == str(project / "data" / "train.jsonl")
    assert recipe.data.chat_template is not None and recipe.data.chat_template.startswith("{{ bos_token }}")
    base = write(
        project / "elsewhere" / "hub.yaml", "model:\n  name_or_path: org/model\n  revision: abc\ndata:\n  train: x\n"
    )
    hub = load_recipe(write(project / "recipes" / "sub" / "hub-child.yaml", f"extends: {base}\n"))
    assert hub.model.name_or_path == "org/model" and hub.data.train[0].path == "x"  # hub ids, untouched


def test_a_missing_file_of_an_extended_recipe_is_named_where_it_was_looked_for(project: Path) -> None:
    write(project / "recipes" / "base.yaml", BASE.replace("../data/train.jsonl", "../data/missing.jsonl"))
    recipe = load_recipe(write(project / "recipes" / "sub" / "child.yaml", "extends: ../base.yaml\n"))
    assert at(recipe, recipe.data.train[0].path) == project / "data" / "missing.jsonl"


@pytest.mark.parametrize("child", ["recipes/sub/child.yaml", "child.yaml", "recipes/base.yaml"])
def test_the_run_directory_recipe_loads_later_with_the_same_files(project: Path, child: str) -> None:
    base = write(project / "recipes" / "base.yaml", BASE)
    if child == "recipes/base.yaml":  # no extends: the recorded recipe keeps the file's own relative paths
        child_path = base
    else:
        child_path = write(project / child, f"extends: {'../base.yaml' if 'sub' in child else 'recipes/base.yaml'}\n")
    recipe = load_recipe(child_path)
    run_dir = project / "runs" / "child"
    write(run_dir / "recipe.yaml", recipe.to_yaml())  # what training writes
    if child_path == base:
        assert "database: ../db/company.db" in (run_dir / "recipe.yaml").read_text()
    again = load_run_recipe(run_dir)
    assert again.eval.datasets[0].database and recipe.eval.datasets[0].database
    assert at(again, again.eval.datasets[0].database) == project / "db" / "company.db"
    for before, after in zip(recipe.data.train, again.data.train):
        assert at(recipe, before.path) == at(again, after.path)
    assert again.model_location == recipe.model_location
    assert again.eval.general is not None and recipe.eval.general is not None
    assert at(again, again.eval.general.path) == project / "data" / "general.jsonl"
    assert at(again, again.eval.datasets[0].user_metrics[0].module) == project / "metrics" / "score.py"


def test_extends_with_a_relative_path_that_is_wrong_for_the_base_still_fails_with_its_location(project: Path) -> None:
    write(project / "recipes" / "base.yaml", BASE + "extends: nowhere.yaml\n")
    with pytest.raises(RecipeError, match=r"base\.yaml:\d+: extends: .*nowhere\.yaml not found"):
        load_recipe(write(project / "recipes" / "sub" / "child.yaml", "extends: ../base.yaml\n"))
