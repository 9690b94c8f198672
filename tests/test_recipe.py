"""Recipe loading and validation: good recipes load typed, bad ones fail with one exact, actionable line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sovtune.config import load_recipe
from sovtune.errors import RecipeError

MINIMAL = """\
model:
  name_or_path: ./base-model
data:
  train: train.jsonl
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "a recipe error must be one line"
    return message


# ---------------------------------------------------------------------------------------------------------------
# Good recipes


def test_minimal_recipe_gets_defaults_and_resolves_paths_relative_to_the_recipe(tmp_path: Path) -> None:
    path = write(tmp_path / "recipes", "my-run.yaml", MINIMAL)
    recipe = load_recipe(path)
    assert recipe.name == "my-run"  # default name: the file name
    assert recipe.adapter.type == "lora" and recipe.adapter.target_modules == "all-linear"
    assert recipe.adapter.lora_alpha == 2 * recipe.adapter.r
    assert recipe.quantization.mode == "none"
    assert recipe.model.trust_remote_code is False
    assert recipe.data.format == "messages" and recipe.data.train_on_inputs is False
    assert [source.path for source in recipe.data.train] == ["train.jsonl"]
    assert recipe.resolve("train.jsonl") == tmp_path / "recipes" / "train.jsonl"
    assert recipe.model_location == str(tmp_path / "recipes" / "base-model")
    assert recipe.run_dir == Path("runs") / "my-run"


def test_resolved_recipe_round_trips_through_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  learning_rate: 0.001\n  max_steps: 7\n")
    recipe = load_recipe(path)
    # Saved into a run directory elsewhere, relative paths still resolve against the original recipe's folder.
    again = write(tmp_path / "runs" / "r", "recipe.yaml", recipe.to_yaml())
    reloaded = load_recipe(again)
    assert reloaded.train.learning_rate == 0.001 and reloaded.train.max_steps == 7
    assert reloaded.model_dump(exclude={"source_path"}) == recipe.model_dump(exclude={"source_path"})
    assert reloaded.resolve("train.jsonl") == tmp_path / "train.jsonl"
    assert reloaded.model_location == str(tmp_path / "base-model")


def test_hub_model_with_pinned_revision_is_accepted(tmp_path: Path) -> None:
    text = MINIMAL.replace("name_or_path: ./base-model", "name_or_path: org/model\n  revision: abc123")
    recipe = load_recipe(write(tmp_path, "pinned.yaml", text))
    assert recipe.model.revision == "abc123" and not recipe.model_is_local


# ---------------------------------------------------------------------------------------------------------------
# Field errors: file, line, field, what was found, what is allowed


def test_unknown_section_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "trian:\n  max_steps: 3\n")
    assert error_of(path) == f"{path}:5: trian: unknown key; did you mean 'train'?"


def test_unknown_field_names_file_line_and_did_you_mean(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  max_steps: 3\n  learnin_rate: 0.1\n")
    assert error_of(path) == f"{path}:7: train.learnin_rate: unknown key; did you mean 'train.learning_rate'?"


def test_unknown_field_without_a_close_match_lists_what_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "output:\n  zzz: 1\n")
    assert error_of(path) == f"{path}:6: output.zzz: unknown key; allowed: dir"


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  batch_size: many\n")
    assert error_of(path) == (
        f"{path}:6: train.batch_size: input should be a valid integer, unable to parse string as an integer, "
        "found 'many'"
    )


def test_out_of_range_value(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  learning_rate: 2\n")
    assert error_of(path) == (
        f"{path}:6: train.learning_rate: input should be less than 1, found 2 (allowed: more than 0 to less than 1)"
    )


def test_literal_choice_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "  format: mesages\n")
    assert error_of(path) == (
        f"{path}:5: data.format: found 'mesages', allowed: 'messages', 'instruction', 'prompt_completion' or 'text'; "
        "did you mean 'messages'?"
    )


def test_missing_required_section(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "model:\n  name_or_path: ./m\n")
    message = error_of(path)
    assert message.startswith(f"{path}: data: required field is missing; add it (")
    assert "data.train" in message  # the help text says what to write


def test_missing_required_field_inside_a_section(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "model:\n  revision: main\ndata:\n  train: t.jsonl\n")
    assert error_of(path) == (
        f"{path}:1: model.name_or_path: required field is missing; add it "
        "(Hub id (e.g. mistralai/Mistral-7B-v0.3) or a local folder with config and weights.)"
    )


