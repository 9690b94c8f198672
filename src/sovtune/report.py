"""The evaluation report (report.json schema-versioned, report.md, report.png), its gates, and `compare` of runs.

Needs no torch: `sovtune compare` reads report.json files only.
"""

from __future__ import annotations

import json
import logging
import math
import typing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml

from sovtune.config import GENERAL_DATASET, LOSS_METRICS, EvalSection, Gate, Recipe
from sovtune.core.files import atomic_writers, make_output_dir, write_synced
from sovtune.core.rundir import REPORT_KIND as KIND
from sovtune.core.rundir import REPORT_SCHEMA_VERSION as SCHEMA_VERSION
from sovtune.core.rundir import ReportError, RunDir, read_report
from sovtune.core.secrets import redact_secrets
from sovtune.metrics import Scores, paired_bootstrap
from sovtune.run.fingerprint import flatten_settings

log = logging.getLogger(__name__)


@dataclass
class MetricResult:
    """One metric on one dataset, base vs tuned; the interval fields are those of metrics.Comparison."""

    dataset: str
    metric: str
    higher_is_better: bool
    aggregate: str  # mean | ratio | exp_ratio (how per-example values combine; exp_ratio = perplexity)
    n: int
    base: float
    tuned: float
    difference: float
    ci_low: float
    ci_high: float
    significant: bool
    base_ci_low: float
    base_ci_high: float
    tuned_ci_low: float
    tuned_ci_high: float
    relative_change: float | None
    relative_ci_low: float | None
    relative_ci_high: float | None
    confidence: float
    resamples: int
    seed: int
    # Generation metrics only (None otherwise): the constant baseline, i.e. the tuned model's most frequent answer given
    # for every example, and tuned - constant with its paired interval. A gain over the base that does not beat the
    # constant rewards the form of the answers, not their content.
    constant: float | None = None
    constant_difference: float | None = None
    constant_ci_low: float | None = None
    constant_ci_high: float | None = None
    beats_constant: bool | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.metric}"

    @property
    def improved(self) -> bool:
        return self.significant and (self.difference > 0) == self.higher_is_better

    @property
    def gain_in_form_only(self) -> bool:
        """Better than the base, but not better than the constant baseline."""
        return self.improved and self.beats_constant is False

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "no significant change"
        if self.gain_in_form_only:
            return "better, not above constant"
        return "better" if self.improved else "worse"


@dataclass
class GateResult:
    gate: str  # the key in eval.gates
    dataset: str
    metric: str
    rule: str
    threshold: float | bool
    value: float | bool | None
    passed: bool

    def describe(self) -> str:
        shown = "undefined" if self.value is None else _plain(self.value)
        return f"{self.gate} ({self.dataset}/{self.metric}) {self.rule} {_plain(self.threshold)}: got {shown}"


