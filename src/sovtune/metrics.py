"""Per-example metrics, so base and adapter can be compared pair by pair, and the seeded paired bootstrap.

Nothing here touches a model: evaluation.py produces token-level numbers and generated text, this module scores them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import sqlite3
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from sovtune.errors import DataError, SovtuneError

if TYPE_CHECKING:
    import numpy as np


class MetricError(SovtuneError):
    """A metric cannot be set up or returned something that is not a score."""


# ---------------------------------------------------------------------------------------------------------------
# Per-example scores and their aggregate

Aggregate = Literal["mean", "ratio", "exp_ratio"]


@dataclass
class Scores:
    """One metric on n examples as per-example numerators and denominators.

    The metric is sum(numerators) / sum(denominators), exponentiated for `exp_ratio` (perplexity). A plain mean has
    denominators of 1; token-weighted metrics use the supervised-token count, so resampling examples and recomputing
    the ratio bootstraps exactly the corpus-level value that is reported.
    """

    numerators: np.ndarray
    denominators: np.ndarray
    aggregate: Aggregate = "mean"

    def __post_init__(self) -> None:
        import numpy as np

        self.numerators = np.asarray(self.numerators, dtype=np.float64)
        self.denominators = np.asarray(self.denominators, dtype=np.float64)
        if self.numerators.shape != self.denominators.shape or self.numerators.ndim != 1:
            raise ValueError("numerators and denominators must be 1-D arrays of the same length")

    @classmethod
    def mean(cls, values: Any) -> Scores:
        import numpy as np

        values = np.asarray(values, dtype=np.float64)
        return cls(values, np.ones_like(values), "mean")

    def __len__(self) -> int:
        return len(self.numerators)

    def value(self, weights: np.ndarray | None = None) -> Any:
        """The aggregate; with `weights` of shape (k, n) (how often each example was drawn), k aggregates."""
        import numpy as np

        if weights is None:
            ratio = self.numerators.sum() / self.denominators.sum()
        else:
            ratio = (weights @ self.numerators) / (weights @ self.denominators)
        return np.exp(ratio) if self.aggregate == "exp_ratio" else ratio


@dataclass
class Comparison:
    """Base vs tuned on the same examples, with percentile intervals from a paired bootstrap."""

    n: int
    base: float
    tuned: float
    difference: float  # tuned - base
    ci_low: float  # interval of the difference
    ci_high: float
    significant: bool  # the interval of the difference excludes 0
    base_ci_low: float
    base_ci_high: float
    tuned_ci_low: float
    tuned_ci_high: float
    relative_change: float | None  # tuned / base - 1; None when base is 0 in some resample
    relative_ci_low: float | None
    relative_ci_high: float | None
    confidence: float
    resamples: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    base: Scores, tuned: Scores, resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> Comparison:
    """Resample examples with replacement (the same draw for both models) and recompute each aggregate.

    Pairing is what makes the interval tight: per-example difficulty cancels between base and tuned.
    """
    import numpy as np

    n = len(base)
    if n != len(tuned) or base.aggregate != tuned.aggregate:
        raise ValueError(
            f"paired scores must match: {n} vs {len(tuned)} examples, {base.aggregate} vs {tuned.aggregate}"
        )
    if n == 0:
        raise ValueError("no examples to compare")
    if resamples < 1:
        raise ValueError("resamples must be positive")
    rng = np.random.default_rng(seed)
    uniform = np.full(n, 1.0 / n)
    # Draw in chunks so memory stays at a few MB whatever n and the number of resamples.
    chunk = max(1, 2_000_000 // n)
    base_stats, tuned_stats = [], []
    for start in range(0, resamples, chunk):
        weights = rng.multinomial(n, uniform, size=min(chunk, resamples - start)).astype(np.float64)
        base_stats.append(base.value(weights))
        tuned_stats.append(tuned.value(weights))
    base_draws, tuned_draws = np.concatenate(base_stats), np.concatenate(tuned_stats)
    tails = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]
    low, high = _interval(tuned_draws - base_draws, tails)
    base_value, tuned_value = float(base.value()), float(tuned.value())
    relative = relative_low = relative_high = None
    if base_value != 0 and np.all(base_draws != 0):
        relative = tuned_value / base_value - 1
        relative_low, relative_high = _interval(tuned_draws / base_draws - 1, tails)
    base_low, base_high = _interval(base_draws, tails)
    tuned_low, tuned_high = _interval(tuned_draws, tails)
    return Comparison(
        n=n,
        base=base_value,
        tuned=tuned_value,
        difference=tuned_value - base_value,
        ci_low=low,
        ci_high=high,
        significant=bool(low > 0 or high < 0),
        base_ci_low=base_low,
        base_ci_high=base_high,
        tuned_ci_low=tuned_low,
        tuned_ci_high=tuned_high,
        relative_change=relative,
        relative_ci_low=relative_low,
        relative_ci_high=relative_high,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )


def _interval(draws: np.ndarray, tails: list[float]) -> tuple[float, float]:
    import numpy as np

    low, high = np.quantile(draws, tails)
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------------------------
# Text metrics: each maps (prediction, reference) to a score in [0, 1]


def normalise_text(text: str) -> str:
    """Unicode-normalised, case-folded, punctuation removed, whitespace collapsed.

    Unicode categories rather than `string.punctuation`, so the rule works beyond ASCII; articles are kept
    (removing English articles, as SQuAD does, would be wrong for other languages).
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_text(prediction) == normalise_text(reference))


def contains(prediction: str, reference: str) -> float:
    """The normalised reference appears in the normalised prediction (on word boundaries)."""
    needle = normalise_text(reference)
    return float(bool(needle) and f" {needle} " in f" {normalise_text(prediction)} ")


