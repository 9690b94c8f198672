"""Evidence a user can act on: the constant baseline of generation metrics, forgetting resampled by document, and a
report that is never replaced by accident (`sovtune eval --out` / `--overwrite`)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from helpers import CORPUS, invoke, make_run, qa_rows, write_jsonl
from sovtune import evaluation as ev
from sovtune import model as models
from sovtune import report as reports
from sovtune.config import load_recipe
from sovtune.core.rundir import RunDir
from sovtune.errors import RecipeError
from sovtune.metrics import Scores, chrf, paired_bootstrap, rouge_l


def error_line(result: Any) -> str:
    """The single `error: ...` line of a command refused as bad input (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return " ".join(lines[0].split())


def report_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in RunDir.REPORT_FILES if (folder / name).exists()}


def eval_stages(run_dir: Path) -> int:
    return sum(stage["stage"] == "eval" for stage in RunDir(run_dir).manifest()["stages"])


# ---------------------------------------------------------------------------------------------------------------
# Requirement 6: `sovtune eval --out DIR`; an existing report is replaced only with --overwrite


def test_eval_keeps_an_existing_report_unless_out_or_overwrite(make_recipe: Any, tmp_path: Path) -> None:
    recipe = make_run(make_recipe(eval={"generation": {"max_new_tokens": 4}, "bootstrap": {"resamples": 1000}}))
    run_dir = recipe.run_dir
    assert invoke("eval", run_dir).exit_code == 0
    first, stages = report_files(run_dir), eval_stages(run_dir)
    assert sorted(first) == sorted(RunDir.REPORT_FILES) and stages == 1

    refused = error_line(invoke("eval", run_dir, "--set", "eval.max_examples=2"))
    assert refused == (
        f"error: {run_dir / 'report.json'}: a report is already there; write this one elsewhere with --out DIR, "
        "or replace it with --overwrite"
    )
    assert report_files(run_dir) == first  # nothing replaced, nothing half-written

    elsewhere = tmp_path / "max-examples-3"
    result = invoke("eval", run_dir, "--out", elsewhere, "--set", "eval.max_examples=3")
    assert result.exit_code == 0, result.output
    assert f"reportwrittento{elsewhere / 'report.md'}" in "".join(result.output.split())  # however the line wraps
    assert {r["n"] for r in json.loads((elsewhere / "report.json").read_text())["results"]} == {3}
    assert len((elsewhere / "eval_predictions.jsonl").read_text().splitlines()) == 3
    # The run's own report and its provenance record are untouched by a report written elsewhere.
    assert report_files(run_dir) == first and eval_stages(run_dir) == stages
    assert "a report is already there" in error_line(invoke("eval", run_dir, "--out", elsewhere))

    replaced = invoke("eval", run_dir, "--overwrite", "--set", "eval.max_examples=2")
    assert replaced.exit_code == 0, replaced.output
    assert {r["n"] for r in json.loads((run_dir / "report.json").read_text())["results"]} == {2}
    assert eval_stages(run_dir) == stages + 1

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    assert "is a file, not a folder" in error_line(invoke("eval", run_dir, "--out", a_file))
    assert a_file.read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------------------------
# Requirement 4: forgetting resampled by document, independent of data.max_length; its absence is said


def general_documents(folder: Path, count: int = 8) -> Path:
    """Documents of 2-9 sentences: several windows each when the window is small."""
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(CORPUS[:6]) for _ in range(2 + index))} for index in range(count)]
    return write_jsonl(folder / "general.jsonl", rows)


