"""Report files, gates and `compare`, on synthetic per-example scores (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from helpers import invoke
from sovtune import report as reports
from sovtune.config import Recipe, load_recipe
from sovtune.evaluation import PairedScores, SuiteOutcome
from sovtune.metrics import Scores


def write_recipe(tmp_path: Path, name: str = "demo", model: str = "/models/base", **eval_section: Any) -> Recipe:
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    recipe = {"name": name, "model": {"name_or_path": model}, "data": {"train": str(data)}, "eval": eval_section,
              "output": {"dir": str(tmp_path / "runs" / name)}}  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return load_recipe(path)


def outcome(name: str, shift: float = 0.3, n: int = 40, seed: int = 0, general: bool = False) -> SuiteOutcome:
    """Exact match improved by about `shift`; perplexity lowered by ~10%."""
    rng = np.random.default_rng(seed)
    base = (rng.random(n) < 0.3).astype(float)
    tuned = np.maximum(base, (rng.random(n) < shift / 0.7).astype(float))
    tokens = rng.integers(5, 30, n).astype(float)
    nll = tokens * rng.uniform(1.0, 2.0, n)
    scores = {
        "perplexity": PairedScores(
            Scores(nll, tokens, "exp_ratio"), Scores(nll * (1.05 if general else 0.9), tokens, "exp_ratio")
        )
    }
    higher = {"perplexity": False}
    examples: list[dict[str, Any]] = [{"origin": f"eval.jsonl:{i}", "prompt": "q", "reference": "a"} for i in range(n)]
    if not general:
        scores["exact_match"] = PairedScores(Scores.mean(base), Scores.mean(tuned))
        higher["exact_match"] = True
        for i, example in enumerate(examples):
            example["predictions"] = {"base": "b" if base[i] == 0 else "a", "tuned": "a" if tuned[i] else "b | x\nline"}
            example["scores"] = {"exact_match": {"base": base[i], "tuned": tuned[i]}}
    return SuiteOutcome(
        name, scores, higher, examples, ["2 rows dropped: malformed row"] if not general else [], {"loss": 0.5}
    )


def build(tmp_path: Path, gates: dict[str, Any] | None = None, **kwargs: Any) -> reports.Report:
    section: dict[str, Any] = {"general": "general.jsonl", "gates": gates or {}, "bootstrap": {"resamples": 1000}}
    recipe = write_recipe(tmp_path, **kwargs, **section)
    outcomes = [outcome("eval"), outcome("general", general=True)]
    return reports.build_report(recipe, outcomes, adapter_dir=recipe.run_dir / "adapter", seconds=1.0)


def test_report_files_are_written_and_parseable(tmp_path: Path) -> None:
    report = build(tmp_path, gates={"exact_match": {"min_gain": 0.05}, "general_perplexity": {"max_increase": 0.10}})
    run_dir = tmp_path / "run"
    written = report.write(run_dir)
    assert sorted(path.name for path in run_dir.iterdir()) == sorted(path.name for path in written)  # no temp files
    data = json.loads((run_dir / "report.json").read_text())
    assert (data["schema_version"], data["kind"], data["passed"]) == (1, "sovtune.eval-report", True)
    fields = {
        "dataset",
        "metric",
        "base",
        "tuned",
        "difference",
        "ci_low",
        "ci_high",
        "significant",
        "n",
        "relative_change",
    }
    for result in data["results"]:
        assert fields <= set(result)
    exact = next(r for r in data["results"] if r["metric"] == "exact_match")
    assert exact["difference"] == pytest.approx(exact["tuned"] - exact["base"]) and exact["n"] == 40
    assert data["forgetting"]["relative_change"] == pytest.approx(data["forgetting"]["base"] ** 0.05 - 1)
    assert data["forgetting"]["ci_low"] <= data["forgetting"]["relative_change"] <= data["forgetting"]["ci_high"]
    assert [gate["passed"] for gate in data["gates"]] == [True, True]
    assert data["notes"] == {"eval": ["2 rows dropped: malformed row"]}
    markdown = (run_dir / "report.md").read_text()
    assert (
        "| eval | exact_match ↑ |" in markdown and "## Forgetting check" in markdown and "**Gates: PASSED**" in markdown
    )
    assert "b \\| x<br>line" in markdown  # a pipe or newline in a generation cannot break the table
    assert markdown.count("### ") == 3  # report.samples side-by-side generations
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (run_dir / "eval_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 80 and json.loads(lines[0])["dataset"] == "eval"


def test_a_failed_write_leaves_no_partial_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = build(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def broken_plot(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(reports, "plot_results", broken_plot)
    with pytest.raises(OSError):
        report.write(run_dir)
    assert list(run_dir.iterdir()) == []


def test_gates_follow_the_metric_direction(tmp_path: Path) -> None:
    report = build(
        tmp_path,
        gates={
            "perplexity": {"min_gain": 0.3, "max_value": 1e9},  # lower is better: the gain is a decrease
            "eval/exact_match": {"min_value": 0.99, "significant": True},
            "general_perplexity": {"max_increase": 0.01},
        },
    )
    by_rule = {(gate.dataset, gate.metric, gate.rule): gate for gate in report.gates}
    perplexity = next(r for r in report.results if r.key == "eval/perplexity")
    assert by_rule[("eval", "perplexity", "min_gain")].value == pytest.approx(perplexity.base - perplexity.tuned)
    assert by_rule[("eval", "perplexity", "min_gain")].passed
    assert by_rule[("eval", "perplexity", "max_value")].passed
    assert not by_rule[("eval", "exact_match", "min_value")].passed
    assert by_rule[("eval", "exact_match", "significant")].passed
    assert not by_rule[("general", "perplexity", "max_increase")].passed  # +8% > +1%
    # `perplexity` alone names the metric on every dataset that computes it, but not the forgetting set.
    assert [g.dataset for g in report.gates if g.gate == "perplexity"] == ["eval", "eval"]
    assert not report.passed
    forgetting = by_rule[("general", "perplexity", "max_increase")]
    assert (
        forgetting.describe()
        == f"general_perplexity (general/perplexity) max_increase 0.01: got {forgetting.value:.4g}"
    )


def run_with_report(tmp_path: Path, name: str, seed: int, model: str = "/models/base") -> Path:
    recipe = write_recipe(tmp_path, name=name, model=model, bootstrap={"resamples": 1000})
    outcomes = [outcome("eval", shift=0.2 + 0.2 * seed, seed=0)]
    report = reports.build_report(recipe, outcomes, adapter_dir=recipe.run_dir / "adapter", seconds=1.0)
    report.write(recipe.run_dir)
    return recipe.run_dir


def test_compare_puts_runs_side_by_side_against_their_base(tmp_path: Path) -> None:
    run_a, run_b = run_with_report(tmp_path, "lora-r8", 0), run_with_report(tmp_path, "lora-r16", 1)
    out = tmp_path / "cmp"
    result = invoke("compare", str(run_a), str(run_b), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "lora-r8" in result.output and "lora-r16" in result.output
    comparison = json.loads((out / "compare.json").read_text())
    exact = next(row for row in comparison["rows"] if row["metric"] == "exact_match")
    report_b = reports.load_report(run_b)
    tuned_b = next(r for r in report_b["results"] if r["metric"] == "exact_match")["tuned"]
    assert exact["runs"]["lora-r16"]["tuned"] == tuned_b and "base_differs" not in exact
    assert "| eval | exact_match ↑ |" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_different_bases_and_bad_reports(tmp_path: Path) -> None:
    run_a = run_with_report(tmp_path, "a", 0)
    run_b = run_with_report(tmp_path, "b", 1, model="/models/other")
    result = invoke("compare", str(run_a), str(run_b))
    assert result.exit_code == 2 and "different base models" in result.output
    missing = invoke("compare", str(run_a), str(tmp_path / "none"))
    assert missing.exit_code == 2 and "no report.json" in missing.output
    report = json.loads((run_b / "report.json").read_text())
    (run_b / "report.json").write_text(json.dumps({**report, "schema_version": 99}))
    with pytest.raises(reports.ReportError, match="report schema 99 is not 1"):
        reports.load_report(run_b)