def test_pattern_error_keeps_the_pattern_verbatim(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: bad name\n" + MINIMAL)
    assert error_of(path) == (
        f"{path}:1: name: string should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$', found 'bad name'"
    )


def test_empty_train_list(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL.replace("train: train.jsonl", "train: []"))
    assert error_of(path) == f"{path}:4: data.train: list should have at least 1 item after validation, not 0"


def test_more_errors_are_counted_not_dumped(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  batch_size: x\n  seed: y\n")
    message = error_of(path)
    assert message.startswith(f"{path}:6: train.batch_size:")
    assert message.endswith("(+1 more: run `sovtune check` after fixing this one)")


def test_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "data:\n  train: other.jsonl\n")
    assert error_of(path) == f"{path}:5: key 'data' appears twice; keep one"


# ---------------------------------------------------------------------------------------------------------------
# File-level errors


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "  format: [messages\n")
    assert error_of(path) == (
        f"{path}:6: invalid YAML: expected ',' or ']', but got '<stream end>'; "
        "fix the syntax (indentation, quotes, colons)"
    )


def test_bad_indentation_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "model:\n  name_or_path: ./m\n revision: x\ndata:\n  train: t.jsonl\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3: invalid YAML: ")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "# only a comment\n")
    assert error_of(path) == f"{path}: recipe is empty; see recipes/quickstart.yaml for a complete example"


def test_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "- model\n- data\n")
    assert error_of(path) == f"{path}:1: a recipe must be a mapping of sections (model:, data:, ...)"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: recipe file not found; check the path (recipes live in recipes/)"


def test_non_utf8_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(MINIMAL.encode() + b"description: caf\xe9\n")
    assert error_of(path) == f"{path}: not UTF-8 text (byte {len(MINIMAL) + 16}); save the recipe as UTF-8"


# ---------------------------------------------------------------------------------------------------------------
# extends


def test_extends_merges_sections_and_finds_the_parent_relative_to_the_child(tmp_path: Path) -> None:
    write(tmp_path / "base", "common.yaml", MINIMAL + "train:\n  learning_rate: 0.001\n  max_steps: 3\n  seed: 7\n")
    child = write(tmp_path / "recipes", "child.yaml", "extends: ../base/common.yaml\ntrain:\n  max_steps: 5\n")
    recipe = load_recipe(child)
    assert recipe.train.max_steps == 5  # the child wins
    assert recipe.train.learning_rate == 0.001 and recipe.train.seed == 7  # the rest of the section is inherited
    assert recipe.name == "child"
    # A path resolves against the folder of the recipe that wrote it (tests/test_recipe_paths.py has every case).
    assert recipe.resolve(recipe.data.train[0].path) == tmp_path / "base" / "train.jsonl"


def test_extends_chain_of_three(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL + "adapter:\n  r: 8\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\nadapter:\n  dropout: 0.1\n")
    recipe = load_recipe(write(tmp_path, "c.yaml", "extends: b.yaml\nadapter:\n  alpha: 4\n"))
    assert (recipe.adapter.r, recipe.adapter.dropout, recipe.adapter.alpha) == (8, 0.1, 4)


