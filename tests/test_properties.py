"""Property tests: whatever a recipe file, a --set option, a data file or a data row holds, loading and formatting
end in a result or in sovtune's own error (one line for the user), never in another exception."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import qa_rows, write_jsonl
from sovtune.config import DataSection, Recipe, load_recipe
from sovtune.config.loader import _model_in_annotation
from sovtune.data import Example, Row, RowError, Tokenized, _read_file, to_example, tokenize
from sovtune.errors import DataError, RecipeError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def field_paths(model: Any = Recipe, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every settable field of the recipe schema, as key paths: the places a user's typo or wrong value lands."""
    paths = []
    for name, field in model.model_fields.items():
        if name == "source_path":
            continue
        paths.append(prefix + (name,))
        section = _model_in_annotation(field.annotation)
        if section is not None:
            paths.extend(field_paths(section, prefix + (name,)))
    return paths


FIELD_PATHS = field_paths()
KEY = st.sampled_from(sorted({part for path in FIELD_PATHS for part in path})) | st.text(max_size=12)
SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["${HOME}", "${SOVTUNE_UNSET}", "${SOVTUNE_UNSET:-x}", "all-linear", "4bit", "../x", "/", ""])
)
VALUE = st.recursive(
    SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3), max_leaves=10
)


@pytest.fixture(scope="module")
def valid_recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("properties")
    data = write_jsonl(folder / "train.jsonl", qa_rows(8))
    return {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": str(data)}, "train": {"max_steps": 2}}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recipe") / "recipe.yaml"


def load_or_refuse(path: Path, overrides: list[str] | None = None) -> None:
    try:
        assert isinstance(load_recipe(path, overrides or []), Recipe)
    except RecipeError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), message  # one line for the terminal


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


@SETTINGS
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(FIELD_PATHS) | st.lists(KEY, min_size=1, max_size=3).map(tuple), VALUE), max_size=4
    )
)
def test_a_recipe_with_any_values_loads_or_is_refused(
    valid_recipe: dict[str, Any], recipe_file: Path, changes: list[tuple[tuple[str, ...], Any]]
) -> None:
    tree = json.loads(json.dumps(valid_recipe))
    for path, value in changes:
        set_path(tree, path, value)
    recipe_file.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    load_or_refuse(recipe_file)


# Recipe-shaped YAML, line by line, with the constructs that trip hand-written loaders: tags, anchors and aliases
# (also self-referencing), complex keys, merge keys, flow collections, block scalars, unterminated quotes.
YAML_KEY = KEY | st.sampled_from(
    ["? [a, b]", "[1, 2]", "{a: 1}", "&k model", "*k", "<<", "!foo model", "'quoted'", "1"]
)
YAML_VALUE = st.sampled_from(
    [
        "!foo bar",
        "!!python/object:os.system ''",
        "!!int abc",
        "!!float x",
        "!!binary ***",
        "!!timestamp 2001-99-99",
        "&a [*a]",
        "&b {x: *b}",
        "*a",
        "*undefined",
        "&c x",
        "[",
        "{",
        "{[1]: 2}",
        "{? {a: 1}: b}",
        "|",
        ">",
        "'unterminated",
        '"\\x"',
        "1e400",
        "0x1F",
        ".nan",
        "~",
        "2001-12-14",
        "${HOME}",
        "${SOVTUNE_UNSET}",
        "-",
        "- x",
        "[a, [b, [c]]]",
    ]
) | SCALAR.map(lambda value: yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip())
YAML_LINE = st.tuples(
    st.sampled_from(["", "  ", "    ", "\t", "- ", "  - "]), YAML_KEY, st.sampled_from([": ", ":", " "]), YAML_VALUE
)
YAML_TEXT = st.lists(YAML_LINE.map("".join), max_size=12).map("\n".join)


@SETTINGS
@given(text=YAML_TEXT | st.text())
def test_any_text_as_a_recipe_file_loads_or_is_refused(recipe_file: Path, text: str) -> None:
    recipe_file.write_text(text, encoding="utf-8", errors="surrogatepass")
    load_or_refuse(recipe_file)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_any_bytes_as_a_recipe_file_load_or_are_refused(recipe_file: Path, raw: bytes) -> None:
    recipe_file.write_bytes(raw)
    load_or_refuse(recipe_file)