@dataclass
class Report:
    run: str
    base_model: dict[str, Any]
    adapter: str
    settings: dict[str, Any]
    results: list[MetricResult]
    gates: list[GateResult]
    samples: list[dict[str, Any]]
    notes: dict[str, list[str]]
    timing: dict[str, Any]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # every prediction: eval_predictions.jsonl
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per dataset: distinct outputs, the most frequent
    # The settings the report was made with (secrets redacted): what compare diffs between runs.
    recipe: dict[str, Any] = field(default_factory=dict)
    training_data: list[dict[str, Any]] = field(default_factory=list)  # per source, from data_stats.json

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)

    @property
    def forgetting(self) -> MetricResult | None:
        return next((r for r in self.results if r.dataset == GENERAL_DATASET and r.metric == "perplexity"), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "created": self.created,
            "run": self.run,
            "base_model": self.base_model,
            "adapter": self.adapter,
            "passed": self.passed,
            "results": [asdict(result) for result in self.results],
            "forgetting": _forgetting_json(self.forgetting),
            "gates": [asdict(gate) for gate in self.gates],
            "outputs": self.outputs,
            "samples": self.samples,
            "notes": self.notes,
            "settings": self.settings,
            "recipe": self.recipe,
            "timing": self.timing,
            "training_data": self.training_data,
        }

    def write(self, run_dir: Path) -> list[Path]:
        """All files are written to temporary names first, then renamed: no half-written report."""
        run_dir.mkdir(parents=True, exist_ok=True)
        predictions = "".join(
            json.dumps({"dataset": dataset, **record}, ensure_ascii=False, default=str) + "\n"
            for dataset, records in self.examples.items()
            for record in records
        )
        staged = {
            RunDir.REPORT: json.dumps(self.to_json(), indent=2, ensure_ascii=False, default=str) + "\n",
            RunDir.REPORT_MD: self.markdown(),
            RunDir.PREDICTIONS: predictions,
        }
        paths = [run_dir / name for name in RunDir.REPORT_FILES]
        with atomic_writers(paths) as temporary:
            for name, text in staged.items():
                # Prompts, references and generations quote the data: a credential in it is not copied into the run.
                write_synced(temporary[run_dir / name], redact_secrets(text).encode("utf-8"))
            plot_results(self.results, temporary[run_dir / RunDir.REPORT_PNG], title=f"{self.run}: base vs tuned")
        return paths

    def markdown(self) -> str:
        settings = self.settings["bootstrap"]
        lines = [
            f"# Evaluation: {self.run}",
            "",
            f"Base `{self.base_model['name_or_path']}`"
            + (f" @ `{self.base_model['revision']}`" if self.base_model.get("revision") else "")
            + f" vs adapter `{self.adapter}`. Same examples for both; "
            f"{int(settings['confidence'] * 100)}% paired-bootstrap intervals ({settings['resamples']} resamples, "
            f"seed {settings['seed']}). {self.created}",
            "",
        ]
        if self.gates:
            failed = [gate for gate in self.gates if not gate.passed]
            lines += [
                f"**Gates: {'PASSED' if not failed else 'FAILED'}**"
                + (
                    " (" + "; ".join(gate.describe() for gate in failed) + ")"
                    if failed
                    else f" ({len(self.gates)} checks)"
                ),
                "",
            ]
        lines += _markdown_table(self.results)
        lines += ["", "## Forgetting check", "", self.forgetting_text()]
        evidence = self.form_warnings() + self.diversity_lines()
        if evidence:
            lines += ["", "## Constant baseline and output diversity", "", CONSTANT_BASELINE, ""]
            lines += [f"- {line}" for line in evidence]
        if self.gates:
            lines += [
                "",
                "## Gates",
                "",
                "| gate | on | rule | threshold | value | result |",
                "|---|---|---|---|---|---|",
            ]
            for gate in self.gates:
                value = "undefined" if gate.value is None else _plain(gate.value)
                lines.append(
                    f"| {gate.gate} | {gate.dataset}/{gate.metric} | {gate.rule} | {_plain(gate.threshold)} | "
                    f"{value} | {'pass' if gate.passed else '**FAIL**'} |"
                )
        if self.training_data:
            lines += ["", "## Training data (one epoch)", "", *_markdown_sources(self.training_data)]
        if self.samples:
            lines += ["", "## Side by side: base vs tuned", ""]
            for number, sample in enumerate(self.samples, start=1):
                lines += _markdown_sample(number, sample)
        notes = [f"- {dataset}: {note}" for dataset, items in self.notes.items() for note in items]
        if notes:
            lines += ["", "## Notes", "", *notes]
        lines += ["", "![base vs tuned per metric](report.png)", ""]
        return "\n".join(lines)

    def summary_text(self) -> str:
        """The results table, the forgetting sentence and the gates as plain text (the CLI renders its own table)."""
        lines = [f"{self.run}: base vs tuned", *_markdown_table(self.results), *self.summary_lines()]
        lines += [f"gate {'pass' if gate.passed else 'FAIL'}: {gate.describe()}" for gate in self.gates]
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        """What to read under the table, in plain text: forgetting (or its absence), gains in form only, diversity."""
        return [self.forgetting_text().replace("**", ""), *self.form_warnings(), *self.diversity_lines()]

    def forgetting_text(self) -> str:
        forgetting = self.forgetting
        return forgetting_sentence(forgetting) if forgetting is not None else NO_FORGETTING_CHECK

    def form_warnings(self) -> list[str]:
        """One line per gain over the base that the constant baseline matches: form, not content."""
        return [
            f"{result.key}: better than the base ({number_text(result.base)} → {number_text(result.tuned)}) but not "
            f"than the constant baseline ({number_text(result.constant or 0.0)}; tuned - constant "
            f"{_signed(result.constant_difference or 0.0)} [{_signed(result.constant_ci_low or 0.0)}, "
            f"{_signed(result.constant_ci_high or 0.0)}]): the gain is in the form of the answers, not their content"
            for result in self.results
            if result.gain_in_form_only
        ]

    def diversity_lines(self) -> list[str]:
        lines = []
        for dataset, outputs in self.outputs.items():
            n, distinct, frequent = outputs["n"], outputs["distinct"], outputs["most_frequent"]
            lines.append(
                f"{dataset}: the tuned model gave {distinct['tuned']} distinct outputs for {n} examples (base "
                f"{distinct['base']}); its most frequent, {_quoted(frequent['text'])}, {frequent['count']} times "
                f"({frequent['count'] / n:.0%}) is the constant baseline"
            )
        return lines


