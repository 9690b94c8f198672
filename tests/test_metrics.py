"""Per-example metrics on hand-made cases, SQL execution accuracy, user metrics and the paired bootstrap."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from sovtune import metrics
from sovtune.config import MetricName
from sovtune.errors import DataError
from sovtune.metrics import MetricError, Scores, paired_bootstrap

# ---------------------------------------------------------------------------------------------------------------
# Text metrics


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Paris", "paris", 1.0),
        ("  Paris. ", "Paris", 1.0),
        ("SELECT  name\nFROM employees", "select name from employees;", 1.0),
        ("Ｐａｒｉｓ", "paris", 1.0),  # NFKC folds full-width letters
        ("Straße", "STRASSE", 1.0),  # casefold, not lower
        ("Paris, France", "Paris", 0.0),
        ("", "Paris", 0.0),
    ],
)
def test_exact_match_normalises_case_punctuation_and_space(prediction: str, reference: str, expected: float) -> None:
    assert metrics.exact_match(prediction, reference) == expected


def test_contains_matches_whole_words_only() -> None:
    assert metrics.contains("The capital is Paris, I think.", "paris") == 1.0
    assert metrics.contains("Parisian food", "Paris") == 0.0
    assert metrics.contains("anything", "") == 0.0  # an empty reference must not count as found


def test_regex_with_group_compares_the_capture_and_without_group_just_matches() -> None:
    answer = re.compile(r"answer is (\w+)")
    assert metrics.regex_match("I think the answer is Paris.", "paris", answer) == 1.0
    assert metrics.regex_match("I think the answer is Lyon.", "paris", answer) == 0.0
    assert metrics.regex_match("no answer here", "paris", answer) == 0.0
    assert metrics.regex_match("SELECT 1;", "ignored", re.compile(r"^SELECT\b")) == 1.0
    assert metrics.regex_match("select 1;", "ignored", re.compile(r"^SELECT\b")) == 0.0


def test_rouge_l_and_chrf_on_known_cases() -> None:
    assert metrics.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat the mat" = 4 of 6 tokens each side: P = R = F = 4/6.
    assert metrics.rouge_l("the cat lay on the mat", "the cat sat by the mat") == pytest.approx(4 / 6)
    assert metrics.rouge_l("dog", "the cat") == 0.0
    assert metrics.chrf("Bonjour le monde", "Bonjour le monde") == pytest.approx(1.0)
    partial = metrics.chrf("Bonjour monde", "Bonjour le monde")
    assert 0.3 < partial < 1.0
    assert metrics.chrf("xyz", "Bonjour le monde") < 0.1


def test_metric_names_in_the_recipe_have_an_implementation() -> None:
    implemented = set(metrics.TEXT_METRICS) | {
        "loss",
        "perplexity",
        "token_accuracy",
        "regex",
        "multiple_choice",
        "sql_execution",
    }
    assert set(MetricName.__args__) == implemented


# ---------------------------------------------------------------------------------------------------------------
# SQL execution


@pytest.fixture
def company_db(tmp_path: Path) -> Path:
    path = tmp_path / "company.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(
            """
            CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, salary INTEGER, dept TEXT);
            INSERT INTO employees VALUES (1, 'Ada', 300, 'R&D'), (2, 'Bob', 200, 'Sales'),
                                         (3, 'Cy', 200, 'Sales'), (4, 'Di', 100, 'R&D');
            """
        )
    return path


def test_sql_results_compare_as_multisets_unless_the_reference_orders(company_db: Path) -> None:
    executor = metrics.SqlExecutor(company_db)
    reference = "SELECT name FROM employees WHERE dept = 'Sales';"
    rows = executor.reference_result(reference, "row 1")
    assert executor.score("SELECT name FROM employees WHERE salary = 200 ORDER BY name DESC", reference, rows) == 1.0
    assert executor.score("```sql\nSELECT name FROM employees WHERE dept='Sales'\n```", reference, rows) == 1.0
    assert executor.score("SELECT name FROM employees", reference, rows) == 0.0
    # Duplicates matter: a multiset, not a set.
    salaries = "SELECT salary FROM employees WHERE dept = 'Sales'"
    assert (
        executor.score("SELECT DISTINCT salary FROM employees WHERE dept = 'Sales'", salaries, executor.run(salaries))
        == 0.0
    )
    ordered = "SELECT name FROM employees ORDER BY salary DESC, name"
    ordered_rows = executor.run(ordered)
    assert executor.score("SELECT name FROM employees ORDER BY salary DESC, name", ordered, ordered_rows) == 1.0
    assert executor.score("SELECT name FROM employees ORDER BY name DESC", ordered, ordered_rows) == 0.0
    # Float noise from an equivalent query does not count as a difference.
    mean = "SELECT AVG(salary) FROM employees"
    assert executor.score("SELECT SUM(salary) * 1.0 / COUNT(*) FROM employees", mean, executor.run(mean)) == 1.0


def test_sql_predictions_that_fail_score_zero_and_cannot_write(company_db: Path, tmp_path: Path) -> None:
    executor = metrics.SqlExecutor(company_db)
    reference = "SELECT COUNT(*) FROM employees"
    rows = executor.run(reference)
    for bad in ("SELEC nonsense", "DELETE FROM employees", "DROP TABLE employees", "SELECT 1; SELECT 2",
                f"ATTACH DATABASE '{tmp_path / 'other.db'}' AS other", ""):  # fmt: skip
        assert executor.score(bad, reference, rows) == 0.0
    assert executor.run(reference) == [(4,)]
    assert not (tmp_path / "other.db").exists()


def test_a_runaway_query_is_stopped_at_the_time_budget(company_db: Path) -> None:
    executor = metrics.SqlExecutor(company_db, timeout_s=0.2)
    runaway = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    started = __import__("time").monotonic()
    assert executor.score(runaway, "SELECT 1", [(1,)]) == 0.0
    assert __import__("time").monotonic() - started < 3
    assert executor.run("SELECT 1") == [(1,)]  # the connection is still usable


def test_a_broken_reference_or_database_is_a_clear_error(company_db: Path, tmp_path: Path) -> None:
    executor = metrics.SqlExecutor(company_db)
    with pytest.raises(DataError, match=r"eval.jsonl:3: reference SQL fails on company.db \(no such table: nope\)"):
        executor.reference_result("SELECT * FROM nope", "eval.jsonl:3")
    with pytest.raises(MetricError, match="not found"):
        metrics.SqlExecutor(tmp_path / "missing.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_text("not a database")
    with pytest.raises(MetricError, match="cannot open as a SQLite database"):
        metrics.SqlExecutor(garbage)


# ---------------------------------------------------------------------------------------------------------------
# User metrics


def test_user_metric_is_imported_from_the_named_file_only(tmp_path: Path) -> None:
    module = tmp_path / "my_metric.py"
    module.write_text("def score(prediction, reference, row):\n    return len(prediction) == row['length']\n")
    function = metrics.load_user_function(module, "score", "eval.user_metrics.length")
    assert metrics.call_user_metric(function, "abc", "", {"length": 3}, "my_metric.py:score") == 1.0
    with pytest.raises(MetricError, match=r"has no function 'scor'; functions there: \['score'\]"):
        metrics.load_user_function(module, "scor", "eval.user_metrics.length")
    with pytest.raises(MetricError, match="not found"):
        metrics.load_user_function(tmp_path / "nope.py", "score", "eval.user_metrics.length")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(MetricError, match="importing .* failed \\(RuntimeError: boom\\)"):
        metrics.load_user_function(broken, "score", "eval.user_metrics.x")


def test_user_metric_must_return_a_finite_number() -> None:
    with pytest.raises(MetricError, match="returned 'yes'"):
        metrics.call_user_metric(lambda p, r, row: "yes", "a", "b", {}, "m.py:f on row 1")
    with pytest.raises(MetricError, match="returned nan"):
        metrics.call_user_metric(lambda p, r, row: float("nan"), "a", "b", {}, "m.py:f on row 1")
    assert metrics.call_user_metric(lambda p, r, row: np.float32(0.25), "a", "b", {}, "x") == 0.25


# ---------------------------------------------------------------------------------------------------------------
# Aggregates and the paired bootstrap


def test_ratio_metrics_are_token_weighted_not_a_mean_of_ratios() -> None:
    nll, tokens = np.array([2.0, 30.0]), np.array([1.0, 10.0])
    assert Scores(nll, tokens, "ratio").value() == pytest.approx(32 / 11)
    assert Scores(nll, tokens, "exp_ratio").value() == pytest.approx(np.exp(32 / 11))
    assert Scores.mean([1, 0, 1, 1]).value() == pytest.approx(0.75)


def test_interval_of_a_known_difference_covers_it() -> None:
    rng = np.random.default_rng(1)
    base = rng.binomial(1, 0.3, size=400).astype(float)
    # The tuned model fixes a known share of the base's errors: the true difference is 0.7 * 0.5 = 0.35.
    fixed = (base == 0) & (rng.random(400) < 0.5)
    tuned = np.where(fixed, 1.0, base)
    comparison = paired_bootstrap(Scores.mean(base), Scores.mean(tuned), resamples=2000, seed=0)
    assert comparison.difference == pytest.approx(tuned.mean() - base.mean())
    assert comparison.ci_low < 0.35 < comparison.ci_high
    assert comparison.ci_low > 0 and comparison.significant
    assert comparison.base_ci_low < comparison.base < comparison.base_ci_high


def test_intervals_cover_the_true_difference_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    true_difference, covered, trials = 0.1, 0, 150
    for trial in range(trials):
        base = rng.normal(0.5, 0.2, size=80)
        tuned = base + true_difference + rng.normal(0, 0.1, size=80)
        comparison = paired_bootstrap(Scores.mean(base), Scores.mean(tuned), resamples=1000, seed=trial)
        covered += comparison.ci_low <= true_difference <= comparison.ci_high
    assert 0.88 <= covered / trials <= 0.99


def test_no_difference_is_not_significant_and_seeds_reproduce() -> None:
    values = np.random.default_rng(0).random(50)
    same = paired_bootstrap(Scores.mean(values), Scores.mean(values), resamples=1000, seed=3)
    assert (same.ci_low, same.ci_high, same.significant) == (0.0, 0.0, False)
    base, tuned = Scores.mean(values), Scores.mean(values[::-1])
    first = paired_bootstrap(base, tuned, resamples=1000, seed=5)
    assert first == paired_bootstrap(base, tuned, resamples=1000, seed=5)
    assert first != paired_bootstrap(base, tuned, resamples=1000, seed=6)


def test_perplexity_interval_recomputes_the_corpus_ratio_per_resample() -> None:
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 50, size=60).astype(float)
    base_nll = tokens * rng.uniform(1.5, 2.5, size=60)
    tuned_nll = base_nll * 0.9  # 10% less NLL everywhere: perplexity ratio exp(-0.1 * mean loss)
    comparison = paired_bootstrap(
        Scores(base_nll, tokens, "exp_ratio"), Scores(tuned_nll, tokens, "exp_ratio"), 1000, 0
    )
    assert comparison.base == pytest.approx(np.exp(base_nll.sum() / tokens.sum()))
    assert comparison.tuned == pytest.approx(np.exp(tuned_nll.sum() / tokens.sum()))
    assert comparison.relative_change == pytest.approx(comparison.tuned / comparison.base - 1)
    assert comparison.relative_ci_low < comparison.relative_change < comparison.relative_ci_high < 0
    assert comparison.significant and comparison.ci_high < 0


def test_paired_bootstrap_refuses_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="must match"):
        paired_bootstrap(Scores.mean([1, 0]), Scores.mean([1, 0, 1]))
    with pytest.raises(ValueError, match="no examples"):
        paired_bootstrap(Scores.mean([]), Scores.mean([]))
