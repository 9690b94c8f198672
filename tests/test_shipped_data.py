"""The shipped general text: data/general/train.jsonl (replay) shares no document and no paragraph with
data/general/eval.jsonl (the forgetting check), and both come only from documents held out of the base's
pretraining, as scripts/build_base_model.py builds them."""

from __future__ import annotations

import json
from pathlib import Path

from sovtune.config import load_recipe
from sovtune.data import paragraphs
from sovtune.inputs import check_replay_is_not_evaluated

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT / "data" / "general"


def rows(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (GENERAL / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_replay_text_and_evaluated_text_are_disjoint() -> None:
    replay, evaluated = rows("train.jsonl"), rows("eval.jsonl")
    assert len(replay) >= 300 and len(evaluated) == 150
    assert not {row["source"] for row in replay} & {row["source"] for row in evaluated}  # no shared document
    evaluated_paragraphs = set().union(*(paragraphs(row["text"]) for row in evaluated))
    assert not any(paragraphs(row["text"]) & evaluated_paragraphs for row in replay)  # no shared paragraph
    assert not {row["text"] for row in replay} & {row["text"] for row in evaluated}


def test_both_come_from_documents_held_out_of_pretraining() -> None:
    info = json.loads((ROOT / "data" / "base-model" / "build_info.json").read_text(encoding="utf-8"))
    held_out = set(info["corpus"]["held_out_names"])
    assert {row["source"] for row in rows("train.jsonl") + rows("eval.jsonl")} <= held_out


def test_the_quickstart_replays_the_shipped_text_and_passes_the_overlap_check() -> None:
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    replay = [source for source in recipe.data.train if source.general]
    assert replay and recipe.resolve(replay[0].path) == GENERAL / "train.jsonl"
    assert recipe.eval.general is not None and recipe.resolve(recipe.eval.general.path) == GENERAL / "eval.jsonl"
    check_replay_is_not_evaluated(recipe)  # raises DataError on a shared paragraph