def test_forgetting_resamples_documents_and_ignores_data_max_length(make_recipe: Any, tmp_path: Path) -> None:
    general = general_documents(tmp_path)
    recipe_path = make_recipe(
        eval={"datasets": [{"metrics": ["loss"]}], "general": {"path": str(general), "window": 24},
              "bootstrap": {"resamples": 1000}}
    )  # fmt: skip
    make_run(recipe_path)
    reports_by_length = {}
    for max_length in (48, 96):
        recipe = load_recipe(recipe_path, [f"data.max_length={max_length}"])
        reports_by_length[max_length] = ev.evaluate(recipe, write=False)
    short, long = (reports_by_length[length].forgetting for length in (48, 96))
    assert short is not None and long is not None
    assert (short.base, short.tuned, short.relative_ci_low, short.relative_ci_high) == (
        long.base, long.tuned, long.relative_ci_low, long.relative_ci_high,
    )  # fmt: skip

    # n counts documents, not windows; each document is one record whose sums cover all its windows.
    recipe = load_recipe(recipe_path)
    tokenizer = models.load_tokenizer(recipe)
    suite = ev.prepare_general(recipe, tokenizer)
    assert len(suite.items) > 8 and len({item.document for item in suite.items}) == 8
    assert short.n == 8
    assert any("8 documents scored in" in note and "resampled by document" in note for note in suite.notes)
    records = [r for r in reports_by_length[96].examples["general"]]
    assert len(records) == 8 and all("@" not in record["origin"] for record in records)
    windows_per_document = {}
    for item in suite.items:
        windows_per_document[item.document] = windows_per_document.get(item.document, 0) + 1
    for record in records:
        whole = len(tokenizer(f"<s>{json_text(general, record['origin'])}</s>", add_special_tokens=False)["input_ids"])
        # Every token of the document but the first of each window is predicted.
        assert record["token_sums"]["tokens"] == whole - windows_per_document[record["origin"]]
    # The interval is the paired bootstrap over the per-document sums written beside it: documents are the unit.
    tokens = [r["token_sums"]["tokens"] for r in records]
    paired = paired_bootstrap(
        Scores([r["token_sums"]["nll"]["base"] for r in records], tokens, "exp_ratio"),
        Scores([r["token_sums"]["nll"]["tuned"] for r in records], tokens, "exp_ratio"),
        resamples=1000,
    )
    assert (paired.relative_ci_low, paired.relative_ci_high) == pytest.approx(
        (long.relative_ci_low, long.relative_ci_high), rel=1e-12
    )


def json_text(path: Path, origin: str) -> str:
    line = int(origin.rsplit(":", 1)[1])
    return json.loads(path.read_text().splitlines()[line - 1])["text"]


def test_general_windows_longer_than_the_model_context_are_refused_before_training(
    make_recipe: Any, tmp_path: Path
) -> None:
    long_text = write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(CORPUS[:60])}])
    recipe = make_recipe(eval={"general": str(long_text)})
    message = error_line(invoke("check", recipe))
    assert "eval.general: a window of" in message
    assert (
        f"longer than the base model's context (256 positions); set eval.general.window to at most 256 "
        f"(eval.general: {{path: {long_text}, window: 256}})"
    ) in message
    fixed = make_recipe(name="fixed", eval={"general": {"path": str(long_text), "window": 256}})
    assert invoke("check", fixed).exit_code == 0


def test_a_report_without_a_forgetting_check_says_so(make_recipe: Any, tmp_path: Path) -> None:
    from sovtune.publish.card import build_card

    recipe = make_run(make_recipe(eval={"datasets": [{"metrics": ["loss"]}], "bootstrap": {"resamples": 1000}}))
    result = invoke("eval", recipe.run_dir)
    assert result.exit_code == 0, result.output
    sentence = reports.NO_FORGETTING_CHECK
    assert sentence in " ".join(result.output.split())
    markdown = (recipe.run_dir / "report.md").read_text()
    assert f"## Forgetting check\n\n{sentence}" in markdown
    assert sentence in str(build_card(recipe.run_dir, "acme/demo"))


# ---------------------------------------------------------------------------------------------------------------
# Requirement 3: every generation metric against a constant baseline; distinct outputs; a gate on it

VERBS = ["copy", "remove", "list", "change", "print", "create", "search", "compare", "format", "display"]
OBJECTS = ["files and directories", "directory contents", "the system date", "lines of text", "file permissions",
           "process status", "network interfaces", "user accounts", "kernel messages", "archive members"]  # fmt: skip
SUFFIXES = ["", " in a terminal", " from standard input", " on a remote host"]


