"""The forgetting figure in words that scale with it, gates that hold for a whole interval (`confident`), and the
training mixture in the report. Synthetic results: no model needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sovtune.config import EvalSection
from sovtune.errors import SovtuneError
from sovtune.evaluation import training_sources
from sovtune.report import MetricResult, Report, check_gates, forgetting_sentence


def perplexity(base: float, tuned: float, low: float, high: float, significant: bool = True) -> MetricResult:
    """General-text perplexity from `base` to `tuned`, relative interval [low, high]."""
    return MetricResult(
        dataset="general", metric="perplexity", higher_is_better=False, aggregate="exp_ratio", n=150,
        base=base, tuned=tuned, difference=tuned - base, ci_low=base * low, ci_high=base * high,
        significant=significant, base_ci_low=base, base_ci_high=base, tuned_ci_low=base * (1 + low),
        tuned_ci_high=base * (1 + high), relative_change=tuned / base - 1, relative_ci_low=low,
        relative_ci_high=high, confidence=0.95, resamples=1000, seed=0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "tuned, low, high, significant, words",
    [
        (24.05 * 5.32, 4.10, 4.55, True, "the adapter forgot most of its general text: its general-text perplexity "
                                         "is 5.3x the base's"),  # +432%: not "some"
        (24.05 * 1.60, 0.50, 0.70, True, "the adapter forgot much general text"),
        (24.05 * 1.18, 0.12, 0.24, True, "the adapter forgot some general text"),
        (24.05 * 1.05, 0.02, 0.08, True, "the adapter forgot a little general text"),
        (24.05 * 1.01, -0.01, 0.03, False, "no significant change"),
        (24.05 * 0.90, -0.12, -0.08, True, "general text got easier"),
    ],
)  # fmt: skip
def test_forgetting_wording_scales_with_the_figure(
    tuned: float, low: float, high: float, significant: bool, words: str
) -> None:
    sentence = forgetting_sentence(perplexity(24.05, tuned, low, high, significant))
    assert sentence.endswith(f": {words}.")


def gate_values(gate: dict[str, Any], result: MetricResult) -> list[tuple[str, Any, bool]]:
    section = EvalSection.model_validate({"general": "general.jsonl", "gates": {"general_perplexity": gate}})
    return [(g.rule, g.value, g.passed) for g in check_gates(section, [result])]


def test_a_confident_gate_holds_for_the_upper_bound() -> None:
    # +18% forgetting, 95% interval [+12%, +28%]: under 25% as an estimate, not for the whole interval.
    result = perplexity(24.0, 24.0 * 1.18, 0.12, 0.28)
    assert gate_values({"max_increase": 0.25}, result) == [("max_increase", pytest.approx(0.18), True)]
    assert gate_values({"max_increase": 0.25, "confident": True}, result) == [
        ("max_increase (upper bound)", 0.28, False)
    ]
    assert gate_values({"max_increase": 0.30, "confident": True}, result)[0][2] is True


def test_a_confident_min_gain_holds_for_the_lower_bound() -> None:
    gain = MetricResult(
        dataset="sql", metric="sql_execution", higher_is_better=True, aggregate="mean", n=185, base=0.0, tuned=0.1,
        difference=0.1, ci_low=0.06, ci_high=0.14, significant=True, base_ci_low=0.0, base_ci_high=0.0,
        tuned_ci_low=0.06, tuned_ci_high=0.14, relative_change=None, relative_ci_low=None, relative_ci_high=None,
        confidence=0.95, resamples=1000, seed=0,
    )  # fmt: skip
    section = EvalSection.model_validate(
        {"datasets": [{"name": "sql", "metrics": ["exact_match"]}], "gates": {"exact_match": {"min_gain": 0.08}}}
    )
    gain.metric = "exact_match"
    assert [g.passed for g in check_gates(section, [gain])] == [True]
    section.gates["exact_match"] = section.gates["exact_match"].model_copy(update={"confident": True})
    [gate] = check_gates(section, [gain])
    assert (gate.rule, gate.value, gate.passed) == ("min_gain (lower bound)", 0.06, False)


def test_confident_alone_is_not_a_rule() -> None:
    with pytest.raises(ValueError, match="a gate needs a rule"):
        EvalSection.model_validate({"general": "g.jsonl", "gates": {"general_perplexity": {"confident": True}}})


SOURCES = [
    {"source": "../data/sql/train.jsonl", "format": "messages", "weight": None, "general": False, "examples": 1140,
     "per_epoch": 1140, "share": 0.8, "tokens": 90615, "token_share": 0.75},
    {"source": "../data/general/train.jsonl", "format": "text", "weight": 0.2, "general": True, "examples": 444,
     "per_epoch": 285, "share": 0.2, "tokens": 30170, "token_share": 0.25},
]  # fmt: skip


def test_the_report_shows_the_training_mixture(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data_stats.json").write_text(json.dumps({"train": {"sources": SOURCES}}))
    sources = training_sources(run_dir)
    assert sources == SOURCES
    report = Report(
        run="r", base_model={"name_or_path": "m"}, adapter="a", settings={"bootstrap": {"confidence": 0.95,
        "resamples": 1000, "seed": 0}}, results=[], gates=[], samples=[], notes={}, timing={}, training_data=sources,
    )  # fmt: skip
    markdown = report.markdown()
    assert "## Training data (one epoch)" in markdown
    assert (
        "| ../data/general/train.jsonl (general-text replay) | text | 0.2 | 444 | 285 | 20.0% | 30,170 | 25.0% |"
        in (markdown)
    )
    assert report.to_json()["training_data"] == SOURCES


@pytest.mark.parametrize(
    "stats",
    [{}, {"train": []}, {"train": {"sources": "x"}}, {"train": {"sources": [{"source": 1}]}},
     {"train": {"sources": [{**SOURCES[0], "weight": "heavy"}]}}],
)  # fmt: skip
def test_a_run_folders_odd_data_stats_give_no_training_data_section(tmp_path: Path, stats: Any) -> None:
    (tmp_path / "data_stats.json").write_text(json.dumps(stats))
    assert training_sources(tmp_path) == []


def test_a_data_stats_file_that_is_not_an_object_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "data_stats.json").write_text("[]")
    with pytest.raises(SovtuneError, match="data statistics must be a JSON object"):
        training_sources(tmp_path)