NO_FORGETTING_CHECK = (
    "No forgetting check: eval.general is not set, so this report cannot show what the adapter lost on general text; "
    "add a general-text set (eval.general: path/to/general.jsonl) and gate it (general_perplexity: {max_increase: "
    "0.10})."
)
CONSTANT_BASELINE = (
    "The constant baseline answers every example with the tuned model's most frequent output and is scored like the "
    "tuned outputs; a gain over the base that does not beat it is a gain in form (length, vocabulary, format), not "
    "in content. Gate on it with `beats_constant: true`."
)


def _quoted(text: str, limit: int = 80) -> str:
    text = text.replace("\n", " ")
    return f'"{text if len(text) <= limit else text[: limit - 1] + "…"}"'


# ---------------------------------------------------------------------------------------------------------------
# Building the report


def build_report(
    recipe: Recipe,
    outcomes: Sequence[Any],
    adapter_dir: Path,
    seconds: float,
    training_data: list[dict[str, Any]] | None = None,
) -> Report:
    """Bootstrap every metric of every suite outcome (evaluate.SuiteOutcome), check the gates, pick samples.

    `training_data` is what each training source gave an epoch (data_stats.json's train.sources)."""
    boot = recipe.eval.bootstrap
    results = []
    for outcome in outcomes:
        for metric, paired in outcome.scores.items():
            comparison = paired_bootstrap(paired.base, paired.tuned, boot.resamples, boot.seed, boot.confidence)
            higher = outcome.higher_is_better[metric]
            result = MetricResult(
                dataset=outcome.name,
                metric=metric,
                higher_is_better=higher,
                aggregate=paired.base.aggregate,
                **comparison.to_json(),
            )
            if paired.constant is not None:
                versus = paired_bootstrap(paired.constant, paired.tuned, boot.resamples, boot.seed, boot.confidence)
                result.constant, result.constant_difference = versus.base, versus.difference
                result.constant_ci_low, result.constant_ci_high = versus.ci_low, versus.ci_high
                result.beats_constant = versus.significant and (versus.difference > 0) == higher
            results.append(result)
    timing: dict[str, Any] = {"total_s": round(seconds, 3)}
    for outcome in outcomes:
        for phase, spent in outcome.seconds.items():
            count = len(outcome.examples)
            timing[f"{outcome.name}/{phase}"] = {
                "seconds": round(spent, 3),
                "examples": count,
                "examples_per_s": round(count / spent, 3) if spent > 0 else None,
            }
    return Report(
        run=recipe.name,
        base_model={"name_or_path": recipe.model_location, "revision": recipe.model.revision},
        adapter=str(adapter_dir),
        settings=recipe.eval.model_dump(mode="json"),
        results=results,
        gates=check_gates(recipe.eval, results),
        samples=pick_samples(outcomes, recipe.eval.samples),
        notes={outcome.name: outcome.notes for outcome in outcomes if outcome.notes},
        timing=timing,
        examples={outcome.name: outcome.examples for outcome in outcomes},
        outputs={outcome.name: outcome.outputs for outcome in outcomes if outcome.outputs},
        recipe=recipe_record(recipe),
        training_data=list(training_data or []),
    )


# What shapes the results; where the run went and where it may be published (hub, sovereignty, output) are left
# out of report.json, which is published with the adapter.
_RESULT_SECTIONS = ("schema_version", "model", "quantization", "adapter", "data", "train", "eval")


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    """The settings the report was made with (after --set), secrets redacted, as plain data: what compare diffs."""
    recorded = yaml.safe_load(recipe.to_yaml())
    return {key: recorded[key] for key in _RESULT_SECTIONS if isinstance(recorded, dict) and key in recorded}


def pick_samples(outcomes: Sequence[Any], count: int) -> list[dict[str, Any]]:
    """A few generations to read side by side, preferring examples where base and tuned answered differently."""
    records = [
        {"dataset": outcome.name, **record}
        for outcome in outcomes
        for record in outcome.examples
        if "predictions" in record
    ]
    differing = [r for r in records if r["predictions"]["base"] != r["predictions"]["tuned"]]
    same = [r for r in records if r["predictions"]["base"] == r["predictions"]["tuned"]]
    return (differing + same)[:count]


def check_gates(section: EvalSection, results: Sequence[MetricResult]) -> list[GateResult]:
    by_key = {(result.dataset, result.metric): result for result in results}
    outcomes = []
    for key, gate in section.gates.items():
        for target in section.gate_targets(key):
            result = by_key.get(target)
            if result is None:
                raise ReportError(f"gate {key!r}: {target[0]}/{target[1]} was not computed")
            outcomes.extend(_gate_rules(key, gate, result))
    return outcomes


