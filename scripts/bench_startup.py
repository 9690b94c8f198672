"""Startup time of the command line: `sovtune --help` (target 0.5 s) and `sovtune check <recipe>` (target 10 s).

Each command runs several times in a fresh process; the median wall-clock time is reported with the range. When
`--help` misses its target, the slowest imports (`python -X importtime`) are listed: the usual cause is a heavy
library (torch, transformers) imported at module level where a command body should import it.

    python scripts/bench_startup.py                                 # recipes/quickstart.yaml, 7 + 3 runs
    python scripts/bench_startup.py --recipe recipes/other.yaml --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HELP_TARGET_S = 0.5
CHECK_TARGET_S = 10.0


def sovtune_command() -> list[str]:
    """The installed `sovtune` entry point next to this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("sovtune")
    found = str(beside) if beside.exists() else shutil.which("sovtune")
    if found is None:
        raise SystemExit("sovtune is not installed in this environment: pip install -e . first")
    return [found]


def time_runs(command: list[str], runs: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {' / '.join(tail)}")
    return times


def slowest_imports(command: list[str], env: dict[str, str], count: int = 8) -> list[str]:
    """Top-level imports by cumulative time, from `python -X importtime`."""
    script = command[0]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", script, "--help"], capture_output=True, text=True, env=env
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        if len(name) - len(name.lstrip()) == 1:  # nested imports are indented further
            rows.append((int(parts[1]), name.strip()))
    rows.sort(reverse=True)
    return [f"{micros / 1e6:.3f} s  {name}" for micros, name in rows[:count]]


def report(name: str, times: list[float], target: float) -> bool:
    median = statistics.median(times)
    verdict = "ok" if median <= target else "OVER TARGET"
    print(
        f"{name}: median {median:.3f} s over {len(times)} runs (min {min(times):.3f}, max {max(times):.3f}); "
        f"target <= {target:g} s: {verdict}"
    )
    return median <= target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=Path("recipes/quickstart.yaml"), help="recipe for sovtune check")
    parser.add_argument(
        "--runs", type=int, default=7, help="runs of sovtune --help (sovtune check runs half as many, at least 3)"
    )
    args = parser.parse_args()
    if not args.recipe.is_file():
        raise SystemExit(f"{args.recipe}: recipe not found; pass --recipe with an existing recipe file")
    command = sovtune_command()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    time_runs(command + ["--help"], 1, env)  # warm the file cache and bytecode first; not counted
    help_ok = report("sovtune --help", time_runs(command + ["--help"], args.runs, env), HELP_TARGET_S)
    if not help_ok:
        print("slowest imports of sovtune --help (cumulative):")
        for line in slowest_imports(command, env):
            print(f"  {line}")
    check_runs = max(3, args.runs // 2)
    time_runs(command + ["check", str(args.recipe)], 1, env)
    check_ok = report(
        f"sovtune check {args.recipe}",
        time_runs(command + ["check", str(args.recipe)], check_runs, env),
        CHECK_TARGET_S,
    )
    sys.exit(0 if help_ok and check_ok else 1)


if __name__ == "__main__":
    main()
