"""What each `sovtune` command does: load the recipe or run directory, make one API call, render the result.

cli/__init__.py parses the command line and imports this module only when a command runs, so `sovtune --help`
never loads the stages (pydantic, numpy, torch, ...).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from sovtune import doctor as checks
from sovtune import pipeline, preflight
from sovtune import plan as planner
from sovtune.audit import audited
from sovtune.cli.render import LogToConsole, comparison, doctor_rows, memory_plan, preflight_report
from sovtune.cli.terminal import console, err_console
from sovtune.config import Recipe, RunOptIns, check_path_text, load_recipe, load_run_recipe
from sovtune.core.hashing import sha256_file
from sovtune.core.rundir import RunDir
from sovtune.core.runtime import is_main_process
from sovtune.errors import RecipeError, SovtuneError
from sovtune.evaluation import HeldOut, evaluate
from sovtune.generate import complete, load_run, render_prompt
from sovtune.launch import launch as run_launch
from sovtune.merge import merge as merge_adapter
from sovtune.offline import enable_for
from sovtune.offline import reason_for as offline_reason
from sovtune.offline import session as offline_session
from sovtune.publish.bundle import export as export_bundle
from sovtune.report import compare as compare_runs
from sovtune.run.verify import verify_before_loading
from sovtune.starter import StarterAnswers, starter_recipe, write_starter


class UnusablePath(SovtuneError):
    """A path on the command line that no file system takes."""


def usable_paths(paths: tuple[Path | str | None, ...]) -> None:
    """Path arguments are checked like recipe paths (NUL, names over 255 bytes, paths over 4096 bytes) before any
    command looks them up (os.stat raises on them)."""
    for path in paths:
        if path is None:
            continue
        try:
            check_path_text(str(path))
        except ValueError as exc:
            raise UnusablePath(f"{exc}; give a shorter path") from None


def log_to_console() -> None:
    """sovtune's log lines (stage progress, warnings, the report table) go to the console, once per process."""
    package_log = logging.getLogger("sovtune")
    package_log.setLevel(logging.INFO)
    if not any(isinstance(handler, LogToConsole) for handler in package_log.handlers):
        package_log.addHandler(LogToConsole(console, err_console))


def load(recipe: Path, overrides: list[str] | None, offline: bool = False) -> Recipe:
    return go_offline(load_recipe(recipe, overrides or []), offline)


def go_offline(loaded: Recipe, flag: bool) -> Recipe:
    """Install the network guard (flag or recipe) before the command does anything that could connect."""
    if flag or loaded.sovereignty.offline:
        enable_for(loaded)
    return loaded


def opt_ins(trust_remote_code: bool, allow_pickle_weights: bool, allow_user_metrics: bool = False) -> RunOptIns:
    """What the command line lets a run folder's recipe do (a run folder is data: by default, nothing)."""
    return RunOptIns(trust_remote_code, allow_pickle_weights, allow_user_metrics)


def run_recipe(run_dir: Path) -> Recipe | None:
    """The recipe a run saved, for the audit record (pipeline.recorded_recipe; never where the record goes, see
    `audited(recorded=True)`)."""
    return pipeline.recorded_recipe(run_dir)


def check(recipe: Path, overrides: list[str] | None, as_json: bool, offline: bool) -> None:
    with audited("check") as event:
        loaded = event["recipe"] = load(recipe, overrides, offline)
        report = preflight.check(loaded)
        if as_json:
            sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
        else:
            preflight_report(report, console)
        preflight.raise_on_failures(report)


def train(recipe: Path, overrides: list[str] | None, resume: bool, overwrite: bool, force: bool, offline: bool) -> None:
    loaded = load(recipe, overrides, offline)
    result = pipeline.train(loaded, resume=resume, overwrite=overwrite, force=force, overrides=overrides or [])
    if is_main_process():
        console.print(f"adapter written to [bold]{result.adapter_dir}[/]")


def run(recipe: Path, overrides: list[str] | None, resume: bool, overwrite: bool, force: bool, offline: bool) -> None:
    loaded = load(recipe, overrides, offline)  # each stage records its own audit event
    result = pipeline.run(loaded, resume=resume, overwrite=overwrite, force=force, overrides=overrides or [])
    console.print(f"run finished: [bold]{result.run_dir}[/]")


def doctor(run_root: Path, endpoint: str | None, offline: bool, allow_hosts: list[str]) -> bool:
    reason = offline_reason(offline)
    with offline_session(reason is not None, allow_hosts, reason):
        rows = checks.diagnose(run_root, endpoint)
    doctor_rows(rows, console)
    return checks.healthy(rows)


def init(path: Path, answers: dict[str, Any], overwrite: bool) -> None:
    if answers["general"] is not None and answers["no_general"]:
        raise RecipeError("--general and --no-general: give one of them")
    text = starter_recipe(path, StarterAnswers(**answers))
    write_starter(path, text, overwrite)
    general = yaml.safe_load(text)["eval"].get("general")
    check = f"the forgetting check uses {general['path']}" if general else "no forgetting check (--general adds one)"
    console.print(f"wrote [bold]{path}[/] ({check}); next: sovtune check {path}", highlight=False)


def generate(
    run_dir: Path, prompt: str, base: bool, max_new_tokens: int, opt_ins: RunOptIns, verify_first: bool
) -> None:
    loaded = load_run(run_dir, opt_ins=opt_ins, verify=verify_first)
    text = render_prompt(loaded, [{"role": "user", "content": prompt}])
    console.print(f"[bold]adapter:[/] {complete(loaded, text, max_new_tokens)}", highlight=False)
    if base:
        console.print(f"[bold]base:[/]    {complete(loaded, text, max_new_tokens, use_adapter=False)}", highlight=False)


