"""prompt_completion rows: the joint format (BOS + prompt + data.separator, then completion + EOS) and the check that
warns when prompt and completion tokenise differently joined than apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import invoke, write_jsonl
from sovtune import evaluation as ev
from sovtune import model as models
from sovtune.config import load_recipe
from sovtune.data import IGNORE_INDEX, Row, to_example, tokenize
from sovtune.errors import RecipeError

QUESTION = "What is the capital of France? Paris is the capital of"


def pc_recipe(make_recipe: Any, tmp_path: Path, row: dict[str, str], **data: Any) -> Path:
    """Eight rows like `row`, told apart by a number at the start of the prompt (the boundary stays the same)."""
    rows = [{**row, "prompt": f"#{index} {row['prompt']}"} for index in range(8)]
    train = write_jsonl(tmp_path / "pc.jsonl", rows)
    return make_recipe(
        data={"train": str(train), "format": "prompt_completion", **data},
        eval={"datasets": [{"metrics": ["loss", "exact_match"]}], "generation": {"max_new_tokens": 8}},
    )


def test_the_separator_ends_the_prompt_and_is_never_trained(make_recipe: Any, tmp_path: Path) -> None:
    recipe = load_recipe(
        pc_recipe(make_recipe, tmp_path, {"prompt": QUESTION, "completion": "France."}, separator="\n")
    )
    tokenizer = models.load_tokenizer(recipe)
    example = to_example(Row({"prompt": QUESTION, "completion": "France."}, "row:1"), recipe.data, tokenizer)
    assert example.segments == [(QUESTION + "\n", False), ("France.", True)]
    tokens = tokenize(example, tokenizer, max_length=64)
    prompt_ids = tokenizer(QUESTION + "\n", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer("France.", add_special_tokens=False)["input_ids"]
    assert tokens.input_ids == [tokenizer.bos_token_id, *prompt_ids, *completion_ids, tokenizer.eos_token_id]
    assert tokens.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*completion_ids, tokenizer.eos_token_id]
    # Evaluation generates from the end of the separator and scores the completion alone.
    suite = ev.prepare_dataset(recipe, tokenizer, recipe.eval.datasets[0])
    item = suite.items[0]
    assert item.shown_prompt.endswith(QUESTION + "\n") and item.reference == "France."
    assert item.prompt_ids == [
        tokenizer.bos_token_id,
        *tokenizer(item.shown_prompt, add_special_tokens=False)["input_ids"],
    ]


def boundary(recipe: Path) -> dict[str, Any]:
    result = invoke("check", str(recipe), "--json")
    assert result.exit_code == 0, result.output
    return next(
        check for check in json.loads(result.stdout)["checks"] if check["check"] == "prompt/completion boundary"
    )


def test_check_warns_when_the_boundary_tokenises_differently_joined(make_recipe: Any, tmp_path: Path) -> None:
    # This tokenizer makes a lone space its own token: " " + "France" apart is not " France" joined.
    split = boundary(pc_recipe(make_recipe, tmp_path, {"prompt": QUESTION, "completion": "France."}, separator=" "))
    assert split["ok"] is False and split["fatal"] is False
    assert "held-out rows tokenise differently joined than apart (e.g. " in split["detail"]
    assert "pc.jsonl:" in split["detail"] and "' ' + 'F' apart, ' France' '.' joined" in split["detail"]
    # The space at the start of the completion: the same tokens both ways.
    moved = boundary(pc_recipe(make_recipe, tmp_path, {"prompt": QUESTION, "completion": " France."}))
    assert moved["ok"] is True and moved["detail"].endswith("held-out rows tokenise the same joined and apart")


def test_separator_is_refused_for_other_formats(make_recipe: Any) -> None:
    with pytest.raises(RecipeError, match="separator only applies to format prompt_completion, not 'messages'"):
        load_recipe(make_recipe(data={"separator": "\n"}))
