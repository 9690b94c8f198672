"""In-training evaluation (train.eval_steps): the final evaluation's sample (eval.max_examples), batched and
token-weighted, with a few sample generations written to TensorBoard as text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helpers import invoke, qa_rows
from sovtune import evaluation
from sovtune.config import load_recipe
from sovtune.errors import RecipeError


def text_summaries(logs_dir: Any) -> dict[str, list[tuple[int, str]]]:
    """Every text summary TensorBoard would show: tag -> [(step, text)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [(event.step, event.tensor_proto.string_val[0].decode("utf-8")) for event in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
        if tag.startswith("samples/")
    }


@pytest.mark.slow
def test_in_training_eval_scores_the_final_sample_batched_and_logs_generations(
    make_recipe: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe_path = make_recipe(
        rows=qa_rows(48),
        train={"max_steps": 4, "eval_steps": 2, "eval_samples": 2},
        eval={"datasets": [{"metrics": ["loss", "token_accuracy"]}], "max_examples": 5, "batch_size": 2,
              "generation": {"max_new_tokens": 6}, "bootstrap": {"resamples": 1000}},
    )  # fmt: skip
    calls: list[tuple[int, int]] = []
    real = evaluation.teacher_forced_sums

    def counted(model: Any, sequences: Any, batch_size: int, context: Any = None) -> Any:
        calls.append((len(sequences), batch_size))
        return real(model, sequences, batch_size, context)

    monkeypatch.setattr(evaluation, "teacher_forced_sums", counted)
    result = invoke("run", str(recipe_path))
    assert result.exit_code == 0, result.output
    recipe = load_recipe(recipe_path)
    history = json.loads((recipe.run_dir / "train_metrics.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_loss" in entry]
    # Steps 2 and 4, each on the 5 sampled held-out examples (of 12) in batches of 2, not all 12 one by one.
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(entry["eval_examples"] == 5 for entry in evals)
    assert calls[:2] == [(5, 2), (5, 2)]
    # After the last step the model is the saved adapter: the in-training figure is the report's, on the same
    # examples, token-weighted (the report's loss is sum NLL / sum tokens).
    report = json.loads((recipe.run_dir / "report.json").read_text())
    loss = next(r for r in report["results"] if r["metric"] == "loss")
    accuracy = next(r for r in report["results"] if r["metric"] == "token_accuracy")
    assert loss["n"] == 5
    assert evals[-1]["eval_loss"] == pytest.approx(loss["tuned"], rel=1e-5)
    assert evals[-1]["eval_token_accuracy"] == pytest.approx(accuracy["tuned"], rel=1e-5)
    logged = [json.loads(line) for line in (recipe.run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [line["eval_loss"] for line in logged if "eval_loss" in line] == [entry["eval_loss"] for entry in evals]

    summaries = text_summaries(recipe.run_dir / "logs")
    assert sorted(summaries) == ["samples/1/text_summary", "samples/2/text_summary"]
    assert [step for step, _ in summaries["samples/1/text_summary"]] == [2, 4]
    predictions = [json.loads(line) for line in (recipe.run_dir / "eval_predictions.jsonl").read_text().splitlines()]
    first = predictions[0]  # the first example of the same seeded sample
    text = summaries["samples/1/text_summary"][-1][1]
    assert f"**origin**: {first['origin']}" in text and first["reference"] in text and "**output**:" in text


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"eval_samples": 2}}, "eval_samples are generated at each in-training evaluation; set eval_steps"),
        ({"train": {"eval_steps": 2, "eval_samples": 33}}, "less than or equal to 32"),
        (
            {
                "train": {"eval_steps": 2, "eval_samples": 1},
                "data": {"format": "text"},
                "rows": [{"text": "a b c"}] * 8,
            },
            "format text has no prompts to answer",
        ),
    ],
)
def test_eval_samples_settings_are_checked_at_load_time(
    make_recipe: Any, sections: dict[str, Any], message: str
) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(make_recipe(**sections))
