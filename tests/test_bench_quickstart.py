"""scripts/bench_quickstart.py: its figures are pasted into the README, so it must report what the run wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # both scripts train the model in a child process

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quickstart_reports_the_runs_own_figures(make_recipe: Any, tmp_path: Path) -> None:
    recipe = make_recipe(
        train={"max_steps": 2},
        eval={"generation": {"max_new_tokens": 4}, "gates": {"exact_match": {"min_value": 0.99}}},
    )
    keep = tmp_path / "kept"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_quickstart.py"), "--recipe", str(recipe), "--cores", "1",
         "--keep", str(keep)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # the gate fails and there is no significant gain
    out = done.stdout
    assert out.startswith("machine: ") and "pinned to 1 of" in out
    report = json.loads((keep / recipe.stem / "report.json").read_text())
    train = json.loads((keep / recipe.stem / "train_metrics.json").read_text())
    assert f"training {train['train_runtime_s']:.1f} s for 2 steps" in out
    assert f"evaluation {report['timing']['total_s']:.1f} s; exit code 3" in out
    for result in report["results"]:
        assert f"| {result['dataset']}/{result['metric']} " in out
        assert f"| {result['base']:.3f} | {result['tuned']:.3f} |" in out
    assert "gate exact_match min_value 0.99: " in out and "-> FAIL" in out
    assert out.rstrip().endswith("gates FAILED")


def test_diagnose_quickstart_trains_and_probes_the_shipped_base(tmp_path: Path) -> None:
    """The script behind the quickstart diagnosis table runs (2 steps here) and probes every department."""
    script = str(ROOT / "scripts" / "diagnose_quickstart.py")
    written = subprocess.run(
        [sys.executable, script, "--write-data", str(tmp_path / "d"), "--familiar"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert written.returncode == 0, written.stderr
    train = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 445 and all("Legal" not in m["content"] for row in train for m in row["messages"])
    done = subprocess.run(
        [sys.executable, script, "--mode", "lora", "--lr", "4e-3", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    probes = [line.strip() for line in done.stdout.splitlines() if line.startswith("  ")]
    assert [line.split(":")[0] for line in probes] == ["Legal", "Sales", "Finance", "Support"]
    assert "step 0: loss " in done.stdout
    missing = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--mode and --lr are required" in missing.stderr
