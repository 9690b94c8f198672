"""Issue 14, the trust boundary: nothing deleted that is not sovtune's run, nothing leaked, every input bounded.

The one-line-and-exit-2 contract of each hostile input is in tests/bad_inputs/cases.yaml. Here each deletion rule is
proven on its own (the folder carries the run marker, so only the rule under test can stop the deletion), secrets are
searched for in every byte a real run writes, every numeric and path setting of the schema is tried with hostile
values, and the readers' memory is measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from helpers import invoke, make_run, qa_rows, write_jsonl, write_recipe
from sovtune.cli import app
from sovtune.config import Recipe, load_recipe
from sovtune.core.rundir import RunDir
from sovtune.core.tensorfiles import WeightFileError, check_safetensors
from sovtune.data import read_rows
from sovtune.errors import RecipeError


def error_line(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return " ".join(errors[0].split())


def marked_run(folder: Path) -> Path:
    """A folder that looks like a sovtune run (it carries the marker) and holds a file that must survive."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RunDir.MARKER).write_text("a run directory written by sovtune\n")
    (folder / "keep.txt").write_text("still here")
    return folder


def still_there(folder: Path) -> bool:
    return (folder / "keep.txt").read_text() == "still here" and (folder / RunDir.MARKER).is_file()


# ---------------------------------------------------------------------------------------------------------------
# --overwrite: one test per rule


def test_overwrite_refuses_a_run_folder_that_holds_the_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = marked_run(tmp_path / "shared")
    data = write_jsonl(folder / "train.jsonl", qa_rows())
    recipe = write_recipe(tmp_path, tiny_model_dir, "r", data={"train": str(data)}, output={"dir": str(folder)})
    line = error_line(invoke("train", recipe, "--overwrite"))
    assert f"{folder}: --overwrite refused, nothing was deleted: it holds data.train[0] ({data})" in line
    assert still_there(folder) and data.is_file()