def manual_pages() -> tuple[list[dict[str, str]], dict[str, list[str]]]:
    """400 one-line manual-page descriptions, a base that answers with boilerplate, and an adapter that answers
    about a third of them with one generic line (the issue's 129 of 400) and guesses the rest."""
    rng = random.Random(0)
    descriptions = [f"{verb} {obj}{suffix}" for suffix in SUFFIXES for verb in VERBS for obj in OBJECTS]
    rng.shuffle(descriptions)
    rows = [{"prompt": f"man page {index}: NAME\n", "completion": text} for index, text in enumerate(descriptions)]
    generic = "display files and directories"
    base, tuned = [], []
    for index in range(len(rows)):
        base.append(rng.choice(["NAME", "SYNOPSIS", "usage: command [options]", "see also", "the manual page"]))
        if index % 31 < 10:
            tuned.append(generic)
        elif rng.random() < 0.2:
            tuned.append(f"{rng.choice(VERBS)} {rng.choice(OBJECTS)}")
        else:
            tuned.append(
                f"{rng.choice(['show', 'set', 'get'])} the {rng.choice(['value', 'name', 'mode'])} of a device"
            )
    return rows, {"base": base, "tuned": tuned}


def test_a_gain_the_constant_baseline_also_gets_is_flagged_and_can_fail_a_gate(
    make_recipe: Any, tmp_path: Path
) -> None:
    rows, predictions = manual_pages()
    data = write_jsonl(tmp_path / "man.jsonl", rows)
    recipe = load_recipe(
        make_recipe(
            data={"train": str(data), "format": "prompt_completion", "eval_fraction": 0.5},
            eval={"datasets": [{"name": "man", "source": str(data), "metrics": ["rouge_l", "chrf"]}],
                  "bootstrap": {"resamples": 1000},
                  "gates": {"rouge_l": {"significant": True, "beats_constant": True},
                            "chrf": {"beats_constant": True}}},
        )
    )  # fmt: skip
    suite = ev.prepare_dataset(recipe, models.load_tokenizer(recipe), recipe.eval.datasets[0])
    references = [item.reference for item in suite.items]
    assert len(suite.items) == 400
    outputs = ev.output_diversity(predictions)
    records = [{"origin": item.origin} for item in suite.items]
    scores = ev.score_generations(suite, predictions, outputs["most_frequent"]["text"], records)
    outcome = ev.SuiteOutcome("man", scores, suite.higher_is_better, records, [], {}, outputs)
    report = reports.build_report(recipe, [outcome], adapter_dir=tmp_path / "adapter", seconds=1.0)

    generic, count = outputs["most_frequent"]["text"], outputs["most_frequent"]["count"]
    assert count == predictions["tuned"].count(generic) == 130
    assert outputs["distinct"] == {"base": len(set(predictions["base"])), "tuned": len(set(predictions["tuned"]))}
    results = {result.metric: result for result in report.results}
    for metric, function in (("rouge_l", rouge_l), ("chrf", chrf)):
        result = results[metric]
        assert result.constant == pytest.approx(sum(function(generic, ref) for ref in references) / 400)
        assert result.improved, f"{metric}: the adapter is significantly better than the base"
        assert result.beats_constant is False and result.gain_in_form_only
        assert result.verdict == "better, not above constant"
        assert records[0]["scores"][metric]["constant"] == pytest.approx(function(generic, references[0]))
    gates = {(gate.metric, gate.rule): gate.passed for gate in report.gates}
    assert gates == {("rouge_l", "significant"): True, ("rouge_l", "beats_constant"): False,
                     ("chrf", "beats_constant"): False}  # fmt: skip
    assert not report.passed

    markdown = report.markdown()
    assert "| man | rouge_l ↑ |" in markdown and "**better, not above constant**" in markdown
    assert f"| {reports.number_text(results['rouge_l'].constant)} |" in markdown
    assert "man/rouge_l: better than the base" in markdown and "not than the constant baseline" in markdown
    tuned_distinct = outputs["distinct"]["tuned"]
    assert (
        f"man: the tuned model gave {tuned_distinct} distinct outputs for 400 examples (base "
        f'{outputs["distinct"]["base"]}); its most frequent, "{generic}", 130 times (32%) is the constant baseline'
    ) in markdown
    saved = report.to_json()
    assert saved["outputs"]["man"]["most_frequent"] == {"text": generic, "count": 130}
    rouge = next(r for r in saved["results"] if r["metric"] == "rouge_l")
    assert rouge["beats_constant"] is False and rouge["constant_ci_low"] <= 0 <= rouge["constant_ci_high"]


