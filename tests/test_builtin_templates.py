"""data.chat_template names a built-in template for bases whose tokenizer ships none, and an installed sovtune has
them (package data)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sovtune.config import DataSection, load_recipe
from sovtune.data import Row, to_example, tokenize
from sovtune.model import builtin_templates, load_tokenizer, read_chat_template

REPO = Path(__file__).resolve().parents[1]
BUILTINS = ["chatml", "deepseek", "llama2", "llama3", "mistral", "plain", "starcoder2"]
CHAT = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Twelve."}]


def test_the_built_ins_are_the_files_and_the_recipe_reference_names_them_all() -> None:
    assert builtin_templates() == BUILTINS
    described = DataSection.model_fields["chat_template"].description or ""
    assert re.findall(r"\b(?:" + "|".join(BUILTINS) + r")\b", described) == BUILTINS
    for name in BUILTINS:
        source = (REPO / "src/sovtune/templates" / f"{name}.jinja").read_text(encoding="utf-8")
        assert source.startswith(f'{{#- sovtune built-in "{name}": ')  # each says where it comes from


@pytest.mark.parametrize("name", BUILTINS)
def test_a_built_in_is_read_by_name_and_renders_a_conversation(name: str, make_recipe) -> None:
    recipe = load_recipe(make_recipe(data={"chat_template": name}))
    tokenizer = load_tokenizer(recipe)
    assert tokenizer.chat_template == read_chat_template(recipe)
    assert "sovtune built-in" not in tokenizer.apply_chat_template(CHAT, tokenize=False)  # the comment renders nothing
    tokens = tokenize(to_example(Row({"messages": CHAT}, "t:1"), recipe.data, tokenizer), tokenizer, 256)
    assert tokens.supervised_tokens > 0 and tokens.exact


def test_the_shipped_llama_and_mistral_recipes_use_built_ins_not_copied_files() -> None:
    for name, template in [
        ("llama-3.1-8b-lora-80gb", "llama3"),
        ("llama-3.1-8b-multi-gpu", "llama3"),
        ("mistral-7b-qlora-24gb", "mistral"),
    ]:
        assert load_recipe(REPO / "recipes" / f"{name}.yaml").data.chat_template == template
    assert not (REPO / "recipes" / "templates").exists()


def test_an_installed_sovtune_has_the_templates(tmp_path: Path) -> None:
    """Build the wheel as pip would and look inside: package data, not files that only a source checkout has."""
    project = tmp_path / "project"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    result = subprocess.run([*command, str(project)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("sovtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"sovtune/templates/{name}.jinja" for name in BUILTINS} <= names