def test_overwrite_refuses_a_run_folder_that_holds_the_recipe(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = marked_run(tmp_path / "project")
    recipe = write_recipe(folder, tiny_model_dir, "r", output={"dir": str(folder)})
    line = error_line(invoke("train", recipe, "--overwrite"))
    assert f"{folder}: --overwrite refused, nothing was deleted: it holds the recipe ({recipe})" in line
    assert still_there(folder)


def test_overwrite_refuses_the_working_directory(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "r", output={"dir": "."})
    folder = marked_run(tmp_path / "work")
    monkeypatch.chdir(folder)
    assert "it is the working directory" in error_line(invoke("train", recipe, "--overwrite"))
    assert still_there(folder)


def test_overwrite_refuses_a_folder_holding_the_working_directory(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "r", output={"dir": ".."})
    folder = marked_run(tmp_path / "parent")
    (folder / "child").mkdir()
    monkeypatch.chdir(folder / "child")
    assert "it holds the working directory" in error_line(invoke("train", recipe, "--overwrite"))
    assert still_there(folder)


def test_overwrite_refuses_the_home_folder(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = marked_run(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    recipe = write_recipe(tmp_path, tiny_model_dir, "r", output={"dir": "~"})
    line = error_line(invoke("train", recipe, "--overwrite"))
    assert f"{home}: --overwrite refused, nothing was deleted: it is your home folder" in line
    assert still_there(home)


def test_overwrite_refuses_a_symbolic_link_to_a_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    target = marked_run(tmp_path / "real-run")
    link = tmp_path / "link"
    link.symlink_to(target)
    recipe = write_recipe(tmp_path, tiny_model_dir, "r", output={"dir": str(link)})
    assert "output.dir is a symbolic link" in error_line(invoke("train", recipe, "--overwrite"))
    assert still_there(target) and link.is_symlink()


def test_overwrite_refuses_the_file_system_root(tmp_path: Path, tiny_model_dir: Path) -> None:
    from sovtune.core.files import deletion_hazard

    assert deletion_hazard(Path("/")) == "it is the file-system root"
    recipe = write_recipe(tmp_path, tiny_model_dir, "r", output={"dir": "/"})
    assert "/: --overwrite refused, nothing was deleted: it is the file-system root" in error_line(
        invoke("train", recipe, "--overwrite")
    )


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ({"data": {"train": "missing.jsonl"}}, "data file not found"),
        ({"data": {"chat_template": "{% for m in messages %}{{ m }"}}, "not a valid Jinja template"),
        ({"train": {"seed": -1}}, "train.seed"),
        ("weights", "not a valid safetensors file"),
    ],
    ids=["data", "template", "recipe", "weights"],
)
def test_overwrite_keeps_the_old_run_when_an_input_is_bad(
    tmp_path: Path, tiny_model_dir: Path, damage: Any, expected: str
) -> None:
    """The old run is replaced only once recipe, data and model were read and checked."""
    model = tiny_model_dir
    if damage == "weights":
        model = tmp_path / "model"
        os.makedirs(model)
        for path in tiny_model_dir.iterdir():
            (model / path.name).write_bytes(path.read_bytes())
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        damage = {}
    old = marked_run(tmp_path / "runs" / "old")
    recipe = write_recipe(tmp_path, model, "r", output={"dir": str(old)}, **damage)
    assert expected in error_line(invoke("train", recipe, "--overwrite"))
    assert still_there(old) and sorted(p.name for p in old.iterdir()) == [RunDir.MARKER, "keep.txt"]
    assert not list(old.parent.glob(".old.*"))  # nothing renamed aside either


@pytest.mark.slow
def test_overwrite_replaces_a_run_it_wrote(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "r", train={"max_steps": 2, "save_steps": 2})
    run_dir = tmp_path / "runs" / "r"
    assert invoke("train", recipe).exit_code == 0
    assert (run_dir / RunDir.MARKER).is_file()
    (run_dir / "stale.txt").write_text("from before")
    result = invoke("train", recipe, "--overwrite", "--set", "train.seed=7")
    assert result.exit_code == 0, result.output
    assert not (run_dir / "stale.txt").exists() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / RunDir.MARKER).is_file() and not list(run_dir.parent.glob(".r.*"))
    assert load_recipe(run_dir / RunDir.RECIPE).train.seed == 7


# ---------------------------------------------------------------------------------------------------------------
# The other commands that replace folders or files: merge OUT, pull --out, export's bundle


@pytest.fixture(scope="module")
def built_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("built-run")
    return make_run(write_recipe(folder, tiny_model_dir, "built")).run_dir