def chat(run_dir: Path, base: bool, max_new_tokens: int, opt_ins: RunOptIns, verify_first: bool) -> None:
    loaded = load_run(run_dir, opt_ins=opt_ins, verify=verify_first)
    history: list[dict[str, str]] = []
    console.print("chat with the adapter; an empty line or Ctrl-D ends")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: console.input("[bold]you:[/] "), ""):
        line = line.strip()
        if not line:
            break
        history.append({"role": "user", "content": line})
        text = render_prompt(loaded, history)
        answer = complete(loaded, text, max_new_tokens)
        console.print(f"[bold]adapter:[/] {answer}", highlight=False)
        if base:
            console.print(
                f"[bold]base:[/]    {complete(loaded, text, max_new_tokens, use_adapter=False)}", highlight=False
            )
        history.append({"role": "assistant", "content": answer})


def evaluate_run(
    run_dir: Path,
    adapter: Path | None,
    base: str | None,
    recipe: Path | None,
    overrides: list[str] | None,
    out: Path | None,
    overwrite: bool,
    offline: bool,
    opt_ins: RunOptIns,
    verify_first: bool,
) -> None:
    target = out if out is not None else run_dir
    with audited("eval", destination=str(target), recorded=recipe is None) as event:
        extra = [f"model.name_or_path={base}"] if base is not None else []
        overrides = [*(overrides or []), *extra]
        loaded = load_run_recipe(run_dir, overrides, recipe, opt_ins=opt_ins, evaluates=True)
        if verify_first and adapter is None:  # the run's own adapter: it must match the run's manifest
            # A run written by `sovtune train` has one; an adapter saved by other tools, evaluated with --recipe, not.
            verify_before_loading(run_dir, manifest_required=recipe is None)
        loaded = event["recipe"] = go_offline(loaded, offline)
        # The held-out rows training recorded, unless the adapter is evaluated with another recipe.
        held_out = HeldOut.from_run(run_dir) if recipe is None else None
        evaluate(
            loaded,
            run_dir=run_dir,
            adapter_dir=adapter,
            held_out=held_out,
            out_dir=out,
            overwrite=overwrite,
            allow_pickle_adapter=opt_ins.allow_pickle_weights,
        )
    console.print(f"report written to [bold]{target / RunDir.REPORT_MD}[/]")


def compare(run_dirs: list[Path], out: Path) -> None:
    comparison(compare_runs(run_dirs, out), console)
    console.print(f"comparison written to [bold]{out / 'compare.md'}[/]")


def push(
    run_dir: Path,
    repo: str | None,
    endpoint: str | None,
    revision: str | None,
    public: bool | None,
    sign_key: Path | None,
    include_examples: bool | None,
    offline: bool,
    allow_hosts: list[str],
    use_run_hub: bool,
) -> None:
    pipeline.push(
        run_dir, repo, endpoint, revision, public, sign_key, include_examples, offline, allow_hosts,
        use_run_hub=use_run_hub,
    )  # fmt: skip


def pull(
    repo: str,
    revision: str | None,
    endpoint: str | None,
    out: Path | None,
    trust: Path | None,
    offline: bool,
    allow_hosts: list[str],
) -> None:
    result = pipeline.pull(repo, endpoint, revision, out, trust, offline, allow_hosts)
    console.print(f"verified in [bold]{result.out_dir}[/]: {result.signature}", highlight=False)


def sign(run_dir: Path, key: Path, repo: str | None, revision: str | None, include_examples: bool | None) -> None:
    pipeline.sign(run_dir, key, repo, revision, include_examples)


def verify(target: Path, strict: bool, trust: Path | None) -> None:
    with audited("verify", run_recipe(target), destination=str(target), recorded=True):
        result = pipeline.verify(target, strict=strict, trust=trust)
    console.print(result.describe(), highlight=False)


def export(run_dir: Path, bundle: Path) -> None:
    with audited("export", run_recipe(run_dir), destination=str(bundle), recorded=True) as event:
        written = export_bundle(run_dir, bundle)
        event["details"]["bundle_sha256"] = sha256_file(written)
    console.print(
        f"bundle written to [bold]{written}[/]; check it anywhere with: sovtune verify {written}", highlight=False
    )


def merge(
    run_dir: Path, out: Path, dtype: str, examples: int, overwrite: bool, opt_ins: RunOptIns, verify_first: bool
) -> None:
    with audited("merge", run_recipe(run_dir), destination=str(out), recorded=True) as event:
        result = merge_adapter(
            run_dir, out, dtype=dtype, examples=examples, overwrite=overwrite, opt_ins=opt_ins, verify=verify_first
        )
        event["details"]["check"] = result.report["check"]
    console.print(result.check.describe(), highlight=False)
    console.print(f"merged model written to [bold]{result.out_dir}[/]", highlight=False)


def plan(
    recipe: Path,
    overrides: list[str] | None,
    gpu: list[str] | None,
    gpus: int,
    strategy: str,
    arch: str | None,
    as_json: bool,
) -> None:
    result = planner.plan(load(recipe, overrides), gpu or (), gpus, planner.strategy_name(strategy), arch)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        memory_plan(result, console)


def launch(
    recipe: Path,
    overrides: list[str] | None,
    gpus: int,
    strategy: str,
    config_file: Path | None,
    resume: bool,
    overwrite: bool,
    dry_run: bool,
) -> None:
    loaded = load(recipe, overrides)  # bad recipes fail here, before any process starts
    run_launch(recipe, loaded, gpus, strategy, overrides or [], config_file, resume, overwrite, dry_run)
