"""Rich rendering of what the commands return (tables for reports, checks, plans) and of what the stages log.

The stages log through `logging` only; `LogToConsole` is the one place their lines reach the terminal.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from sovtune.doctor import Row
from sovtune.plan import Plan, gib_text
from sovtune.preflight import PreflightReport
from sovtune.report import (
    MetricResult,
    Report,
    arrow,
    difference_text,
    n_cell,
    number_text,
    paired_cell,
    run_cell,
    settings_cell,
)


class LogToConsole(logging.Handler):
    """sovtune's log records on the terminal: info lines as they are on stdout, warnings as `warning: ...` on stderr; a
    record carrying a report (`extra={"renderable": report}`) is drawn as its table. Errors are not logged: the CLI
    prints them."""

    def __init__(self, console: Console, err_console: Console) -> None:
        super().__init__(level=logging.INFO)
        self.console, self.err_console = console, err_console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            renderable = getattr(record, "renderable", None)
            if isinstance(renderable, Report):
                evaluation_report(renderable, self.console)
                return
            if record.levelno >= logging.WARNING:
                self.err_console.print(f"warning: {record.getMessage()}", markup=False, highlight=False, soft_wrap=True)
            else:
                self.console.print(record.getMessage(), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # a broken terminal must not take the run down with it
            self.handleError(record)


def evaluation_report(report: Report, console: Console) -> None:
    console.print(results_table(report.results, title=f"{report.run}: base vs tuned"))
    if report.results:  # below the table rather than as its caption, which rich wraps to the table's width
        console.print(results_legend(report.results), style="dim", highlight=False)
    for line in report.summary_lines():  # forgetting (or that there is no check), gains in form only, diversity
        console.print(line, markup=False, highlight=False)
    for gate in report.gates:
        mark = "[green]pass[/]" if gate.passed else "[bold red]FAIL[/]"
        console.print(f"gate {mark}: {gate.describe()}", highlight=False)


def results_legend(results: Sequence[MetricResult]) -> str:
    constant = any(result.constant is not None for result in results)
    return "↑/↓ higher/lower is better · n.s. = interval includes 0 · perplexity Δ relative" + (
        " · constant = the tuned model's most frequent answer given for every example · form only = better than "
        "the base, not than the constant"
        if constant
        else ""
    )


def results_table(results: Sequence[MetricResult], title: str) -> Table:
    """Compact enough for an 80-column terminal: dataset/metric in one column, Δ with its interval in another."""
    confidence = int(results[0].confidence * 100) if results else 95
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("dataset/metric", no_wrap=True)
    constant = any(result.constant is not None for result in results)
    for name in ("base", "tuned", *(["constant"] if constant else []), f"Δ [{confidence}% CI]", "verdict", "n"):
        table.add_column(name, justify="left" if name == "verdict" else "right", no_wrap=True)
    for result in results:
        delta, interval = difference_text(result)
        style = "green" if result.improved else ("red" if result.significant else "")
        style = "yellow" if result.gain_in_form_only else style
        verdict = "form only" if result.gain_in_form_only else (result.verdict if result.significant else "n.s.")
        baseline = [number_text(result.constant) if result.constant is not None else "–"] if constant else []
        table.add_row(
            f"{result.key} {arrow(result)}", number_text(result.base), number_text(result.tuned), *baseline,
            f"{delta} {interval}", verdict, str(result.n), style=style,
        )  # fmt: skip
    return table


def comparison(comparison: dict[str, Any], console: Console) -> None:
    labels = list(comparison["runs"])
    reference = comparison["reference"]
    for label in labels[1:]:
        pairs = [pair for pair in comparison["paired"] if pair["run"] == label]
        confidence = int((pairs[0]["confidence"] if pairs else 0.95) * 100)
        table = Table(
            title=f"{label} vs {reference}, paired on the examples both evaluated", title_justify="left",
            box=box.SIMPLE_HEAD, pad_edge=False,
        )  # fmt: skip
        for name in ("dataset/metric", "n", reference, label, f"Δ [{confidence}% CI]", "verdict"):
            table.add_column(name, justify="left" if name in ("dataset/metric", "verdict") else "right")
        for pair in pairs:
            better = pair["verdict"] == "better"
            table.add_row(
                f"{pair['dataset']}/{pair['metric']} {'↑' if pair['higher_is_better'] else '↓'}", str(pair["n"]),
                number_text(pair["reference_value"]), number_text(pair["run_value"]), paired_cell(pair),
                f"{label} {pair['verdict']}" if pair["significant"] else "n.s.",
                style="green" if better else ("red" if pair["significant"] else ""),
            )  # fmt: skip
        console.print(table)
    for item in comparison["settings"]:
        console.print(f"setting {item['setting']}: {settings_cell(item)}", markup=False, highlight=False)
    table = Table(title="tuned (Δ vs base [95% CI]), * = significant", title_justify="left")
    for name in ("dataset", "metric", "n", "base", *labels):
        table.add_column(name)
    for row in comparison["rows"]:
        arrow = "↑" if row["higher_is_better"] else "↓"
        table.add_row(
            row["dataset"],
            f"{row['metric']} {arrow}",
            n_cell(row, labels),
            number_text(row["base"]),
            *(run_cell(row, label) for label in labels),
        )
    console.print(table)


def preflight_report(report: PreflightReport, console: Console) -> None:
    for split in ("train", "eval"):
        stats = report.stats[split]
        table = Table(title=f"{report.recipe}: {split} data", show_header=False)
        pct = stats["token_length_percentiles"]
        rows = [
            ("rows read", f"{stats['rows']:,}"),
            ("rows kept", f"{stats['kept']:,}"),
            ("rows dropped", ", ".join(f"{n} {why}" for why, n in stats["dropped"].items()) or "0"),
            ("token length p50/p90/p99/max", f"{pct['p50']}/{pct['p90']}/{pct['p99']}/{pct['p100']}"),
            ("truncated", f"{stats['truncation_rate']:.1%}"),
            ("supervised-token share", f"{stats['supervised_token_fraction']:.1%}"),
            ("rows training a stop token", f"{stats['eos_supervised_fraction']:.1%}"),
        ]
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)
    sources = report.stats["train"].get("sources") or []
    if len(sources) > 1:
        console.print(mixture_table(sources, title=f"{report.recipe}: training mixture (one epoch)"))
    arch = report.architecture
    if "trainable_parameters" in arch:
        console.print(
            f"{arch['architecture']}: {arch['parameters']:,} parameters, adapter trains "
            f"{arch['trainable_parameters']:,} ({arch['trainable_share']:.2%})"
        )
    checks = Table(title="checks")
    checks.add_column("check")
    checks.add_column("result")
    checks.add_column("detail")
    for finding in report.findings:
        mark = "[green]ok[/]" if finding.ok else ("[red]FAIL[/]" if finding.fatal else "[yellow]warn[/]")
        checks.add_row(finding.check, mark, finding.detail)
    console.print(checks)


def mixture_table(sources: list[dict[str, Any]], title: str) -> Table:
    """Per training source: rows read, examples, how many an epoch takes, their share of examples and tokens."""
    table = Table(title=title, title_justify="left")
    for name in ("source", "format", "weight", "rows", "examples", "per epoch", "share", "tokens", "token share"):
        table.add_column(name, justify="left" if name in ("source", "format") else "right")
    for source in sources:
        weight = "-" if source["weight"] is None else f"{source['weight']:g}"
        examples = f"{source['examples']:,}" + (f" of {source['sampled_from']:,}" if source.get("sampled_from") else "")
        table.add_row(
            source["source"] + (" (general)" if source.get("general") else ""), source["format"], weight,
            f"{source['rows']:,}", examples, f"{source['per_epoch']:,} (x{source['repeats']:.2f})",
            f"{source['share']:.1%}", f"{source['tokens']:,}", f"{source['token_share']:.1%}",
        )  # fmt: skip
    return table


def memory_plan(result: Plan, console: Console) -> None:
    est, arch, s = result.estimate, result.estimate.architecture, result.estimate.settings
    console.print(
        f"[bold]{arch.name}[/] ({arch.source}): {arch.total_params / 1e9:.2f}B params, {arch.num_layers} layers; "
        f"{s.gpus} GPU(s), {s.strategy if s.gpus > 1 else 'single GPU'}; effective batch {s.effective_batch} "
        f"= {s.batch_size} x {s.gradient_accumulation} accumulation x {s.gpus} GPU(s)"
    )
    table = Table(title="Estimated peak memory per GPU")
    table.add_column("component")
    table.add_column("memory", justify="right")
    table.add_column("how")
    for c in est.components:
        table.add_row(c.name, gib_text(c.bytes), c.note)
    table.add_row("[bold]total[/]", f"[bold]{gib_text(est.total_bytes)}[/]", "")
    console.print(table)
    fits = Table(title="Fit")
    for column in ("GPU", "capacity", "fits", "headroom"):
        fits.add_column(column, justify="left" if column in ("GPU", "fits") else "right")
    for f in result.fits:
        fits.add_row(
            f.gpu.name,
            gib_text(f.gpu.memory_bytes),
            "[green]yes[/]" if f.fits else "[red]no[/]",
            gib_text(f.headroom_bytes),
        )
    console.print(fits)
    for f in result.fits:
        if f.fits:
            continue
        if f.min_gpus_fsdp:
            console.print(
                f"to fit on [bold]{f.gpu.name}[/] ({gib_text(f.total_after_changes or 0)} each): "
                "no recipe change is enough on one "
                f"GPU; shard over {f.min_gpus_fsdp}: sovtune launch RECIPE --gpus {f.min_gpus_fsdp} --strategy fsdp",
                highlight=False,
            )
        elif f.changes:
            console.print(f"to fit on [bold]{f.gpu.name}[/] ({gib_text(f.total_after_changes or 0)}):", highlight=False)
        else:
            console.print(
                f"{f.gpu.name}: does not fit even with every change and 64 GPUs; use bigger GPUs", highlight=False
            )
        for change in f.changes:
            how = " ".join(f"--set {o}" for o in change.overrides) or f"sovtune launch ... {change.launch}"
            console.print(f"  {how}   [dim]# {change.description}[/]", highlight=False)


def doctor_rows(rows: list[Row], console: Console) -> None:
    table = Table(title="sovtune doctor")
    for column in ("item", "value", "status", "fix"):
        table.add_column(column)
    colours = {"ok": "green", "warn": "yellow", "missing": "red"}
    for row in rows:
        table.add_row(row.item, row.value, f"[{colours[row.status]}]{row.status}[/]", row.fix)
    console.print(table)