def test_merge_replaces_only_an_earlier_merge(built_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert invoke("merge", built_run, out).exit_code == 0
    (out / "stale.txt").write_text("from the first merge")
    again = invoke("merge", built_run, out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    user = marked_run(tmp_path / "user")  # a run marker does not make a folder a merged model
    line = error_line(invoke("merge", built_run, user, "--overwrite"))
    assert "OUT refused, nothing was deleted: it is not a model written by sovtune merge" in line
    assert still_there(user)


def test_merge_refuses_the_working_directory_as_out(
    built_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "empty-work"
    work.mkdir()
    monkeypatch.chdir(work)  # empty: without the rule it would be swapped out for the merged model
    assert "OUT refused, nothing was deleted: it is the working directory" in error_line(
        invoke("merge", built_run, ".", "--overwrite")
    )
    assert work.is_dir() and Path.cwd() == work


def test_pull_refuses_a_link_or_the_working_directory_as_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before any connection (the endpoint does not exist)."""
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    endpoint = ["--endpoint", "http://127.0.0.1:9"]
    assert "--out refused: it is a symbolic link" in error_line(invoke("pull", "org/adapter", "--out", link, *endpoint))
    work = tmp_path / "empty-work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert "--out refused: it is the working directory" in error_line(
        invoke("pull", "org/adapter", "--out", ".", *endpoint)
    )
    assert link.is_symlink() and work.is_dir()


def test_export_replaces_only_an_earlier_bundle(built_run: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "run.tar"
    assert invoke("export", built_run, bundle).exit_code == 0
    first = bundle.read_bytes()
    assert invoke("export", built_run, bundle).exit_code == 0 and bundle.read_bytes() == first
    notes = tmp_path / "notes.tar"
    notes.write_text("my notes, not a bundle")
    assert "exists and is not a bundle from `sovtune export`" in error_line(invoke("export", built_run, notes))
    assert notes.read_text() == "my notes, not a bundle"


def test_a_received_runs_audit_log_setting_decides_nothing(
    built_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run folder is data: the sovereignty.audit_log its recipe names (here a file of the user's outside the run)
    never receives a line from commands run on that folder; their events go to the user's own log."""
    import shutil

    received = tmp_path / "received"
    shutil.copytree(built_run, received)
    victim = tmp_path / "outside" / "victim.jsonl"
    victim.parent.mkdir()
    victim.write_text("the user's own file\n")
    recorded = yaml.safe_load((received / RunDir.RECIPE).read_text())
    recorded.setdefault("sovereignty", {})["audit_log"] = str(victim)
    (received / RunDir.RECIPE).write_text(yaml.safe_dump(recorded))
    own_log = tmp_path / "own-audit.jsonl"
    monkeypatch.setenv("SOVTUNE_AUDIT_LOG", str(own_log))
    invoke("verify", received)  # the changed recipe fails verification: still an event
    invoke("export", received, tmp_path / "received.tar")
    invoke("merge", received, tmp_path / "merged", "--no-verify")
    evaluated = invoke("eval", received, "--no-verify")
    assert evaluated.exit_code == 0, evaluated.output
    assert victim.read_text() == "the user's own file\n"
    events = [json.loads(line) for line in own_log.read_text().splitlines()]
    assert [event["event"] for event in events] == ["verify", "export", "merge", "eval"]
    assert all(event["recipe_sha256"] for event in events)  # the run's recipe was read, for the record only


def test_generate_stops_a_saved_chat_template_that_does_not_end(built_run: Path, tmp_path: Path) -> None:
    """The time budget covers rendering prompts for generate/chat too, not only training rows: a run whose saved
    tokenizer carries a template with nested 100,000-step loops stops with one line naming the budget."""
    import shutil
    import time

    received = Path(shutil.copytree(built_run, tmp_path / "received"))
    endless = (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
    )
    (received / "adapter" / "chat_template.jinja").write_text(endless)
    recorded = yaml.safe_load((received / RunDir.RECIPE).read_text())
    recorded["data"]["chat_template_timeout_s"] = 1
    (received / RunDir.RECIPE).write_text(yaml.safe_dump(recorded))
    started = time.monotonic()
    line = error_line(invoke("generate", received, "--prompt", "hi", "--no-verify"))
    assert "took longer than data.chat_template_timeout_s=1 s" in line and "raise data.chat_template_timeout_s" in line
    assert time.monotonic() - started < 60  # loading the tiny model and one budget, not 10^10 loop steps


# ---------------------------------------------------------------------------------------------------------------
# Secrets


SECRET = "hf_" + "Q7d" * 12  # looks like a Hugging Face token
PASSWORD = "correct-horse-battery-staple-42"


@pytest.mark.parametrize(
    "field",
    ["name", "output.dir", "data.train", "description", "model.name_or_path", "sovereignty.audit_log", "hub.repo"],
)
def test_a_secret_in_any_recipe_value_is_refused_without_showing_it(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, field: str
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    recipe = write_recipe(tmp_path, tiny_model_dir, "r")
    for value in ("x-${HF_TOKEN}", f"x-{SECRET}"):  # interpolated, or typed in (a shell expanded it)
        with pytest.raises(RecipeError) as info:
            load_recipe(recipe, [f"{field}={value}"])
        assert field in str(info.value) and "HF_TOKEN" in str(info.value) and SECRET not in str(info.value)
    result = invoke("check", recipe, "--set", f"{field}=${{HF_TOKEN}}")
    assert "is a secret" in error_line(result) and SECRET not in result.output


def test_a_secret_in_extends_is_refused(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    recipe = write_recipe(tmp_path, tiny_model_dir, "r")
    child = tmp_path / "child.yaml"
    child.write_text("extends: ${HF_TOKEN}.yaml\n")
    with pytest.raises(RecipeError, match="extends: names a secret environment variable") as info:
        load_recipe(child)
    assert SECRET not in str(info.value) and recipe.is_file()


@pytest.mark.slow
def test_no_secret_reaches_any_byte_a_run_writes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`sovtune run` (train, evaluate, report) in its own process with credentials in the environment, in the data
    and in a rejected first attempt: stdout, stderr, the run directory (TensorBoard, checkpoints, report, manifest),
    the audit log and every other file written are searched for the values."""
    rows = qa_rows(30)
    for row in rows[::3]:  # users pasted credentials into questions, in training and held-out rows
        row["messages"][0]["content"] += f" My token is {SECRET}, my password {PASSWORD}."
    data = write_jsonl(tmp_path / "data.jsonl", rows[:24])
    held_out = write_jsonl(tmp_path / "heldout.jsonl", rows[24:])
    recipe = write_recipe(
        tmp_path,
        tiny_model_dir,
        "secrets",
        data={"train": str(data), "eval": str(held_out), "max_length": 200},  # whole prompts, credentials included
        train={"max_steps": 2, "save_steps": 1, "eval_steps": 1},
        eval={"datasets": [{"name": "qa", "metrics": ["loss", "exact_match"]}], "samples": 6},
        sovereignty={"audit_log": str(tmp_path / "audit.jsonl")},
    )
    settings = yaml.safe_load(recipe.read_text())
    del settings["data"]["eval_fraction"]  # the held-out file instead
    recipe.write_text(yaml.safe_dump(settings))
    env = {
        **os.environ,
        "HF_TOKEN": SECRET,
        "DB_PASSWORD": PASSWORD,
        "OMP_NUM_THREADS": "1",
        "SOVTUNE_AUDIT_LOG": str(tmp_path / "audit-env.jsonl"),
    }
    command = [sys.executable, "-m", "sovtune"]
    refused = subprocess.run(
        [*command, "run", str(recipe), "--set", "output.dir=runs/${HF_TOKEN}"],
        cwd=tmp_path, env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    assert refused.returncode == 2 and b"is a secret" in refused.stderr
    done = subprocess.run([*command, "run", str(recipe)], cwd=tmp_path, env=env, capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    run_dir = tmp_path / "runs" / "secrets"
    assert list((run_dir / "logs").rglob("events.out.tfevents*"))
    assert b"[REDACTED:HF_TOKEN]" in (run_dir / RunDir.PREDICTIONS).read_bytes()  # the held-out prompts, redacted
    written = [path for path in tmp_path.rglob("*") if path.is_file() and path not in (data, held_out)]
    assert len(written) > 20 and (tmp_path / "audit.jsonl").is_file()
    for value in (SECRET, PASSWORD):
        needle = value.encode()
        assert needle not in refused.stdout + refused.stderr + done.stdout + done.stderr
        leaked = [str(path) for path in written if needle in path.read_bytes() or value in str(path)]
        assert leaked == [], f"{value} written to {leaked}"


# ---------------------------------------------------------------------------------------------------------------
# Every numeric and every path setting of the schema


def _numeric_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, field) of every int or float setting, descending into sections, list items and dict values."""
    found = []
    for name, field in model.model_fields.items():
        if name == "source_path":
            continue
        annotation = field.annotation
        args = getattr(annotation, "__args__", ()) or ()
        inner = [a for a in (annotation, *args, *[x for a in args for x in getattr(a, "__args__", ())]) if a]
        if any(a in (int, float) for a in inner):
            found.append((prefix + (name,), field))
        for candidate in inner:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found.extend(_numeric_fields(candidate, prefix + (name,)))
    return found


def _hostile_recipe(tmp_path: Path, model: Path, path: tuple[str, ...], value: Any) -> Path:
    """A valid recipe with `value` at `path`; list settings (data.train, eval.datasets, user_metrics) and mappings
    (eval.gates) get one entry to hold it."""
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows(8))
    items = {
        "train": {"path": str(data)},
        "datasets": {"name": "qa"},
        "user_metrics": {"name": "mine", "module": "mine.py", "function": "score"},
    }
    recipe: dict[str, Any] = {"model": {"name_or_path": str(model)}, "data": {"train": [{"path": str(data)}]}}
    node = recipe
    for depth, part in enumerate(path[:-1]):
        if part in items and (part != "train" or depth == 1):
            if not isinstance(node.get(part), list):
                node[part] = [dict(items[part])]
            node = node[part][0]
        elif part == "gates":
            node = node.setdefault("gates", {}).setdefault("loss", {})
        elif part in ("general", "source") or (part == "eval" and depth == 1):
            node = node.setdefault(part, {"path": str(data)})
        else:
            node = node.setdefault(part, {})
    node[path[-1]] = value
    file = tmp_path / "hostile.yaml"
    file.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return file


NUMERIC_FIELDS = _numeric_fields(Recipe)


def test_the_schema_has_the_numeric_fields_the_issue_names() -> None:
    names = {".".join(path) for path, _ in NUMERIC_FIELDS}
    assert {"train.seed", "adapter.alpha", "train.learning_rate", "train.weight_decay", "train.batch_size",
            "eval.generation.max_new_tokens", "data.max_length", "eval.gates.min_gain"} <= names  # fmt: skip
    assert len(NUMERIC_FIELDS) > 35


@pytest.mark.parametrize(("path", "field"), NUMERIC_FIELDS, ids=[".".join(p) for p, _ in NUMERIC_FIELDS])
def test_every_numeric_setting_is_finite_and_bounded(
    tmp_path: Path, tiny_model_dir: Path, path: tuple[str, ...], field: Any
) -> None:
    """Infinity, NaN and absurd magnitudes are refused at load time with a line naming the field; every integer
    setting has both bounds (the gate thresholds are signed floats: finite is their bound)."""
    whole = int in (field.annotation, *getattr(field.annotation, "__args__", ()))
    bounds = {name for item in field.metadata for name in ("gt", "ge", "lt", "le") if hasattr(item, name)}
    if whole or path[-2:] != ("gates", path[-1]):
        assert bounds & {"gt", "ge"} and bounds & {"lt", "le"}, f"{'.'.join(path)} has no range: {field.metadata}"
    hostile = [float("inf"), float("-inf"), float("nan"), 10**30, -(10**30)] + ([2**70, -1] if "seed" in path else [])
    if path[-1] in ("min_gain", "max_increase", "min_value", "max_value"):
        hostile = hostile[:3]  # any finite threshold is a (possibly silly) rule
    for value in hostile:
        with pytest.raises(RecipeError) as info:
            load_recipe(_hostile_recipe(tmp_path, tiny_model_dir, path, value))
        assert path[-1] in str(info.value), (value, str(info.value))


def _checks_paths(annotation: Any, metadata: list[Any]) -> bool:
    """Whether a field is a PathText (possibly optional): its validator is config.validators.check_path_text."""
    from sovtune.config.validators import check_optional_path_text, check_path_text

    found = [*metadata, *(m for arg in get_args(annotation) for m in getattr(arg, "__metadata__", ()))]
    return any(getattr(item, "func", None) in (check_path_text, check_optional_path_text) for item in found)


def _path_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, field in model.model_fields.items():
        if name == "source_path":
            continue
        if _checks_paths(field.annotation, field.metadata):
            found.append(prefix + (name,))
        args = get_args(field.annotation)
        for candidate in (field.annotation, *args, *[x for a in args for x in get_args(a)]):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found.extend(_path_fields(candidate, prefix + (name,)))
    return found


def test_every_path_setting_refuses_what_no_file_system_takes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A NUL, a 300-byte name or a 5,000-byte path made os.stat raise inside the first stage that looked."""
    fields = sorted(set(_path_fields(Recipe))) + [("data", "chat_template")]  # a path unless it is inline Jinja
    assert {"model.name_or_path", "data.train.path", "output.dir", "sovereignty.audit_log", "eval.general.path",
            "eval.datasets.database", "eval.datasets.user_metrics.module"} <= {".".join(p) for p in fields}  # fmt: skip
    for field in fields:
        for value, reason in (("a\0b", "NUL"), ("x" * 300, "longer than 255"), ("a/" * 2100, "longer than 4096")):
            with pytest.raises(RecipeError) as info:
                load_recipe(_hostile_recipe(tmp_path, tiny_model_dir, field, value))
            assert reason in str(info.value), (field, str(info.value))


# ---------------------------------------------------------------------------------------------------------------
# Readers: memory and shapes


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc (Linux)")
def test_a_50_mb_line_costs_at_most_the_row_limit_in_memory(tmp_path: Path) -> None:
    """Measured in a child process: the peak resident memory while reading a JSONL file with one 50 MB line grows
    by less than 200 MB (reading it whole took 21 GB), and the line is one malformed row."""
    path = tmp_path / "big.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(good + "\n" + '{"messages": [{"role": "user", "content": "' + "x" * 50_000_000 + '"}]}\n' + good)
    # The peak is read from /proc (VmHWM): ru_maxrss would count the pytest process the child was forked from.
    script = textwrap.dedent(
        f"""
        import json, re
        from pathlib import Path
        import psutil
        from sovtune.config import DataSource
        from sovtune.data import read_rows
        def peak():
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
        before = psutil.Process().memory_info().rss
        rows = read_rows(DataSource(path={str(path)!r}), "messages", Path("."))
        print(json.dumps({{"growth": peak() - before, "rows": [[r.origin, r.values.get("__error__")] for r in rows]}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["growth"] < 200 * 2**20, report["growth"]
    assert [origin for origin, _ in report["rows"]] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert [error is not None and "longer than data.max_row_bytes" in error for _, error in report["rows"]] == [
        False, True, False,
    ]  # fmt: skip


def test_a_csv_field_over_128_kib_is_read(tmp_path: Path) -> None:
    """The csv module's own field limit (128 KiB) made this a traceback; such a field is below the row limit."""
    path = tmp_path / "long.csv"
    path.write_text('prompt,completion\n"' + "p" * 200_000 + '",done\nshort,row\n', encoding="utf-8")
    from sovtune.config import DataSource

    rows = read_rows(DataSource(path=str(path)), "prompt_completion", tmp_path)
    assert [len(row.values["prompt"]) for row in rows] == [200_000, 5]
    assert [row.origin for row in rows] == [f"{path}:2", f"{path}:3"]


def test_rows_read_whole_are_limited_too(tmp_path: Path) -> None:
    """JSON lists, parquet and text files are parsed whole; a row above the limit is still a malformed row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sovtune.config import DataSource

    big = {"prompt": "p" * 5000, "completion": "c"}
    small = {"prompt": "p", "completion": "c"}
    (tmp_path / "rows.json").write_text(json.dumps([small, big]), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([small, big]), tmp_path / "rows.parquet")
    (tmp_path / "doc.txt").write_text("t" * 5000, encoding="utf-8")
    for name, data_format in (("rows.json", "prompt_completion"), ("rows.parquet", "prompt_completion")):
        rows = read_rows(DataSource(path=name), data_format, tmp_path, max_row_bytes=2048)
        assert ["__error__" in row.values for row in rows] == [False, True], name
    (doc,) = read_rows(DataSource(path="doc.txt"), "text", tmp_path, max_row_bytes=2048)
    assert doc.values["__error__"].startswith("row of 5,000 bytes longer than data.max_row_bytes=2,048")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda b, n: (2**60).to_bytes(8, "little") + b[8:], "above the format's limit"),
        (lambda b, n: b[: len(b) // 2], "past the"),
        (lambda b, n: b[:5], "shorter than the 8-byte header length"),
        (lambda b, n: (4).to_bytes(8, "little") + b"[1] " + b[8 + n :], "not an object"),
        (lambda b, n: (8).to_bytes(8, "little") + b"\xff\xfe{}    " + b[8 + n :], "not JSON"),
        (lambda b, n: b + b"\0" * 16, "take"),
    ],
    ids=["header-2^60", "truncated", "shorter-than-8", "header-a-list", "header-not-utf8", "trailing-bytes"],
)
def test_safetensors_headers_are_checked_before_loading(
    tmp_path: Path, tiny_model_dir: Path, damage: Any, problem: str
) -> None:
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    check_safetensors(tiny_model_dir / "model.safetensors")  # the real file passes
    path = tmp_path / "model.safetensors"
    path.write_bytes(damage(weights, int.from_bytes(weights[:8], "little")))
    with pytest.raises(WeightFileError, match=problem) as info:
        check_safetensors(path)
    assert str(info.value).startswith(f"{path}: not a valid safetensors file")


@pytest.mark.parametrize("same_size", [False, True], ids=["other-size", "same-size"])
def test_a_model_file_damaged_after_a_passing_check_is_checked_again(
    tmp_path: Path, tiny_model_dir: Path, same_size: bool
) -> None:
    """The JSON checks of a model folder are remembered only while each file is unchanged: damage written after a
    passing check (even of the same size, within the same second) is refused the next time."""
    import shutil

    from sovtune.model import ModelError, check_model_files

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    check_model_files(folder)
    check_model_files(folder)  # remembered: passes again
    config = folder / "config.json"
    size = config.stat().st_size
    damaged = b"[" + b" " * (size - 2) + b"]" if same_size else b"[1, 2]"
    config.write_bytes(damaged)
    assert (config.stat().st_size == size) is same_size
    with pytest.raises(ModelError, match="config.json: a JSON list, not an object"):
        check_model_files(folder)
    with pytest.raises(ModelError, match="a JSON list"):  # a failed check is not remembered as passed
        check_model_files(folder)


# ---------------------------------------------------------------------------------------------------------------
# Empty answers


def test_check_warns_when_many_answers_are_empty(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = qa_rows(24)
    for row in rows[::3]:
        row["messages"][1]["content"] = " "
    recipe = write_recipe(tmp_path, tiny_model_dir, "r", rows=rows)
    result = invoke("check", recipe, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    finding = next(item for item in report["checks"] if item["check"] == "empty answers")
    assert finding["ok"] is False and finding["fatal"] is False
    assert "have an empty answer: they train only the end-of-turn token" in finding["detail"]
    assert (
        report["data"]["train"]["empty_targets"]
        == sum(not row["messages"][1]["content"].strip() for row in rows) - report["data"]["eval"]["empty_targets"]
    )


# ---------------------------------------------------------------------------------------------------------------
# Path arguments of every command

LONG = "r" * 300  # a name longer than any file system takes: os.stat raises instead of answering "no such file"
PATH_INVOCATIONS = {
    "check": ["check", LONG],
    "train": ["train", LONG],
    "run": ["run", LONG],
    "doctor": ["doctor", "--runs", LONG],
    "init": ["init", LONG],
    "generate": ["generate", LONG, "--prompt", "hi"],
    "chat": ["chat", LONG],
    "eval": ["eval", ".", "--adapter", LONG],
    "compare": ["compare", ".", ".", "--out", LONG],
    "push": ["push", LONG, "--repo", "org/name"],
    "sign": ["sign", ".", "--key", LONG],
    "pull": ["pull", "org/name", "--out", LONG],
    "verify": ["verify", LONG],
    "export": ["export", ".", LONG],
    "merge": ["merge", ".", LONG],
    "plan": ["plan", LONG],
    "launch": ["launch", LONG, "--dry-run"],
}


def _mentions_path(annotation: Any) -> bool:
    return annotation is Path or any(_mentions_path(arg) for arg in get_args(annotation))


def test_every_command_with_a_path_argument_is_covered() -> None:
    import typing

    with_paths = set()
    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        if any(_mentions_path(hint) for name, hint in hints.items() if name != "return"):
            with_paths.add(command.name or command.callback.__name__)
    assert len(with_paths) > 10 and with_paths <= set(PATH_INVOCATIONS), with_paths - set(PATH_INVOCATIONS)


@pytest.mark.parametrize("command", sorted(PATH_INVOCATIONS))
def test_a_path_no_file_system_takes_is_one_line(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    line = error_line(invoke(*PATH_INVOCATIONS[command]))
    assert "has a name longer than 255 bytes" in line and "give a shorter path" in line
    assert list(tmp_path.iterdir()) == []


def test_every_command_that_writes_refuses_a_place_under_a_file(built_run: Path, tmp_path: Path) -> None:
    """An output path below a regular file cannot be created: one line before any work, not an OSError."""
    from test_report import run_with_report

    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    reported = [run_with_report(tmp_path, name, seed) for name, seed in (("a", 1), ("b", 2))]
    invocations = {
        "merge": ["merge", built_run, blocker / "merged"],
        "export": ["export", built_run, blocker / "run.tar"],
        "pull": ["pull", "org/name", "--out", blocker / "pulled", "--endpoint", "http://127.0.0.1:9"],
        "compare": ["compare", *reported, "--out", blocker / "compare"],
    }
    for command, args in invocations.items():
        line = error_line(invoke(*args))
        assert f"{blocker}" in line and "cannot write" in line and "choose a writable place" in line, (command, line)
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize(
    ("field", "value"), [("base", "0.5"), ("n", [3]), ("significant", None), ("relative_change", {"x": 1})]
)
def test_compare_refuses_a_report_with_wrong_field_types(tmp_path: Path, field: str, value: Any) -> None:
    """A report from elsewhere with the right kind but a list where a number belongs crashed `compare`."""
    from test_report import run_with_report

    runs = [run_with_report(tmp_path, name, seed) for name, seed in (("a", 1), ("b", 2))]
    report = json.loads((runs[1] / RunDir.REPORT).read_text())
    report["results"][0][field] = value
    (runs[1] / RunDir.REPORT).write_text(json.dumps(report))
    line = error_line(invoke("compare", *runs, "--out", tmp_path / "compare"))
    assert f"report.json: results[0].{field} is {type(value).__name__}, not what sovtune writes" in line
    assert not (tmp_path / "compare").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "RUN", "--prompt", "hi", "--max-new-tokens", "1000000000"],
        ["chat", "RUN", "--max-new-tokens", "1000000000"],
        ["plan", "RECIPE", "--gpus", "1000000000"],
        ["launch", "RECIPE", "--gpus", "1000000000", "--dry-run"],
    ],
)
def test_numeric_flags_are_bounded(args: list[str], tmp_path: Path) -> None:
    """A flag past the recipe's own bound (max_new_tokens) or a plausible job (1,024 processes) is a usage error
    before anything loads, not hours of generation or a process per 'GPU'."""
    args = [str(tmp_path) if arg in ("RUN", "RECIPE") else arg for arg in args]
    result = invoke(*args)
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "Input should be less than or equal to" in said, result.output