@SETTINGS
@given(overrides=st.lists(
    st.tuples(st.sampled_from(FIELD_PATHS).map(".".join) | st.text(max_size=15), st.text(max_size=15)).map("=".join)
    | st.text(max_size=20),
    max_size=3,
))  # fmt: skip
def test_any_set_options_load_or_are_refused(
    valid_recipe: dict[str, Any], recipe_file: Path, overrides: list[str]
) -> None:
    recipe_file.write_text(yaml.safe_dump(valid_recipe), encoding="utf-8")
    load_or_refuse(recipe_file, overrides)


# ---------------------------------------------------------------------------------------------------------------
# Data: rows -> examples -> tokens


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


ROLE = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "bot", ""]) | st.text(max_size=5)
ANY_TEXT = st.text(st.characters(), max_size=40)  # lone surrogates: see test_a_lone_surrogate_in_a_json_row
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
MESSAGE = (
    st.fixed_dictionaries({"role": ROLE, "content": ANY_TEXT | JSON_VALUE})
    | st.fixed_dictionaries({"from": ROLE, "value": ANY_TEXT | JSON_VALUE})
    | JSON_VALUE
)
COLUMN = st.sampled_from(["messages", "instruction", "input", "output", "system", "prompt", "completion", "text", "q"])
ROW = st.dictionaries(COLUMN, ANY_TEXT | JSON_VALUE | st.lists(MESSAGE, max_size=4), max_size=5)
SECTION = st.fixed_dictionaries(
    {
        "format": st.sampled_from(["messages", "instruction", "prompt_completion", "text"]),
        "max_length": st.integers(9, 64),
    },
    optional={"train_on_inputs": st.booleans()},
)


def data_section(spec: dict[str, Any]) -> DataSection:
    if spec["format"] == "text":
        spec = {key: value for key, value in spec.items() if key != "train_on_inputs"}
    return DataSection.model_validate({"train": "rows.jsonl", **spec})


def format_or_refuse(row: Row, section: DataSection, tokenizer: Any) -> None:
    try:
        example = to_example(row, section, tokenizer)
    except (RowError, DataError) as exc:
        assert str(exc).strip()
        return
    assert isinstance(example, Example)
    tokens = tokenize(example, tokenizer, section.max_length)
    assert isinstance(tokens, Tokenized)
    assert len(tokens.input_ids) == len(tokens.labels) <= section.max_length


@SETTINGS
@given(values=ROW, spec=SECTION)
def test_any_row_becomes_an_example_or_a_row_error(
    tokenizer: Any, values: dict[str, Any], spec: dict[str, Any]
) -> None:
    format_or_refuse(Row(values, "rows.jsonl:1"), data_section(spec), tokenizer)


@SETTINGS
@given(messages=st.lists(MESSAGE, max_size=5), spec=SECTION)
def test_any_conversation_becomes_an_example_or_a_row_error(
    tokenizer: Any, messages: list[Any], spec: dict[str, Any]
) -> None:
    format_or_refuse(
        Row({"messages": messages}, "rows.jsonl:1"), data_section({**spec, "format": "messages"}), tokenizer
    )


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-files")


@SETTINGS
@given(
    raw=st.binary(max_size=300) | st.lists(JSON_VALUE.map(json.dumps), max_size=5).map("\n".join).map(str.encode),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]),
    spec=SECTION,
)
def test_any_file_reads_to_rows_or_a_data_error(
    tokenizer: Any, data_folder: Path, raw: bytes, suffix: str, spec: dict[str, Any]
) -> None:
    path = data_folder / f"rows{suffix}"
    path.write_bytes(raw)
    section = data_section(spec)
    try:
        rows = list(_read_file(path, section.format))
    except DataError as exc:
        assert str(exc).startswith(str(path))  # names the file
        return
    for row in rows:
        assert row.origin.startswith(str(path))  # every row knows its file (and line)
        format_or_refuse(row, section, tokenizer)


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff"])
def test_a_lone_surrogate_in_a_json_row_is_a_row_error(tokenizer: Any, data_folder: Path, escape: str) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"): json.loads accepts it, no tokenizer can encode it."""
    path = data_folder / "surrogate.jsonl"
    path.write_text('{"prompt": "How many? %s", "completion": "Twelve."}\n' % escape, encoding="utf-8")
    section = data_section({"format": "prompt_completion", "max_length": 32})
    (row,) = _read_file(path, section.format)
    with pytest.raises((RowError, DataError)):
        tokenize(to_example(row, section, tokenizer), tokenizer, section.max_length)