def regex_match(prediction: str, reference: str, pattern: re.Pattern[str]) -> float:
    """With a capture group: the first group found in the prediction equals the reference (normalised).
    Without one: the pattern matches somewhere in the prediction."""
    found = pattern.search(prediction)
    if found is None:
        return 0.0
    if pattern.groups == 0:
        return 1.0
    return float(normalise_text(found.group(1) or "") == normalise_text(reference))


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score). Its tokenizer keeps only [a-z0-9]: use chrf for other scripts."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


@lru_cache(maxsize=1)
def _chrf() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF (sacrebleu), scaled to [0, 1]; language-agnostic character n-grams."""
    return float(_chrf().sentence_score(prediction, [reference]).score / 100.0)


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "rouge_l": rouge_l,
    "chrf": chrf,
}


# ---------------------------------------------------------------------------------------------------------------
# Text-to-SQL execution accuracy


_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
_FENCE = re.compile(r"```(?:sql|sqlite)?\s*(.*?)```", re.IGNORECASE | re.DOTALL)


class SqlTimeout(Exception):
    """A query ran past its time budget."""


class SqlExecutor:
    """Runs queries on a SQLite file opened read-only, with a time budget per query.

    Read-only three ways: the `mode=ro` URI, `PRAGMA query_only`, and an authorizer that refuses ATTACH (which
    could otherwise open other files). A progress handler aborts a runaway query (e.g. a cross join) at the deadline.
    """

    def __init__(self, database: Path, timeout_s: float = 5.0, max_rows: int = 100_000) -> None:
        if not database.is_file():
            raise MetricError(f"{database}: SQLite database not found; fix eval.datasets[].database")
        self.database, self.timeout_s, self.max_rows = database, timeout_s, max_rows
        try:
            self.connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
            self.connection.execute("PRAGMA query_only = ON")
            self.connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise MetricError(
                f"{database}: cannot open as a SQLite database ({exc}); check eval.datasets[].database"
            ) from None
        self.connection.set_authorizer(_refuse_attach)
        self._deadline = math.inf
        # Called every 1000 VM instructions: cheap, and frequent enough to stop within milliseconds.
        self.connection.set_progress_handler(self._over_time, 1000)

    def _over_time(self) -> int:
        return int(time.monotonic() > self._deadline)

    def run(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of one statement; raises sqlite3.Error (incl. interrupted on timeout) or SqlTimeout."""
        self._deadline = time.monotonic() + self.timeout_s
        try:
            cursor = self.connection.execute(sql)
            rows = cursor.fetchmany(self.max_rows + 1)
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc) and time.monotonic() > self._deadline:
                raise SqlTimeout(f"query ran longer than {self.timeout_s} s") from None
            raise
        finally:
            self._deadline = math.inf
        if len(rows) > self.max_rows:
            raise sqlite3.DataError(f"query returned more than {self.max_rows} rows")
        return [tuple(_canonical(value) for value in row) for row in rows]

    def reference_result(self, sql: str, origin: str) -> list[tuple[Any, ...]]:
        """The reference must run: a broken reference makes every prediction look wrong."""
        try:
            return self.run(extract_sql(sql))
        except (sqlite3.Error, SqlTimeout) as exc:
            raise DataError(
                f"{origin}: reference SQL fails on {self.database.name} ({exc}); fix the row or the database"
            ) from None

    def score(self, prediction: str, reference_sql: str, reference_rows: list[tuple[Any, ...]]) -> float:
        """1 if the prediction's result equals the reference's: as a multiset of rows, or as a sequence when the
        reference has ORDER BY. A prediction that fails, times out or is not one statement scores 0."""
        try:
            rows = self.run(extract_sql(prediction))
        except (sqlite3.Error, sqlite3.Warning, SqlTimeout, ValueError):
            return 0.0
        if _ORDER_BY.search(reference_sql):
            return float(rows == reference_rows)
        return float(Counter(rows) == Counter(reference_rows))

    def close(self) -> None:
        self.connection.close()


def _refuse_attach(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_DENY if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) else sqlite3.SQLITE_OK


def _canonical(value: Any) -> Any:
    # Equivalent queries can differ in the last bits of a float (e.g. AVG over a different join order).
    return float(f"{value:.12g}") if isinstance(value, float) else value


def extract_sql(text: str) -> str:
    """The SQL in a model answer: the inside of a ```sql fence if there is one, else the stripped text."""
    fenced = _FENCE.search(text)
    return (fenced.group(1) if fenced else text).strip()


# ---------------------------------------------------------------------------------------------------------------
# A user metric from a file the recipe names


def load_user_function(path: Path, function: str, field: str) -> Callable[..., Any]:
    """Import `function` from exactly this file (never from sys.path), so the recipe says which code runs."""
    if not path.is_file():
        raise MetricError(f"{field}.module: {path} not found; give the path to a .py file relative to the recipe")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"sovtune_user_metric_{digest}", path)
    if spec is None or spec.loader is None:
        raise MetricError(f"{field}.module: {path} cannot be imported; it must be a Python source file (.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's module may raise anything while importing
        raise MetricError(f"{field}.module: importing {path} failed ({type(exc).__name__}: {exc})") from None
    found = getattr(module, function, None)
    if not callable(found):
        available = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_"))
        raise MetricError(f"{field}.function: {path} has no function {function!r}; functions there: {available}")
    return found


def call_user_metric(
    func: Callable[..., Any], prediction: str, reference: str, row: dict[str, Any], where: str
) -> float:
    """Call `func(prediction, reference, row)` and insist on a finite number (a bool counts as 0/1)."""
    import numpy as np

    value = func(prediction, reference, row)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(float(value)):
        raise MetricError(f"{where} returned {value!r}; a metric function must return a finite number")
    return float(value)
