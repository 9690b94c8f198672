"""Write docs/recipe-reference.md from the recipe schema: each field's help text lives once, next to the field.

Every field at every depth is listed under its full path: sections (`eval.generation.max_new_tokens`), list entries
(`eval.datasets[].metrics`) and mapping values (`eval.gates.<name>.min_gain`). Regenerate after changing the schema:

    python scripts/gen_recipe_reference.py            # rewrite the file
    python scripts/gen_recipe_reference.py --check    # exit 1 if it is stale (tests/test_recipe_reference.py)
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from generated_doc import write_or_check  # scripts/ is on sys.path when a script here runs
from sovtune.config import Recipe

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "recipe-reference.md"
COMMAND = "python scripts/gen_recipe_reference.py"
INTERNAL = {"source_path"}  # set by the loader, never written in a recipe


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _parts(annotation: Any) -> list[Any]:
    """The members of a union (X | None, Union[...]), or the annotation itself."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return list(typing.get_args(annotation))
    return [annotation]


def _nested(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """Where a field holds sections: ('', M) for a section, ('[]', M) for a list of them, ('.<name>', M) for a
    mapping of names to them."""
    for part in _parts(annotation):
        origin, args = typing.get_origin(part), typing.get_args(part)
        if _is_model(part):
            return "", part
        if origin is list and args and _is_model(args[0]):
            return "[]", args[0]
        if origin is dict and len(args) == 2 and _is_model(args[1]):
            return ".<name>", args[1]
    return None


def accepts_text(model: type[BaseModel]) -> bool:
    """A section that may be written as a plain path (e.g. `data.eval: eval.jsonl` for `{path: eval.jsonl}`)."""
    try:
        model.model_validate("path")
    except ValueError:
        return False
    return True


def type_text(annotation: Any) -> str:
    """A type as a recipe author reads it: `one of a, b`, `list of str`, `mapping of str to str`, `or null`."""
    parts = _parts(annotation)
    optional = type(None) in parts
    text = " or ".join(_one_type(part) for part in parts if part is not type(None))
    return text + ((", or null" if " or " in text else " or null") if optional else "")


def _one_type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        values = ", ".join(f"`{_yaml(value)}`" for value in args)
        return f"one of {values}" if len(args) > 1 else values
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if _is_model(annotation):
        return "path or section" if accepts_text(annotation) else "section"
    if origin is not None:
        return " or ".join(_one_type(arg) for arg in args)
    return {int: "integer", float: "number", str: "text", bool: "true/false"}.get(annotation, annotation.__name__)


def _yaml(value: Any) -> str:
    """A value as it is written in a recipe (YAML flow style)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and all(isinstance(item, BaseModel) for item in value):
        return f"{len(value)} entry with the defaults below" if len(value) == 1 else f"{len(value)} entries"
    return f"`{_yaml(value)}`"


def rows(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    """(path, type, default, description) of every field of `model` and of the sections inside it, depth first."""
    for name, field in model.model_fields.items():
        if name in INTERNAL:
            continue
        path = f"{prefix}.{name}" if prefix else name
        nested = _nested(field.annotation)
        description = (field.description or (nested[1].__doc__ if nested else "") or "").strip()
        kind = type_text(field.annotation)
        if nested is not None and nested[0] == "[]":
            entries = "a path, an entry, or a list of them" if accepts_text(nested[1]) else "list of entries"
            kind = f"{entries} ({path}[].*)"
        elif nested is not None and nested[0] == ".<name>":
            kind = f"mapping of names to entries ({path}.<name>.*)"
        yield path, kind, default_text(field), " ".join(description.split())
        if nested is not None:
            yield from rows(nested[1], path + nested[0])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = [
        "# Recipe reference",
        "",
        f"Generated from the schema in `src/sovtune/config/schema.py` by `{COMMAND}`; do not edit it by hand (a test "
        "fails when it is stale). Every field at every depth is listed under its full path: `a.b` is key `b` of "
        "section `a`, `a[].b` is key `b` of each entry of the list `a`, and `a.<name>.b` is key `b` of each entry "
        "of the mapping `a`. Unknown keys are errors. Before validation the loader resolves `extends:` (a base "
        "recipe merged under this one), `${VAR}` / `${VAR:-default}` and `--set section.field=value`. Relative "
        "paths resolve against the folder of the recipe file.",
        "",
        "## Top level",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    sections = []
    for name, field in Recipe.model_fields.items():
        if name in INTERNAL:
            continue
        nested = _nested(field.annotation)
        if nested is not None:
            sections.append((name, nested[1]))
        description = " ".join((field.description or (nested[1].__doc__ if nested else "") or "").split())
        lines.append(
            f"| `{name}` | {_cell(type_text(field.annotation))} | {_cell(default_text(field))} | {_cell(description)} |"
        )
    for name, model in sections:
        lines += ["", f"## `{name}`", "", "| key | type | default | description |", "|---|---|---|---|"]
        for path, kind, default, description in rows(model, name):
            lines.append(f"| `{path}` | {_cell(kind)} | {_cell(default)} | {_cell(description)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    return write_or_check(__doc__, OUT, render, "recipe schema", COMMAND)


if __name__ == "__main__":
    sys.exit(main())
