"""The quickstart, timed: `sovtune run <recipe>` from a fresh process, offline, with its headline results.

Target (issue "The quickstart"): on 2 CPU cores the whole run (load, train, evaluate base and adapter, report)
finishes within 3 minutes wall-clock, and the report shows a significant gain on the task metric (95% interval
above zero) plus the forgetting figure on general text. Each recipe runs once, pinned to `--cores` CPU cores
(Linux), into a temporary run directory that is deleted afterwards unless `--keep` is given. The figures printed
come from the run's own report.json and train_metrics.json; nothing here is estimated.

    python scripts/bench_quickstart.py                                   # recipes/quickstart.yaml on 2 cores
    python scripts/bench_quickstart.py --recipe recipes/quickstart.yaml --recipe recipes/quickstart-qlora.yaml
    python scripts/bench_quickstart.py --set data.train.1.weight=0.3     # a variant (the experiments' tables)

The load average before and after each run is printed with its wall-clock time: on a machine other work shares,
the time grows with the load while the report's figures (seeded) do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_startup import sovtune_command  # scripts/ is on sys.path when a script here runs

TARGET_S = 180.0


def pick_cores(count: int) -> set[int] | None:
    """The first `count` CPUs this process may use, or None where affinity cannot be set (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if count > len(allowed):
        raise SystemExit(f"--cores {count}: only {len(allowed)} CPUs are available to this process")
    return set(allowed[:count])


def describe_machine(cores: set[int] | None) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pinned = (
        f"pinned to {len(cores)} of {os.cpu_count()} CPUs"
        if cores is not None
        else f"{os.cpu_count()} CPUs (no pinning here)"
    )
    gpu = "no GPU used (CUDA_VISIBLE_DEVICES='')"
    return (
        f"{cpu}; {pinned}; {gpu}; {platform.platform()}; python {platform.python_version()}; torch {torch.__version__}"
    )


def load_average() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def run_once(recipe: Path, run_dir: Path, cores: set[int] | None, overrides: list[str]) -> tuple[float, int, str]:
    """`sovtune run` in a fresh process; wall-clock seconds, exit code, combined output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    settings = [argument for override in overrides for argument in ("--set", override)]
    command = sovtune_command() + ["run", str(recipe), *settings, "--set", f"output.dir={run_dir}"]
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores is not None else None
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=preexec)
    return time.perf_counter() - started, done.returncode, done.stdout + done.stderr


def signed(value: float, percent: bool) -> str:
    return f"{value:+.1%}" if percent else f"{value:+.3f}"


def result_rows(report: dict[str, Any]) -> list[str]:
    """The headline table in Markdown: base, adapter, difference with its 95% interval, per metric."""
    rows = ["| metric | base | adapter | difference [95% CI] | significant |", "|---|---|---|---|---|"]
    for result in report["results"]:
        relative = result.get("relative_change") is not None and result["metric"] == "perplexity"
        if relative:
            diff = (
                f"{signed(result['relative_change'], True)} [{signed(result['relative_ci_low'], True)}, "
                f"{signed(result['relative_ci_high'], True)}]"
            )
        else:
            diff = (
                f"{signed(result['difference'], False)} [{signed(result['ci_low'], False)}, "
                f"{signed(result['ci_high'], False)}]"
            )
        arrow = "↑" if result["higher_is_better"] else "↓"
        rows.append(
            f"| {result['dataset']}/{result['metric']} {arrow} | {result['base']:.3f} | {result['tuned']:.3f} | "
            f"{diff} | {'yes' if result['significant'] else 'no'} |"
        )
    return rows


def summarise(recipe: Path, wall_s: float, code: int, output: str, run_dir: Path) -> bool:
    """Print one recipe's figures; True when it met the time target with a significant task-metric gain."""
    print(f"\n## {recipe}\n")
    report_file = run_dir / "report.json"
    if not report_file.is_file():
        tail = "\n".join(output.strip().splitlines()[-15:])
        print(f"sovtune run exited {code} after {wall_s:.1f} s without a report:\n{tail}")
        return False
    report = json.loads(report_file.read_text())
    train = json.loads((run_dir / "train_metrics.json").read_text())
    print(
        f"wall-clock {wall_s:.1f} s (target <= {TARGET_S:.0f} s); training {train['train_runtime_s']:.1f} s for "
        f"{train['global_step']} steps; evaluation {report['timing']['total_s']:.1f} s; exit code {code}\n"
    )
    print("\n".join(result_rows(report)))
    forgetting = report.get("forgetting")
    if forgetting:
        print(
            f"\nforgetting (general-text perplexity, {forgetting['n']} texts): {forgetting['base']:.2f} -> "
            f"{forgetting['tuned']:.2f}, {signed(forgetting['relative_change'], True)} "
            f"[{signed(forgetting['ci_low'], True)}, {signed(forgetting['ci_high'], True)}]"
        )
    print()
    for gate in report["gates"]:
        value = f"{gate['value']:.3f}" if isinstance(gate["value"], float) else gate["value"]
        print(
            f"gate {gate['gate']} {gate['rule']} {gate['threshold']}: {value} -> {'pass' if gate['passed'] else 'FAIL'}"
        )
    task_gains = [r for r in report["results"] if r["higher_is_better"] and r["metric"] not in ("token_accuracy",)]
    significant = [f"{r['dataset']}/{r['metric']}" for r in task_gains if r["significant"] and r["ci_low"] > 0]
    on_time = wall_s <= TARGET_S
    print(
        f"\nquickstart {recipe.name}: {wall_s:.1f} s ({'within' if on_time else 'OVER'} the {TARGET_S:.0f} s target); "
        f"significant task-metric gains: {', '.join(significant) or 'NONE'}; "
        f"gates {'passed' if report['passed'] else 'FAILED'}"
    )
    return on_time and bool(significant) and code == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipe", type=Path, action="append", help="recipe to run (repeatable); default recipes/quickstart.yaml"
    )
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the run is pinned to (Linux); 0 = no pinning")
    parser.add_argument("--keep", type=Path, help="keep the run directories under this folder instead of deleting them")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="recipe override for every run (repeatable)"
    )
    args = parser.parse_args()
    recipes = args.recipe or [Path("recipes/quickstart.yaml")]
    for recipe in recipes:
        if not recipe.is_file():
            raise SystemExit(f"{recipe}: recipe not found; pass --recipe with an existing recipe file")
    cores = pick_cores(args.cores) if args.cores > 0 else None
    print(f"machine: {describe_machine(cores)}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as scratch:
        for recipe in recipes:
            parent = args.keep or Path(scratch)
            run_dir = parent / recipe.stem
            if run_dir.exists():
                raise SystemExit(f"{run_dir}: already exists; choose another --keep folder")
            before = load_average()
            wall_s, code, output = run_once(recipe, run_dir, cores, args.overrides)
            variant = " ".join(f"--set {override}" for override in args.overrides)
            print(f"\n{recipe} {variant}: load average (1/5/15 min) {before} before, {load_average()} after")
            ok = summarise(recipe, wall_s, code, output, run_dir) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