def _gate_rules(key: str, gate: Gate, result: MetricResult) -> list[GateResult]:
    sign = 1.0 if result.higher_is_better else -1.0
    # The improvement in the metric's good direction; with `confident`, the worst end of each interval.
    gain, relative, low, high = sign * result.difference, result.relative_change, result.tuned, result.tuned
    upper = lower = ""
    if gate.confident:
        gain = result.ci_low if result.higher_is_better else -result.ci_high
        relative, low, high = result.relative_ci_high, result.tuned_ci_low, result.tuned_ci_high
        upper, lower = " (upper bound)", " (lower bound)"
    checks: list[tuple[str, float | bool, float | bool | None, bool]] = []
    if gate.min_gain is not None:
        checks.append((f"min_gain{lower}", gate.min_gain, gain, gain >= gate.min_gain))
    if gate.max_increase is not None:
        ok = relative is not None and relative <= gate.max_increase
        checks.append((f"max_increase{upper}", gate.max_increase, relative, ok))
    if gate.min_value is not None:
        checks.append((f"min_value{lower}", gate.min_value, low, low >= gate.min_value))
    if gate.max_value is not None:
        checks.append((f"max_value{upper}", gate.max_value, high, high <= gate.max_value))
    if gate.significant:
        checks.append(("significant", True, result.improved, result.improved))
    if gate.beats_constant:
        checks.append(("beats_constant", True, result.beats_constant, bool(result.beats_constant)))
    return [
        GateResult(
            gate=key,
            dataset=result.dataset,
            metric=result.metric,
            rule=rule,
            threshold=threshold,
            value=value,
            passed=ok,
        )
        for rule, threshold, value, ok in checks
    ]


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def number_text(value: float) -> str:
    if value != value or math.isinf(value):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.4g}"


def _signed(value: float) -> str:
    text = number_text(value)
    return text if text.startswith("-") else f"+{text}"


def _percent(value: float) -> str:
    percent = value * 100
    return f"{percent:+.1f}%" if abs(percent) >= 0.1 or percent == 0 else f"{percent:+.2g}%"


def difference_text(result: MetricResult) -> tuple[str, str]:
    """Δ and its interval; perplexity reads best as a relative change."""
    if result.aggregate == "exp_ratio" and result.relative_change is not None:
        return _percent(
            result.relative_change
        ), f"[{_percent(result.relative_ci_low)}, {_percent(result.relative_ci_high)}]"  # type: ignore[arg-type]
    return _signed(result.difference), f"[{_signed(result.ci_low)}, {_signed(result.ci_high)}]"


def arrow(result: MetricResult) -> str:
    return "↑" if result.higher_is_better else "↓"