def test_evaluation_scores_the_constant_baseline_of_every_generation_metric(make_recipe: Any) -> None:
    recipe = make_run(
        make_recipe(eval={"datasets": [{"metrics": ["loss", "exact_match", "chrf"]}],
                          "generation": {"max_new_tokens": 6}, "bootstrap": {"resamples": 1000}})
    )  # fmt: skip
    assert invoke("eval", recipe.run_dir).exit_code == 0
    saved = json.loads((recipe.run_dir / "report.json").read_text())
    records = [json.loads(line) for line in (recipe.run_dir / "eval_predictions.jsonl").read_text().splitlines()]
    tuned = [record["predictions"]["tuned"] for record in records]
    most_frequent = max(tuned, key=lambda text: (tuned.count(text), -tuned.index(text)))
    assert saved["outputs"]["eval"] == {
        "n": len(records),
        "distinct": {"base": len({r["predictions"]["base"] for r in records}), "tuned": len(set(tuned))},
        "most_frequent": {"text": most_frequent, "count": tuned.count(most_frequent)},
    }
    results = {result["metric"]: result for result in saved["results"]}
    assert results["loss"]["constant"] is None and results["loss"]["beats_constant"] is None
    for metric in ("exact_match", "chrf"):
        constants = [record["scores"][metric]["constant"] for record in records]
        assert results[metric]["constant"] == pytest.approx(sum(constants) / len(constants))
        assert isinstance(results[metric]["beats_constant"], bool)


@pytest.mark.parametrize(
    ("gates", "message"),
    [
        ({"loss": {"beats_constant": True}}, "beats_constant applies to metrics of generated text"),
        ({"perplexity": {"beats_constant": True}}, "perplexity is not one; remove it or gate a generation metric"),
    ],
)
def test_beats_constant_is_refused_on_metrics_without_generated_text(
    make_recipe: Any, gates: dict[str, Any], message: str
) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(make_recipe(eval={"gates": gates}))


# ---------------------------------------------------------------------------------------------------------------
# Requirement 5: compare answers "is lr 3e-3 better than 1e-3?": paired run-vs-run differences, settings, n


