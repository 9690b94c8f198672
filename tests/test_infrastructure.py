"""The test infrastructure stays one: test modules share tests/helpers.py (one invoke, one run_cli, one run-directory
factory) and never import conftest; every test that trains a model is marked slow, kept so by the guard registered
in conftest.py (a test whose body or fixtures reach `transformers.Trainer.train` without the mark fails)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType

import pytest

from helpers import TrainingGuard

TESTS = Path(__file__).resolve().parent

pytest_plugins = ["pytester"]

# Each "training" reaches the real, wrapped Trainer.train (directly, through a subclass as SFTTrainer does, or in a
# module fixture); a bare object cannot train, so the call stops at its first attribute and nothing runs.
INNER = """
import pytest
from transformers import Trainer


class SubclassedTrainer(Trainer):
    pass


def reach_trainer_train(trainer=Trainer):
    with pytest.raises(AttributeError):
        trainer.train(object())


@pytest.fixture(scope="module")
def trained_in_a_fixture():
    reach_trainer_train()


def test_trains_unmarked():
    reach_trainer_train()


def test_trains_through_a_module_fixture(trained_in_a_fixture):
    pass


@pytest.mark.slow
def test_trains_marked():
    reach_trainer_train(SubclassedTrainer)


def test_trains_through_a_subclass_unmarked():
    reach_trainer_train(SubclassedTrainer)


def test_trains_nothing():
    pass
"""


@pytest.fixture(scope="module")
def transformers_trainer() -> ModuleType:
    """Imported before pytester snapshots sys.modules (torch cannot be imported twice in one process)."""
    import transformers.trainer

    return transformers.trainer


def test_this_session_records_every_call_of_trainer_train(transformers_trainer: ModuleType) -> None:
    assert getattr(transformers_trainer.Trainer.train, "records_training", False)


def test_a_test_that_trains_without_the_slow_mark_fails(
    transformers_trainer: ModuleType, pytester: pytest.Pytester
) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    slow: trains a model\n")
    pytester.makepyfile(test_inner=INNER)
    reports = pytester.inline_run("-p", "no:cacheprovider", plugins=[TrainingGuard()]).getreports(
        "pytest_runtest_logreport"
    )
    passed = {report.nodeid.split("::")[1] for report in reports if report.when == "call" and report.passed}
    failed = {report.nodeid.split("::")[1]: report for report in reports if report.failed}
    # Every body passes; the three unmarked tests that trained fail at teardown, the marked and the idle one do not.
    assert passed == {
        "test_trains_unmarked",
        "test_trains_through_a_module_fixture",
        "test_trains_marked",
        "test_trains_through_a_subclass_unmarked",
        "test_trains_nothing",
    }
    assert set(failed) == {
        "test_trains_unmarked",
        "test_trains_through_a_module_fixture",
        "test_trains_through_a_subclass_unmarked",
    }
    assert all(report.when == "teardown" for report in failed.values())
    assert failed["test_trains_unmarked"].longreprtext == (
        "test_inner.py::test_trains_unmarked trains a model (transformers.Trainer.train was called) but is not marked "
        'slow: add @pytest.mark.slow so that `pytest -m "not slow"` stays fast'
    )


def test_test_modules_share_helpers_and_never_import_conftest() -> None:
    """One invoke (CliRunner), one run_cli (`python -m sovtune` in a child), one run-directory factory, in helpers."""
    found = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name in ("conftest.py", "helpers.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in ("conftest", "run_factory"):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
            if isinstance(node, ast.Import) and any(alias.name in ("conftest", "run_factory") for alias in node.names):
                found.append(f"{path.name}:{node.lineno}: import conftest/run_factory")
            if isinstance(node, ast.FunctionDef) and node.name in ("invoke", "run_cli", "child_env", "make_run"):
                found.append(f"{path.name}:{node.lineno}: a copy of helpers.{node.name}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "CliRunner":
                found.append(f"{path.name}:{node.lineno}: CliRunner() instead of helpers.invoke")
    assert found == [], "\n".join(found)
    assert not (TESTS / "run_factory.py").exists()
