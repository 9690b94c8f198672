"""Data mixtures: each training source with its own format, columns, weight (share of each epoch) and max_examples;
seeded and deterministic draws, exact counts, a held-out split from the task's sources only, and general-text
replay (`general: true`) that is never the text the forgetting check scores."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import invoke, qa_rows, write_jsonl
from sovtune.config import Recipe, load_recipe, validate_recipe
from sovtune.errors import DataError, RecipeError
from sovtune.inputs import prepare_recipe_data

GENERAL_WORDS = "the fox jumps over the lazy dog while sovereign models keep data under control".split()


def general_rows(count: int, offset: int = 0) -> list[dict[str, Any]]:
    """Distinct passages of plain text, each a paragraph of 60+ characters."""
    rows = []
    for index in range(offset, offset + count):
        words = [GENERAL_WORDS[(index * 7 + k) % len(GENERAL_WORDS)] for k in range(14)]
        rows.append({"body": f"Passage {index}: " + " ".join(words) + "."})
    return rows


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "chat.jsonl", qa_rows(40))
    write_jsonl(tmp_path / "general-train.jsonl", general_rows(30))
    write_jsonl(tmp_path / "general-eval.jsonl", general_rows(10, offset=100))
    return tmp_path


def recipe_for(project: Path, model_dir: Path, train: Any, **data: Any) -> Recipe:
    general = {"path": "general-eval.jsonl", "train": "general-train.jsonl", "columns": {"text": "body"}}
    return validate_recipe(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": train, "format": "messages", "max_length": 64, "eval_fraction": 0.25, **data},
            "eval": {"general": general},
            "source_path": str(project / "recipe.yaml"),
        }
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def by_source(stats: dict[str, Any]) -> list[dict[str, Any]]:
    return stats["train"]["sources"]


# ---------------------------------------------------------------------------------------------------------------
# Formats and weights


def test_a_chat_file_and_a_text_file_mix_each_in_its_own_format(project, tiny_model_dir, tokenizer) -> None:
    # Before mixtures, one format applied to every source: the text file failed with "missing column 'messages'".
    recipe = recipe_for(
        project,
        tiny_model_dir,
        ["chat.jsonl", {"path": "general-train.jsonl", "format": "text", "columns": {"text": "body"}}],
    )
    prepared = prepare_recipe_data(recipe, tokenizer)
    chat, text = by_source(prepared.stats)
    assert (chat["format"], text["format"]) == ("messages", "text")
    assert chat["examples"] == 30 and chat["held_out"] == 10  # 40 rows, a quarter held out
    assert text["examples"] == 30 and text["held_out"] == 0  # another format: training only
    assert len(prepared.train) == 60 and (chat["per_epoch"], text["per_epoch"]) == (30, 30)
    # The text rows are trained as text (every token supervised, BOS and EOS around them), not as chats.
    text_items = [item for item in prepared.train if "general-train.jsonl" in item.origin]
    assert len(text_items) == 30
    assert all(item.labels[1:] == item.input_ids[1:] for item in text_items)
    assert all("general-train" not in example.origin for example in prepared.eval_examples)


def test_weight_is_the_sources_exact_share_of_each_epoch(project, tiny_model_dir, tokenizer) -> None:
    recipe = recipe_for(project, tiny_model_dir, ["chat.jsonl", {"general": True, "weight": 0.2}])
    prepared = prepare_recipe_data(recipe, tokenizer)
    chat, general = by_source(prepared.stats)
    # 30 chat examples are 80% of the epoch: it holds 37.5 examples, of which 20% (7.5 -> 8) are general text.
    assert chat["per_epoch"] == 30 and general["per_epoch"] == round(0.2 * 30 / 0.8) == 8
    assert len(prepared.train) == 38 and general["share"] == pytest.approx(8 / 38)
    assert general["repeats"] == pytest.approx(8 / 30)  # a sample without replacement
    picked = [item.origin for item in prepared.train if "general-train" in item.origin]
    assert len(set(picked)) == 8
    assert general["tokens"] == sum(len(item.input_ids) for item in prepared.train if "general-train" in item.origin)
    assert chat["tokens"] + general["tokens"] == prepared.stats["train"]["total_tokens"]
    assert chat["token_share"] + general["token_share"] == pytest.approx(1.0)


def test_a_source_smaller_than_its_share_is_repeated_evenly(project, tiny_model_dir, tokenizer) -> None:
    write_jsonl(project / "few.jsonl", general_rows(3, offset=200))
    recipe = recipe_for(
        project,
        tiny_model_dir,
        ["chat.jsonl", {"path": "few.jsonl", "format": "text", "columns": {"text": "body"}, "weight": 0.25}],
    )
    prepared = prepare_recipe_data(recipe, tokenizer)
    few = by_source(prepared.stats)[1]
    assert few["per_epoch"] == 10 and few["repeats"] == pytest.approx(10 / 3)  # 30 / 0.75 * 0.25 = 10
    counts: dict[str, int] = {}
    for item in prepared.train:
        if "few.jsonl" in item.origin:
            counts[item.origin] = counts.get(item.origin, 0) + 1
    assert sorted(counts.values()) == [3, 3, 4]  # every row 3 times, one more for the remainder


def test_every_source_weighted_shares_sum_to_one(project, tiny_model_dir, tokenizer) -> None:
    recipe = recipe_for(
        project, tiny_model_dir, [{"path": "chat.jsonl", "weight": 0.5}, {"general": True, "weight": 0.5}]
    )
    prepared = prepare_recipe_data(recipe, tokenizer)
    chat, general = by_source(prepared.stats)
    # The epoch holds as many examples as the sources together (30 + 30); each gives half.
    assert chat["per_epoch"] == general["per_epoch"] == 30 and len(prepared.train) == 60


def test_max_examples_takes_a_seeded_sample_of_a_source(project, tiny_model_dir, tokenizer) -> None:
    source = {"general": True, "max_examples": 12}
    first = prepare_recipe_data(recipe_for(project, tiny_model_dir, ["chat.jsonl", source]), tokenizer)
    again = prepare_recipe_data(recipe_for(project, tiny_model_dir, ["chat.jsonl", source]), tokenizer)
    general = by_source(first.stats)[1]
    assert general["examples"] == 12 and general["sampled_from"] == 30
    origins = [item.origin for item in first.train if "general-train" in item.origin]
    assert origins == [item.origin for item in again.train if "general-train" in item.origin]
    numbers = [int(origin.rsplit(":", 1)[1].split("@")[0]) for origin in origins]
    assert numbers == sorted(numbers) and numbers != list(range(1, 13))  # file order, not the first 12 rows


def test_the_mixture_is_seeded_and_deterministic(project, tiny_model_dir, tokenizer) -> None:
    def draw(seed: int) -> list[str]:
        recipe = recipe_for(project, tiny_model_dir, ["chat.jsonl", {"general": True, "weight": 0.2}])
        recipe.train.seed = seed
        return [item.origin for item in prepare_recipe_data(recipe, tokenizer).train]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_a_single_source_is_unchanged_by_mixtures(project, tiny_model_dir, tokenizer) -> None:
    # The pre-mixture order: the seeded split's shuffled order of the kept rows (what the trainer's sampler permutes).
    import random

    from sovtune.data import SplitStats, load_examples, split_train_eval

    recipe = recipe_for(project, tiny_model_dir, "chat.jsonl")
    prepared = prepare_recipe_data(recipe, tokenizer)
    examples = load_examples(recipe.data.train, recipe.data, tokenizer, SplitStats(), project)
    kept, held = split_train_eval(examples, 0.25, recipe.train.seed)
    assert [item.origin for item in prepared.train] == [example.origin for example in kept]
    assert [example.origin for example in prepared.eval_examples] == [example.origin for example in held]
    assert random  # (split_train_eval is the pre-mixture split itself)


# ---------------------------------------------------------------------------------------------------------------
# General-text replay


def test_general_shorthand_reads_eval_general_train_in_its_format_and_columns(project, tiny_model_dir) -> None:
    recipe = recipe_for(project, tiny_model_dir, ["chat.jsonl", {"general": True, "weight": 0.2}])
    source = recipe.data.train[1]
    assert (source.path, source.format, source.columns) == ("general-train.jsonl", "text", {"text": "body"})
    # The resolved recipe (recipe.yaml in a run directory) loads again as it is.
    path = project / "run-recipe.yaml"
    path.write_text(recipe.to_yaml(), encoding="utf-8")
    again = load_recipe(path)
    assert again.data.train[1] == source


def test_replay_that_contains_an_evaluated_passage_is_refused(project, tiny_model_dir, tokenizer) -> None:
    rows = general_rows(30) + [general_rows(1, offset=104)[0]]  # one passage of general-eval.jsonl slipped in
    write_jsonl(project / "general-train.jsonl", rows)
    recipe = recipe_for(project, tiny_model_dir, ["chat.jsonl", {"general": True, "weight": 0.2}])
    with pytest.raises(DataError, match=r"general-train\.jsonl:31: shares a passage with eval\.general"):
        prepare_recipe_data(recipe, tokenizer)


@pytest.mark.parametrize(
    "train, general, expected",
    [
        (
            ["chat.jsonl", {"general": True, "weight": 0.2}],
            None,
            "general: true) replays the general text of eval.general, which is not set",
        ),
        (
            ["chat.jsonl", {"general": True}],
            {"path": "general-eval.jsonl"},
            "needs eval.general.train",
        ),
        (
            ["chat.jsonl", {"general": True, "path": "general-eval.jsonl"}],
            {"path": "general-eval.jsonl"},
            "the passages the forgetting check evaluates: replaying them would hide forgetting",
        ),
        (["chat.jsonl", {"weight": 0.2}], None, "a training source needs a path"),
        (
            ["chat.jsonl", {"path": "general-train.jsonl", "weight": 1.0}],
            None,
            "the weights sum to 1, but sources without a weight also take part in every epoch",
        ),
        (
            [{"path": "chat.jsonl", "weight": 0.5}, {"path": "general-train.jsonl", "format": "text", "weight": 0.3}],
            None,
            "every source has a weight and they sum to 0.8",
        ),
        (
            ["chat.jsonl", {"path": "general-train.jsonl", "format": "text", "columns": {"prompt": "q"}}],
            None,
            "train[1]: columns ['prompt'] do not apply to format 'text'",
        ),
        (["chat.jsonl", {"path": "general-train.jsonl", "weight": 0}], None, "greater than 0"),
    ],
)
def test_bad_mixtures_are_one_line_naming_the_field(
    project: Path, tiny_model_dir: Path, train: Any, general: Any, expected: str
) -> None:
    recipe: dict[str, Any] = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": train},
    }
    if general is not None:
        recipe["eval"] = {"general": general}
    path = project / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert str(path) in message  # where: the file (and line)


# ---------------------------------------------------------------------------------------------------------------
# What `check` shows, and exact resume


def write_mixture_recipe(project: Path, model_dir: Path, name: str, **train: Any) -> Path:
    recipe = {
        "name": name,
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"r": 4, "dropout": 0.0},
        "data": {
            "train": ["chat.jsonl", {"general": True, "weight": 0.25}],
            "format": "messages",
            "max_length": 64,
            "eval_fraction": 0.25,
        },
        "train": {"batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 2, **train},
        "eval": {
            "general": {"path": "general-eval.jsonl", "train": "general-train.jsonl", "columns": {"text": "body"}},
            "datasets": [{"metrics": ["loss"]}],
        },
        "output": {"dir": str(project / "runs" / name)},
    }
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def test_check_shows_counts_tokens_and_shares_per_source(project, tiny_model_dir) -> None:
    recipe = write_mixture_recipe(project, tiny_model_dir, "mix", max_steps=2)
    result = invoke("check", recipe, "--json")
    assert result.exit_code == 0, result.output
    sources = json.loads(result.stdout)["data"]["train"]["sources"]
    assert [source["source"] for source in sources] == ["chat.jsonl", "general-train.jsonl"]
    assert [source["per_epoch"] for source in sources] == [30, 10]  # 30 / 0.75 * 0.25
    table = invoke("check", recipe)
    assert table.exit_code == 0, table.output
    lines = [line for line in table.stdout.splitlines() if "general-train.jsonl" in line]
    assert lines and "10" in lines[0] and "25.0%" in lines[0], table.stdout


def _tensors(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_mixture_resumes_exactly(project: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers.trainer_callback import CallbackHandler

    torch.set_num_threads(1)
    steps = {"max_steps": 6, "save_total_limit": 10}
    reference = write_mixture_recipe(project, tiny_model_dir, "straight", **steps)
    assert invoke("train", reference).exit_code == 0
    interrupted = write_mixture_recipe(project, tiny_model_dir, "interrupted", **steps)
    original, calls = CallbackHandler.on_step_begin, {"n": 0}

    def on_step_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as step 3 begins: a checkpoint at step 3, then a stop
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(CallbackHandler, "on_step_begin", on_step_begin)
        stopped = invoke("train", interrupted)
    assert stopped.exit_code == 128 + signal.SIGINT, stopped.output
    resumed = invoke("train", interrupted, "--resume")
    assert resumed.exit_code == 0, resumed.output
    straight, again = _tensors(project / "runs" / "straight"), _tensors(project / "runs" / "interrupted")
    worst = max((straight[key] - again[key]).abs().max().item() for key in straight)
    assert worst <= 1e-6, worst
    stats = json.loads((project / "runs" / "interrupted" / "data_stats.json").read_text())
    assert [source["per_epoch"] for source in stats["train"]["sources"]] == [30, 10]