def tuned_values(run_dir: Path, metric: str) -> dict[tuple[str, str], tuple[float, float]]:
    """Per-example (numerator, denominator) of the tuned model, read straight from eval_predictions.jsonl."""
    values = {}
    for line in (run_dir / "eval_predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        if metric in ("loss", "perplexity"):
            sums = record.get("token_sums")
            if sums is not None:
                values[(record["dataset"], record["origin"])] = (sums["nll"]["tuned"], sums["tokens"])
        elif metric in record.get("scores", {}):
            values[(record["dataset"], record["origin"])] = (record["scores"][metric]["tuned"], 1.0)
    return values


def test_compare_pairs_runs_example_by_example_and_flags_different_example_sets(
    make_recipe: Any, tmp_path: Path
) -> None:
    train = write_jsonl(tmp_path / "shared-train.jsonl", qa_rows())
    general = general_documents(tmp_path)
    runs = {}
    for name, learning_rate, scale in (("lr1e-3", 1e-3, 0.2), ("lr3e-3", 3e-3, 0.6)):
        recipe_path = make_recipe(
            name=name,
            data={"train": str(train)},
            train={"learning_rate": learning_rate},
            eval={"datasets": [{"metrics": ["loss", "perplexity", "exact_match", "chrf"]}], "general": str(general),
                  "generation": {"max_new_tokens": 6}, "bootstrap": {"resamples": 1000}},
        )  # fmt: skip
        runs[name] = make_run(recipe_path, seed=1, scale=scale).run_dir
        assert invoke("eval", runs[name]).exit_code == 0
    out = tmp_path / "cmp"
    result = invoke("compare", runs["lr1e-3"], runs["lr3e-3"], "--out", out)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    output = " ".join(result.output.split())
    assert "lr3e-3 vs lr1e-3, paired on the examples both evaluated" in output
    assert "setting train.learning_rate: lr1e-3 `0.001`, lr3e-3 `0.003`" in output
    comparison = json.loads((out / "compare.json").read_text())
    # The only setting that differs (run names and output folders are labels, not settings).
    assert comparison["settings"] == [{"setting": "train.learning_rate", "values": {"lr1e-3": 0.001, "lr3e-3": 0.003}}]
    pairs = {(pair["dataset"], pair["metric"]): pair for pair in comparison["paired"]}
    assert set(pairs) == {("eval", m) for m in ("loss", "perplexity", "exact_match", "chrf")} | {
        ("general", "perplexity")
    }
    for (dataset, metric), pair in pairs.items():
        first, second = tuned_values(runs["lr1e-3"], metric), tuned_values(runs["lr3e-3"], metric)
        shared = [key for key in first if key[0] == dataset]
        aggregate = {"loss": "ratio", "perplexity": "exp_ratio"}.get(metric, "mean")
        expected = paired_bootstrap(
            Scores([first[k][0] for k in shared], [first[k][1] for k in shared], aggregate),
            Scores([second[k][0] for k in shared], [second[k][1] for k in shared], aggregate),
            resamples=1000,
        )
        assert pair["n"] == len(shared) == expected.n
        assert (pair["reference_value"], pair["run_value"], pair["ci_low"], pair["ci_high"]) == pytest.approx(
            (expected.base, expected.tuned, expected.ci_low, expected.ci_high)
        )
        assert pair["verdict"] == (
            "no significant difference"
            if not expected.significant
            else "better"
            if (expected.difference > 0) == (metric not in ("loss", "perplexity"))
            else "worse"
        )
    markdown = (out / "compare.md").read_text()
    assert (
        "## lr3e-3 vs lr1e-3" in markdown
        and "| dataset | metric | n | lr1e-3 | lr3e-3 | Δ [CI] | verdict |" in markdown
    )
    assert "- `train.learning_rate`: lr1e-3 `0.001`, lr3e-3 `0.003`" in markdown

    # A partial re-evaluation of one run: the comparison says so loudly and pairs only the shared examples.
    assert invoke("eval", runs["lr3e-3"], "--overwrite", "--set", "eval.max_examples=3").exit_code == 0
    partial = invoke("compare", runs["lr1e-3"], runs["lr3e-3"], "--out", out)
    assert partial.exit_code == 0, partial.output
    warnings = [line for line in partial.stderr.splitlines() if line.startswith("warning:")]
    assert any(
        "eval: lr1e-3 and lr3e-3 were evaluated on different examples (lr1e-3 6, lr3e-3 3, 3 shared)" in line
        for line in warnings
    ), partial.stderr
    comparison = json.loads((out / "compare.json").read_text())
    assert {pair["n"] for pair in comparison["paired"] if pair["dataset"] == "eval"} == {3}
    assert {row["runs"]["lr3e-3"]["n"] for row in comparison["rows"] if row["dataset"] == "eval"} == {3}
    assert "| eval | loss ↓ | 6/3 ⚠ |" in (out / "compare.md").read_text()
    assert "**Warning: eval: lr1e-3 and lr3e-3 were evaluated on different examples" in (out / "compare.md").read_text()
    assert {item["setting"] for item in comparison["settings"]} == {"train.learning_rate", "eval.max_examples"}

    # Predictions from elsewhere are data: a damaged line is one error line naming it, and nothing is written.
    predictions = runs["lr3e-3"] / "eval_predictions.jsonl"
    lines = predictions.read_text().splitlines()
    predictions.write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    (out / "compare.json").unlink()
    message = error_line(invoke("compare", runs["lr1e-3"], runs["lr3e-3"], "--out", out))
    assert f"{predictions}:2: not JSON" in message and not (out / "compare.json").exists()