def _markdown_table(results: Sequence[MetricResult]) -> list[str]:
    confidence = int(results[0].confidence * 100) if results else 95
    lines = [
        f"| dataset | metric | base | tuned | constant | Δ | {confidence}% CI of Δ | verdict | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        delta, interval = difference_text(result)
        verdict = f"**{result.verdict}**" if result.significant else result.verdict
        constant = number_text(result.constant) if result.constant is not None else "–"
        lines.append(
            f"| {result.dataset} | {result.metric} {arrow(result)} | {number_text(result.base)} | "
            f"{number_text(result.tuned)} | {constant} | {delta} | {interval} | {verdict} | {result.n} |"
        )
    return lines


def _markdown_sources(sources: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| source | format | weight | examples | per epoch | share | tokens | token share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for source in sources:
        weight = "-" if source.get("weight") is None else f"{source['weight']:g}"
        name = source["source"] + (" (general-text replay)" if source.get("general") else "")
        lines.append(
            f"| {name} | {source['format']} | {weight} | {source['examples']:,} | {source['per_epoch']:,} | "
            f"{source['share']:.1%} | {source['tokens']:,} | {source['token_share']:.1%} |"
        )
    return lines


def _forgetting_json(result: MetricResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "metric": "general_perplexity",
        "base": result.base,
        "tuned": result.tuned,
        "relative_change": result.relative_change,
        "ci_low": result.relative_ci_low,
        "ci_high": result.relative_ci_high,
        "significant": result.significant,
        "n": result.n,
    }


# How much worse general text reads after tuning, in words: (largest relative perplexity increase, wording).
FORGETTING_WORDS = (
    (0.10, "the adapter forgot a little general text"),
    (0.25, "the adapter forgot some general text"),
    (1.00, "the adapter forgot much general text"),
    (
        float("inf"),
        "the adapter forgot most of its general text: its general-text perplexity is {ratio:.1f}x the base's",
    ),
)


def forgetting_meaning(result: MetricResult) -> str:
    """The forgetting figure in words that scale with it (+432% is not "some" forgetting)."""
    if not result.significant:
        return "no significant change"
    change = result.relative_change or 0.0
    if change <= 0:
        return "general text got easier"
    words = next(words for limit, words in FORGETTING_WORDS if change <= limit)
    return words.format(ratio=1 + change)


def forgetting_sentence(result: MetricResult) -> str:
    change = _percent(result.relative_change or 0.0)
    interval = f"[{_percent(result.relative_ci_low or 0.0)}, {_percent(result.relative_ci_high or 0.0)}]"
    meaning = forgetting_meaning(result)
    return (
        f"General-text perplexity {number_text(result.base)} → {number_text(result.tuned)}: **{change}** "
        f"({int(result.confidence * 100)}% CI {interval}, {result.n} texts): {meaning}."
    )


def _cell(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    text = text.replace("|", "\\|").replace("\n", "<br>")
    return f"`{text}`" if text and "`" not in text else text


def _markdown_sample(number: int, sample: dict[str, Any]) -> list[str]:
    metrics = list(sample.get("scores", {}))
    header = "| | output | " + " | ".join(metrics) + " |" if metrics else "| | output |"
    rule = "|---|---|" + "---|" * len(metrics)
    prompt = sample.get("prompt", "").strip().replace("\n", " ")
    lines = [f"### {number}. {sample['dataset']} · {sample['origin']}", "", f"> {prompt[:400]}", "", header, rule]
    lines.append(f"| reference | {_cell(sample.get('reference', ''))} |" + " |" * len(metrics))
    for name in ("base", "tuned"):
        scores = " | ".join(_plain(sample["scores"][metric][name]) for metric in metrics)
        lines.append(
            f"| {name} | {_cell(sample['predictions'][name])} | {scores} |"
            if metrics
            else f"| {name} | {_cell(sample['predictions'][name])} |"
        )
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Charts


def plot_results(results: Sequence[MetricResult], path: Path, title: str) -> None:
    """One panel per metric (scales differ): base and tuned bars with their intervals, Δ and its interval on top."""
    plot_groups(
        [(result.key, [("base", result.base, result.base_ci_low, result.base_ci_high),
                        ("tuned", result.tuned, result.tuned_ci_low, result.tuned_ci_high)],
          "Δ " + " ".join(difference_text(result))) for result in results],
        path,
        title,
    )  # fmt: skip


def plot_groups(
    groups: Sequence[tuple[str, list[tuple[str, float, float, float]], str]], path: Path, title: str
) -> None:
    """Small multiples: each group is (panel title, [(bar label, value, low, high)], subtitle)."""
    from matplotlib.figure import Figure  # the Agg canvas: no display, no global pyplot state

    count = max(1, len(groups))
    columns = min(4, count)
    rows = math.ceil(count / columns)
    bars = max((len(group[1]) for group in groups), default=2)
    figure = Figure(figsize=(max(3.0, 0.9 * bars + 1.6) * columns, 3.2 * rows), layout="constrained")
    figure.suptitle(title)
    palette = ["#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for index, (name, values, subtitle) in enumerate(groups):
        axis = figure.add_subplot(rows, columns, index + 1)
        heights = [value for _, value, _, _ in values]
        errors = [
            [max(0.0, value - low) for _, value, low, _ in values],
            [max(0.0, high - value) for _, value, _, high in values],
        ]
        axis.bar(range(len(values)), heights, yerr=errors, capsize=4, color=palette[: len(values)] or None)
        axis.set_xticks(range(len(values)), [label for label, *_ in values], rotation=20 if len(values) > 2 else 0)
        axis.set_title(f"{name}\n{subtitle}", fontsize=9)
        if all(low >= 0 for _, _, low, _ in values):
            axis.set_ylim(bottom=0, top=None if any(high > 0 for *_, high in values) else 1)
    if not groups:
        figure.add_subplot(1, 1, 1).text(0.5, 0.5, "no metrics", ha="center")
    figure.savefig(path, format="png", dpi=110)


# ---------------------------------------------------------------------------------------------------------------
# Reading reports and comparing runs


def load_report(run_dir: Path) -> dict[str, Any]:
    """report.json of a run directory (or the file itself), checked to be a report of this schema, down to the type of
    every result field (a report from elsewhere is data: a list where a number belongs is one line, not a crash)."""
    path = run_dir / RunDir.REPORT if run_dir.is_dir() else run_dir
    report = read_report(path)
    base = report.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("name_or_path"), str):
        raise ReportError(f"{path}: base_model.name_or_path is missing or not text; re-run sovtune eval")
    results = report.get("results")
    if not isinstance(results, list) or not all(isinstance(result, dict) for result in results):
        raise ReportError(f"{path}: results must be a list of objects; re-run sovtune eval")
    for index, result in enumerate(results):
        for name, kinds in _RESULT_TYPES.items():
            value = result.get(name)
            if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
                raise ReportError(
                    f"{path}: results[{index}].{name} is {type(value).__name__}, not what sovtune writes; "
                    "re-run sovtune eval"
                )
    return report


def _result_types() -> dict[str, tuple[type, ...]]:
    """MetricResult's field types as isinstance() takes them (a float field also holds a JSON integer)."""
    kinds: dict[str, tuple[type, ...]] = {}
    for name, hint in typing.get_type_hints(MetricResult).items():
        options = typing.get_args(hint) or (hint,)
        accepted = tuple(type(None) if option is type(None) else option for option in options)
        kinds[name] = accepted + ((int,) if float in accepted else ())
    return kinds


_RESULT_TYPES = _result_types()


def compare(run_dirs: Sequence[Path], out_dir: Path | None = None) -> dict[str, Any]:
    """Several runs of one base model: each against the base, and each against the first run (the reference) example
    by example, with the settings that differ; compare.json/.md/.png in out_dir.

    The run-vs-run differences are paired on the examples both runs evaluated (matched by dataset and origin in
    eval_predictions.jsonl); example sets that differ are said loudly, never mixed silently.
    """
    if len(run_dirs) < 2:
        raise ReportError("compare needs at least two run directories")
    paths = [Path(run_dir) for run_dir in run_dirs]
    reports = [load_report(path) for path in paths]
    labels = _labels(paths)
    bases = {json.dumps(report["base_model"], sort_keys=True) for report in reports}
    if len(bases) > 1:
        found = ", ".join(f"{label}: {report['base_model']['name_or_path']}" for label, report in zip(labels, reports))
        raise ReportError(f"runs have different base models ({found}); compare adapters of one base model")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for label, report in zip(labels, reports):
        for result in report["results"]:
            row = rows.setdefault(
                (result["dataset"], result["metric"]),
                {"dataset": result["dataset"], "metric": result["metric"],
                 "higher_is_better": result["higher_is_better"], "aggregate": result["aggregate"],
                 "base": result["base"], "base_ci_low": result["base_ci_low"], "base_ci_high": result["base_ci_high"],
                 "runs": {}},
            )  # fmt: skip
            if not math.isclose(row["base"], result["base"], rel_tol=1e-9, abs_tol=1e-12):
                row["base_differs"] = True  # evaluated on different examples: deltas are not comparable
            row["runs"][label] = {
                key: result[key]
                for key in ("tuned", "difference", "ci_low", "ci_high", "significant", "tuned_ci_low", "tuned_ci_high",
                            "relative_change", "relative_ci_low", "relative_ci_high", "n")
            }  # fmt: skip
    warnings: list[str] = []
    examples = {label: _examples_by_origin(path, label, warnings) for label, path in zip(labels, paths)}
    paired = []
    for label in labels[1:]:
        warnings += _example_set_warnings(labels[0], label, examples)
        settings = reports[0].get("settings") or {}
        paired += paired_rows(labels[0], label, list(rows.values()), examples, settings, warnings)
    for warning in warnings:
        log.warning("%s", warning)
    comparison = {
        "schema_version": SCHEMA_VERSION,
        "kind": "sovtune.compare",
        "base_model": reports[0]["base_model"],
        "runs": {label: str(run_dir) for label, run_dir in zip(labels, run_dirs)},
        "reference": labels[0],
        "passed": {label: report.get("passed") for label, report in zip(labels, reports)},
        "rows": list(rows.values()),
        "paired": paired,
        "settings": settings_diff(labels, [_recipe_of(path, report) for path, report in zip(paths, reports)]),
        "warnings": warnings,
    }
    if out_dir is not None:
        _write_comparison(comparison, labels, Path(out_dir))
    return comparison


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [path.resolve().name for path in run_dirs]
    return names if len(set(names)) == len(names) else [str(path) for path in run_dirs]


# Run vs run: per-example values from eval_predictions.jsonl, matched by (dataset, origin)

Examples = dict[tuple[str, str], dict[str, Any]]


def _examples_by_origin(path: Path, label: str, warnings: list[str]) -> Examples | None:
    folder = path if path.is_dir() else path.parent
    records = RunDir(folder).predictions()
    if records is None:
        warnings.append(
            f"{label}: no {RunDir.PREDICTIONS} beside its report, so it cannot be compared example by example with the "
            "other runs; re-run sovtune eval on it"
        )
        return None
    return {(record["dataset"], record["origin"]): record for record in records}


def _example_set_warnings(reference: str, label: str, examples: dict[str, Examples | None]) -> list[str]:
    """One line per dataset whose examples differ between the two runs (e.g. after a partial re-evaluation)."""
    first, second = examples[reference], examples[label]
    if first is None or second is None:
        return []
    warnings = []
    for dataset in sorted({key[0] for key in first} & {key[0] for key in second}):
        mine = {origin for name, origin in first if name == dataset}
        theirs = {origin for name, origin in second if name == dataset}
        if mine != theirs:
            warnings.append(
                f"{dataset}: {reference} and {label} were evaluated on different examples ({reference} "
                f"{len(mine)}, {label} {len(theirs)}, {len(mine & theirs)} shared); the run-vs-run difference uses "
                "only the shared ones, and their columns against the base are not comparable"
            )
    return warnings


def per_example(record: dict[str, Any], metric: str) -> tuple[float, float]:
    """(numerator, denominator) of the tuned model's `metric` on one example: token sums for loss metrics, the
    score otherwise (see metrics.Scores)."""
    if metric in LOSS_METRICS:
        sums = record["token_sums"]
        return float(sums["correct" if metric == "token_accuracy" else "nll"]["tuned"]), float(sums["tokens"])
    return float(record["scores"][metric]["tuned"]), 1.0


def paired_rows(
    reference: str,
    label: str,
    rows: list[dict[str, Any]],
    examples: dict[str, Examples | None],
    settings: Any,
    warnings: list[str],
) -> list[dict[str, Any]]:
    """`label` minus `reference` on every metric both computed, paired on their shared examples; a metric whose
    per-example values were not recorded (a report from an older sovtune) is left out with a warning."""
    first, second = examples[reference], examples[label]
    if first is None or second is None:
        return []
    boot = settings.get("bootstrap") or {} if isinstance(settings, dict) else {}
    found = []
    for row in rows:
        if reference not in row["runs"] or label not in row["runs"]:
            continue
        shared = [key for key in first if key[0] == row["dataset"] and key in second]
        if not shared:
            continue
        try:
            values = [[per_example(runs[key], row["metric"]) for key in shared] for runs in (first, second)]
        except (KeyError, TypeError, ValueError):
            warnings.append(
                f"{row['dataset']}/{row['metric']}: {RunDir.PREDICTIONS} of {reference} or {label} lacks its "
                "per-example values, so it is not compared run against run; re-run sovtune eval on both"
            )
            continue
        scores = [Scores([v[0] for v in run], [v[1] for v in run], row["aggregate"]) for run in values]
        comparison = paired_bootstrap(
            *scores,
            resamples=int(boot.get("resamples", 2000)),
            seed=int(boot.get("seed", 0)),
            confidence=float(boot.get("confidence", 0.95)),
        )
        better = comparison.significant and (comparison.difference > 0) == row["higher_is_better"]
        found.append(
            {"dataset": row["dataset"], "metric": row["metric"], "higher_is_better": row["higher_is_better"],
             "aggregate": row["aggregate"], "reference": reference, "run": label, "n": comparison.n,
             "reference_value": comparison.base, "run_value": comparison.tuned,
             **{key: value for key, value in comparison.to_json().items() if key in _PAIRED_FIELDS},
             "verdict": "no significant difference" if not comparison.significant else "better" if better else "worse"}
        )  # fmt: skip
    return found


_PAIRED_FIELDS = ("difference", "ci_low", "ci_high", "significant", "relative_change", "relative_ci_low",
                  "relative_ci_high", "confidence", "resamples", "seed")  # fmt: skip


def paired_cell(pair: dict[str, Any]) -> str:
    """Run minus reference with its interval; perplexity as a relative change."""
    if pair["aggregate"] == "exp_ratio" and pair["relative_change"] is not None:
        return (
            f"{_percent(pair['relative_change'])} [{_percent(pair['relative_ci_low'])}, "
            f"{_percent(pair['relative_ci_high'])}]"
        )
    return f"{_signed(pair['difference'])} [{_signed(pair['ci_low'])}, {_signed(pair['ci_high'])}]"


# Settings: what differs between the runs' recipes

_NOT_SETTINGS = ("name", "description", "output.dir", "source_path")


def _recipe_of(path: Path, report: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe the report was made with (report.json records it); else the run's recipe.yaml; None if neither."""
    if isinstance(report.get("recipe"), dict) and report["recipe"]:
        return dict(report["recipe"])
    folder = RunDir(path if path.is_dir() else path.parent)
    return folder.recipe_data() if (folder / RunDir.RECIPE).is_file() else None


def settings_diff(labels: list[str], recipes: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Every recipe setting whose value is not the same in all runs, with each run's value (None: not set)."""
    flat = {label: flatten_settings(recipe) for label, recipe in zip(labels, recipes) if recipe is not None}
    keys = sorted({key for values in flat.values() for key in values if key not in _NOT_SETTINGS})
    return [
        {"setting": key, "values": {label: values.get(key) for label, values in flat.items()}}
        for key in keys
        if len({json.dumps(values.get(key), sort_keys=True) for values in flat.values()}) > 1
    ]


def run_cell(row: dict[str, Any], label: str) -> str:
    run = row["runs"].get(label)
    if run is None:
        return "–"
    if row["aggregate"] == "exp_ratio" and run["relative_change"] is not None:
        delta = (
            f"{_percent(run['relative_change'])} [{_percent(run['relative_ci_low'])}, "
            f"{_percent(run['relative_ci_high'])}]"
        )
    else:
        delta = f"{_signed(run['difference'])} [{_signed(run['ci_low'])}, {_signed(run['ci_high'])}]"
    return f"{number_text(run['tuned'])} ({delta}){' *' if run['significant'] else ''}"


def comparison_lines(comparison: dict[str, Any], labels: list[str]) -> list[str]:
    """The run-vs-run table and the settings that differ, in Markdown."""
    reference = comparison["reference"]
    lines = []
    for label in labels[1:]:
        pairs = [pair for pair in comparison["paired"] if pair["run"] == label]
        lines += [
            f"## {label} vs {reference}",
            "",
            f"Paired on the examples both runs evaluated: Δ = {label} - {reference} with its "
            f"{int((pairs[0]['confidence'] if pairs else 0.95) * 100)}% paired-bootstrap interval "
            "(perplexity: relative change).",
            "",
            f"| dataset | metric | n | {reference} | {label} | Δ [CI] | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for pair in pairs:
            arrow = "↑" if pair["higher_is_better"] else "↓"
            verdict = f"**{label} {pair['verdict']}**" if pair["significant"] else pair["verdict"]
            values = f"{number_text(pair['reference_value'])} | {number_text(pair['run_value'])}"
            lines.append(
                f"| {pair['dataset']} | {pair['metric']} {arrow} | {pair['n']} | {values} | {paired_cell(pair)} | "
                f"{verdict} |"
            )
        if not pairs:
            lines.append("| – | no examples in common, or no per-example values | | | | | |")
        lines.append("")
    lines += ["## Settings that differ", ""]
    lines += [f"- `{item['setting']}`: {settings_cell(item)}" for item in comparison["settings"]] or [
        "- none (recipes not recorded, or identical)"
    ]
    return lines


def settings_cell(item: dict[str, Any]) -> str:
    return ", ".join(f"{label} `{json.dumps(value)}`" for label, value in item["values"].items())


def n_cell(row: dict[str, Any], labels: Sequence[str]) -> str:
    """The examples behind each run's figures: one number when all runs used as many, else each run's, flagged."""
    counts = [str(row["runs"][label]["n"]) for label in labels if label in row["runs"]]
    return counts[0] if len(set(counts)) == 1 else "/".join(counts) + " ⚠"


def _write_comparison(comparison: dict[str, Any], labels: list[str], out_dir: Path) -> None:
    make_output_dir(out_dir, "the comparison")
    lines = [f"# Comparison of {', '.join(f'`{label}`' for label in labels)}", ""]
    lines += [f"**Warning: {warning}.**" for warning in comparison["warnings"]]
    lines += ["", *comparison_lines(comparison, labels)]
    lines += [
        "",
        f"## Against the common base `{comparison['base_model']['name_or_path']}`",
        "",
        "Each cell: tuned value (Δ vs base [95% CI]); * = significant. Perplexity Δ is relative.",
        "",
        "| dataset | metric | n | base | " + " | ".join(labels) + " |",
        "|---|---|---|---|" + "---|" * len(labels),
    ]
    for row in comparison["rows"]:
        base = number_text(row["base"]) + (" (differs per run)" if row.get("base_differs") else "")
        arrow = "↑" if row["higher_is_better"] else "↓"
        cells = " | ".join(run_cell(row, label) for label in labels)
        lines.append(f"| {row['dataset']} | {row['metric']} {arrow} | {n_cell(row, labels)} | {base} | {cells} |")
    gates = ", ".join(
        f"{label}: {'-' if passed is None else ('pass' if passed else 'FAIL')}"
        for label, passed in comparison["passed"].items()
    )
    lines += ["", f"Gates: {gates}", "", "![comparison](compare.png)", ""]
    names = ("compare.json", "compare.md", "compare.png")
    with atomic_writers([out_dir / name for name in names]) as staged:
        temporary = {name: staged[out_dir / name] for name in names}
        write_synced(temporary["compare.json"], (json.dumps(comparison, indent=2) + "\n").encode("utf-8"))
        write_synced(temporary["compare.md"], "\n".join(lines).encode("utf-8"))
        groups = []
        for row in comparison["rows"]:
            bars = [("base", row["base"], row["base_ci_low"], row["base_ci_high"])]
            bars += [
                (label, run["tuned"], run["tuned_ci_low"], run["tuned_ci_high"])
                for label in labels
                if (run := row["runs"].get(label)) is not None
            ]
            groups.append((f"{row['dataset']}/{row['metric']}", bars, ""))
        plot_groups(groups, temporary["compare.png"], "runs vs their common base")