def test_error_in_child_points_at_the_child_line(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", MINIMAL + "train:\n  max_steps: 3\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\n\ntrain:\n  batch_size: x\n")
    assert error_of(child).startswith(f"{child}:4: train.batch_size: input should be a valid integer")


def test_error_in_parent_points_at_the_parent_line(tmp_path: Path) -> None:
    parent = write(tmp_path, "base.yaml", MINIMAL + "adapter:\n  typ: lora\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\ntrain:\n  max_steps: 3\n")
    assert error_of(child) == f"{parent}:6: adapter.typ: unknown key; did you mean 'adapter.type'?"


def test_extends_cycle(tmp_path: Path) -> None:
    first = write(tmp_path, "a.yaml", "extends: b.yaml\n" + MINIMAL)
    second = write(tmp_path, "b.yaml", "extends: a.yaml\n")
    assert error_of(first) == f"{first}: extends forms a cycle ({first} -> {second} -> {first}); remove one extends"


def test_extends_missing_parent(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", "# child\nextends: nope.yaml\n")
    assert error_of(child) == (
        f"{child}:2: extends: {tmp_path / 'nope.yaml'} not found; give a path relative to this recipe"
    )


def test_extends_must_be_a_path(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", "extends: [a.yaml]\n")
    assert error_of(child) == f"{child}:1: extends must be a path to another recipe, found ['a.yaml']"


# ---------------------------------------------------------------------------------------------------------------
# --set overrides


def test_set_overrides_are_typed_by_the_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  max_steps: 3\n")
    recipe = load_recipe(
        path,
        [
            "train.learning_rate=1e-4",
            "train.max_steps=12",
            "train.gradient_checkpointing=false",
            "adapter.target_modules=[q_proj, v_proj]",
            "data.train=other.jsonl",
            "output.dir=/tmp/x",
        ],
    )
    assert recipe.train.learning_rate == 1e-4 and isinstance(recipe.train.learning_rate, float)
    assert recipe.train.max_steps == 12 and isinstance(recipe.train.max_steps, int)
    assert recipe.train.gradient_checkpointing is False
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert [source.path for source in recipe.data.train] == ["other.jsonl"]  # the recipe's folder is the cwd here
    assert recipe.run_dir == Path("/tmp/x")


def test_later_set_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert load_recipe(path, ["adapter.r=4", "adapter.r=32"]).adapter.r == 32


def test_set_null_removes_a_field_so_a_conflicting_one_can_be_given(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  epochs: 3\n")
    recipe = load_recipe(path, ["train.max_steps=10", "train.epochs=null"])
    assert recipe.train.max_steps == 10 and recipe.train.epochs == 1.0 and not recipe.train.explicitly_set("epochs")
    assert error_of(path, ["model.name_or_path=null"]) == (
        "--set: model.name_or_path: required field is missing; add it "
        "(Hub id (e.g. mistralai/Mistral-7B-v0.3) or a local folder with config and weights.)"
    )


def test_set_of_one_stopping_rule_replaces_the_recipes_other(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  epochs: 3\n")
    quick = load_recipe(path, ["train.max_steps=10"])  # what `sovtune init`'s recipes suggest for a quick try
    assert quick.train.max_steps == 10 and not quick.train.explicitly_set("epochs")
    steps = write(tmp_path, "s.yaml", MINIMAL + "train:\n  max_steps: 30\n")
    longer = load_recipe(steps, ["train.epochs=2"])
    assert longer.train.epochs == 2 and longer.train.max_steps is None
    # Both on the command line: still a conflict, said as such.
    assert "give epochs or max_steps, not both" in error_of(path, ["train.max_steps=10", "train.epochs=2"])


def test_set_into_a_list_item_by_index(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL.replace("train: train.jsonl", "train: [a.jsonl, {path: b.jsonl}]"))
    recipe = load_recipe(path, ["data.train.1.weight=0.3"])
    assert recipe.data.train[1].weight == 0.3 and recipe.data.train[1].path == "b.jsonl"
    assert error_of(path, ["data.train.5.weight=0.3"]) == (
        "--set data.train.5.weight: '5' is not an item of a list of 2; use an index from 0 to 1"
    )


def test_set_bad_key_names_set_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert error_of(path, ["train.learnin_rate=1e-4"]) == (
        "--set: train.learnin_rate: unknown key; did you mean 'train.learning_rate'?"
    )


def test_set_bad_section_names_set(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert error_of(path, ["trainer.max_steps=3"]) == "--set: trainer: unknown key; did you mean 'train'?"


def test_set_bad_value_names_set(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert error_of(path, ["train.batch_size=lots"]) == (
        "--set: train.batch_size: input should be a valid integer, unable to parse string as an integer, found 'lots'"
    )


def test_set_without_equals(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert error_of(path, ["train.learning_rate"]) == (
        "--set 'train.learning_rate': expected section.field=value, e.g. --set train.learning_rate=1e-4"
    )


def test_set_into_a_value_that_is_not_a_section(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  max_steps: 3\n")
    assert error_of(path, ["train.max_steps.x=1"]) == "--set train.max_steps.x: max_steps is not a section"


# ---------------------------------------------------------------------------------------------------------------
# ${ENV} interpolation


def test_env_interpolation_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOVTUNE_TEST_MODELS", "/models")
    monkeypatch.delenv("SOVTUNE_TEST_DATA", raising=False)
    path = write(
        tmp_path,
        "r.yaml",
        "model:\n  name_or_path: ${SOVTUNE_TEST_MODELS}/tiny\ndata:\n  train: ${SOVTUNE_TEST_DATA:-data/train.jsonl}\n",
    )
    recipe = load_recipe(path)
    assert recipe.model.name_or_path == "/models/tiny"
    assert recipe.data.train[0].path == "data/train.jsonl"


def test_env_value_is_typed_by_the_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOVTUNE_TEST_LR", "3e-4")
    path = write(tmp_path, "r.yaml", MINIMAL + "train:\n  learning_rate: ${SOVTUNE_TEST_LR}\n")
    assert load_recipe(path).train.learning_rate == 3e-4


def test_env_in_set_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOVTUNE_TEST_OUT", str(tmp_path / "out"))
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert load_recipe(path, ["output.dir=${SOVTUNE_TEST_OUT}/run"]).run_dir == tmp_path / "out" / "run"


def test_unset_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOVTUNE_TEST_UNSET", raising=False)
    path = write(tmp_path, "r.yaml", MINIMAL.replace("train.jsonl", "${SOVTUNE_TEST_UNSET}/train.jsonl"))
    assert error_of(path) == (
        f"{path}:4: data.train: environment variable SOVTUNE_TEST_UNSET is not set; "
        "export SOVTUNE_TEST_UNSET=... or write ${SOVTUNE_TEST_UNSET:-default}"
    )


def test_env_value_never_reaches_error_unless_it_is_the_bad_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret in the environment referenced by a field is refused, and the error names the variable, never its
    value (the trust-boundary tests check every byte written, tests/test_bounded_inputs.py)."""
    monkeypatch.setenv("SOVTUNE_TEST_SECRET", "hf_supersecret")
    path = write(tmp_path, "r.yaml", MINIMAL + "description: ${SOVTUNE_TEST_SECRET}\ntrain:\n  seed: x\n")
    message = error_of(path)
    assert "hf_supersecret" not in message and "description: ${SOVTUNE_TEST_SECRET} is a secret" in message


# ---------------------------------------------------------------------------------------------------------------
# Combinations checked at load time


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "train:\n  warmup_ratio: 0.1\n  warmup_steps: 5\n",
            "{path}:5: train: give warmup_ratio or warmup_steps, not both",
        ),
        (
            "train:\n  epochs: 2\n  max_steps: 5\n",
            "{path}:5: train: give epochs or max_steps, not both (a --set of one on the command line replaces the "
            "recipe's other)",
        ),
        (
            "quantization:\n  double_quant: false\n",
            "{path}:5: quantization: double_quant only applies to mode: 4bit, but mode is 'none'; "
            "set mode: 4bit or remove them",
        ),
        (
            "quantization:\n  mode: 8bit\n  quant_type: fp4\n  storage_dtype: bfloat16\n",
            "{path}:5: quantization: quant_type, storage_dtype only apply to mode: 4bit, but mode is '8bit'; "
            "set mode: 4bit or remove them",
        ),
        (
            "quantization:\n  compute_dtype: bfloat16\n",
            "{path}:5: quantization: compute_dtype only applies to a quantised model; "
            "set mode: 4bit or 8bit, or remove it",
        ),
    ],
    ids=[
        "warmup",
        "epochs-and-max-steps",
        "4bit-setting-with-mode-none",
        "4bit-settings-with-8bit",
        "compute-dtype-without-quantization",
    ],
)
def test_combination_errors(tmp_path: Path, extra: str, expected: str) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + extra)
    assert error_of(path) == expected.format(path=path)


def test_quantized_compute_dtype_must_match_a_float32_model(tmp_path: Path) -> None:
    text = MINIMAL.replace("./base-model", "./base-model\n  dtype: float32")
    path = write(tmp_path, "r.yaml", text + "quantization:\n  mode: 4bit\n  compute_dtype: bfloat16\n")
    assert error_of(path) == (
        f"{path}: quantization.compute_dtype is 16-bit but model.dtype is float32; use the same dtype for both"
    )


def test_eval_source_and_eval_fraction(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "  eval: eval.jsonl\n  eval_fraction: 0.2\n")
    assert error_of(path) == (
        f"{path}:3: data: give either eval (a held-out source) or eval_fraction (a split of train), not both"
    )


def test_columns_not_of_the_format(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "  format: instruction\n  columns:\n    prompt: question\n")
    assert error_of(path) == (
        f"{path}:3: data: columns ['prompt'] do not apply to format 'instruction'; "
        "allowed: ['instruction', 'input', 'output', 'system']"
    )


def test_train_on_inputs_with_text(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL + "  format: text\n  train_on_inputs: true\n")
    assert error_of(path) == (
        f"{path}:3: data: train_on_inputs has no meaning for format text (every token is trained); remove it"
    )


def test_hub_model_without_revision(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL.replace("./base-model", "mistralai/Mistral-7B-v0.3"))
    assert error_of(path) == (
        f"{path}: model.revision: hub model 'mistralai/Mistral-7B-v0.3' has no pinned revision; "
        "set model.revision to a commit sha or tag so the run is reproducible"
    )


def test_combination_error_from_set_names_set(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", MINIMAL)
    assert error_of(path, ["quantization.double_quant=false"]) == (
        "--set: quantization: double_quant only applies to mode: 4bit, but mode is 'none'; "
        "set mode: 4bit or remove them"
    )


def test_valid_combinations_pass(tmp_path: Path) -> None:
    text = MINIMAL + (
        "  eval: eval.jsonl\n  format: prompt_completion\n  columns:\n    prompt: question\n    completion: answer\n"
        "quantization:\n  mode: 4bit\n  quant_type: fp4\n  double_quant: false\n  compute_dtype: float32\n"
        "train:\n  max_steps: 10\n  warmup_steps: 2\n"
    )
    recipe = load_recipe(write(tmp_path, "r.yaml", text))
    assert recipe.data.column("prompt") == "question" and recipe.data.column("completion") == "answer"
    assert recipe.quantization.quant_type == "fp4" and recipe.train.warmup_steps == 2
