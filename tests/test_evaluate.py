"""Evaluation on the tiny model: exact perplexity, adapter switching, batched generation, metrics end to end, gates."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import invoke, make_run, write_jsonl
from sovtune import evaluation as ev
from sovtune import model as models
from sovtune.config import load_recipe
from sovtune.data import IGNORE_INDEX
from sovtune.errors import DataError, GateFailed, RecipeError

torch.set_num_threads(1)


def lora_on(base: Any) -> Any:
    """A LoRA whose B matrices are random, so the adapter really changes the outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))


def loaded(recipe_path: Path) -> tuple[Any, Any, Any]:
    recipe = load_recipe(recipe_path)
    tokenizer = models.load_tokenizer(recipe)
    return recipe, tokenizer, models.load_base_model(recipe, tokenizer)


@pytest.fixture
def company_db(tmp_path: Path) -> Path:
    path = tmp_path / "company.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(
            "CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT);"
            "INSERT INTO employees VALUES (1, 'Ada'), (2, 'Bob'), (3, 'Cy');"
        )
    return path


# ---------------------------------------------------------------------------------------------------------------
# Numbers that must be exact


def test_perplexity_equals_a_direct_computation(make_recipe: Any) -> None:
    recipe, tokenizer, base = loaded(make_recipe())
    suite = ev.prepare_dataset(recipe, tokenizer, recipe.eval.datasets[0])
    sequences = [item.tokens for item in suite.items]
    assert len({len(s.input_ids) for s in sequences}) > 1  # batches really need padding
    model = lora_on(base).eval()
    for name, context in ev.both_models(model):
        sums = ev.teacher_forced_sums(model, sequences, batch_size=4, context=context)
        nll_total, token_total, correct_total = 0.0, 0, 0
        with model.disable_adapter() if name == "base" else nullcontext(), torch.no_grad():
            for sequence in sequences:  # one at a time, no padding, full logits, float64
                logits = model(input_ids=torch.tensor([sequence.input_ids])).logits[0, :-1].double()
                labels = torch.tensor(sequence.labels[1:])
                supervised = labels != IGNORE_INDEX
                logprobs = torch.log_softmax(logits[supervised], dim=-1)
                nll_total -= logprobs.gather(1, labels[supervised, None]).sum().item()
                token_total += int(supervised.sum())
                correct_total += int((logits[supervised].argmax(-1) == labels[supervised]).sum())
        expected_perplexity = math.exp(nll_total / token_total)
        assert ev.loss_scores("perplexity", sums).value() == pytest.approx(expected_perplexity, rel=1e-5, abs=1e-5)
        assert ev.loss_scores("loss", sums).value() == pytest.approx(nll_total / token_total, rel=1e-5, abs=1e-5)
        assert ev.loss_scores("token_accuracy", sums).value() == pytest.approx(correct_total / token_total)
        assert int(sums.tokens.sum()) == sum(s.supervised_tokens for s in sequences) == token_total


def test_models_without_logits_to_keep_get_the_same_sums(make_recipe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, tokenizer, base = loaded(make_recipe())
    sequences = [item.tokens for item in ev.prepare_dataset(recipe, tokenizer, recipe.eval.datasets[0]).items]
    model = lora_on(base).eval()
    sliced = ev.teacher_forced_sums(model, sequences, batch_size=4)
    monkeypatch.setattr(ev, "supports_logits_to_keep", lambda model: False)
    full = ev.teacher_forced_sums(model, sequences, batch_size=4)
    assert torch.allclose(sliced.nll, full.nll, rtol=1e-6) and torch.equal(sliced.correct, full.correct)


def test_disabling_the_adapter_reproduces_base_logits_exactly(make_recipe: Any) -> None:
    recipe, tokenizer, base = loaded(make_recipe())
    input_ids = torch.tensor([tokenizer("How many employees work in Sales?")["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits.clone()
        model = lora_on(base).eval()
        with model.disable_adapter():
            disabled = model(input_ids=input_ids).logits
        enabled = model(input_ids=input_ids).logits
        with model.disable_adapter():
            again = model(input_ids=input_ids).logits
    assert torch.equal(disabled, base_logits)
    assert torch.equal(again, base_logits)  # switching back and forth leaves no trace
    assert not torch.allclose(enabled, base_logits, atol=1e-3)


def test_batched_generation_equals_one_by_one_under_greedy(make_recipe: Any) -> None:
    recipe, tokenizer, base = loaded(make_recipe(eval={"generation": {"max_new_tokens": 12}}))
    suite = ev.prepare_dataset(recipe, tokenizer, recipe.eval.datasets[0])
    prompts = [item.prompt_ids for item in suite.items]
    prompts.append(tokenizer("SELECT", add_special_tokens=False)["input_ids"])  # a much shorter prompt: heavy padding
    assert len({len(p) for p in prompts}) > 1
    model = lora_on(base).eval()
    config = ev.generation_config(tokenizer, recipe)
    for _, context in ev.both_models(model):
        with context:
            together = ev.generate_batch(model, prompts, config)
            alone = [ev.generate_batch(model, [prompt], config)[0] for prompt in prompts]
        assert together == alone
        assert any(len(ids) > 0 for ids in together)


def test_stop_strings_cut_answers_and_sampling_is_seeded(make_recipe: Any) -> None:
    recipe, tokenizer, base = loaded(make_recipe(eval={"generation": {"max_new_tokens": 16, "stop": ["e"]}}))
    prompts = [item.prompt_ids for item in ev.prepare_dataset(recipe, tokenizer, recipe.eval.datasets[0]).items]
    model = lora_on(base).eval()
    free = ev.generate_both(model, tokenizer, prompts, recipe.model_copy(update={"eval": recipe.eval.model_copy(
        update={"generation": recipe.eval.generation.model_copy(update={"stop": []})})}))  # fmt: skip
    stopped = ev.generate_both(model, tokenizer, prompts, recipe)
    for name in ("base", "tuned"):
        for full, cut in zip(free[name], stopped[name]):
            assert "e" not in cut and full.startswith(cut)
    assert (
        ev.decode(tokenizer, tokenizer("SELECT name;\n\nmore", add_special_tokens=False)["input_ids"], ["\n\n"])
        == "SELECT name;"
    )
    sampling = load_recipe(
        make_recipe(name="s", eval={"generation": {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5}})
    )
    first = ev.generate_both(model, tokenizer, prompts, sampling)
    assert first == ev.generate_both(model, tokenizer, prompts, sampling)


def test_multiple_choice_picks_the_option_with_the_highest_likelihood(make_recipe: Any, tmp_path: Path) -> None:
    rows = [
        {"prompt": "Capital of France?", "completion": " Paris", "choices": [" Paris", " Lyon", " Nice"], "answer": 0},
        {"prompt": "2 + 2 =", "completion": " 4", "choices": [" 3", " 4"], "answer": " 4"},
        {"prompt": "SELECT name", "completion": " FROM employees", "choices": [" FROM employees", " WHERE x"]},
    ]
    source = write_jsonl(tmp_path / "mc.jsonl", rows)
    dataset = {"name": "mc", "source": str(source), "format": "prompt_completion", "metrics": ["multiple_choice"]}
    recipe, tokenizer, base = loaded(make_recipe(eval={"datasets": [dataset]}))
    suite = ev.prepare_dataset(recipe, tokenizer, recipe.eval.datasets[0])
    assert [item.answer for item in suite.items] == [0, 1, 0]
    model = lora_on(base).eval()
    paired = ev.multiple_choice_scores(model, suite.items, batch_size=3)
    for name, context in ev.both_models(model):
        expected = []
        with context, torch.no_grad():
            for item in suite.items:
                scores = []
                for option in item.choices:
                    ids = torch.tensor([item.prompt_ids + option])
                    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                    positions = range(len(item.prompt_ids) - 1, ids.shape[1] - 1)
                    scores.append(sum(logprobs[p, ids[0, p + 1]].item() for p in positions))
                expected.append(float(max(range(len(scores)), key=scores.__getitem__) == item.answer))
        assert list(getattr(paired, name).numerators) == expected


# ---------------------------------------------------------------------------------------------------------------
# End to end: files, gates, CLI


def sql_recipe(make_recipe: Any, tmp_path: Path, company_db: Path, gates: dict[str, Any] | None = None) -> Path:
    general = write_jsonl(
        tmp_path / "general.jsonl", [{"text": f"The quick brown fox number {i} jumps."} for i in range(8)]
    )
    metric_file = tmp_path / "length_metric.py"
    metric_file.write_text(
        "def shorter(prediction, reference, row):\n    return float(len(prediction) <= len(reference))\n"
    )
    return make_recipe(
        eval={
            "datasets": [{
                "name": "sql",
                "metrics": ["loss", "perplexity", "token_accuracy", "exact_match", "contains", "regex", "chrf",
                            "rouge_l", "sql_execution"],
                "regex": r"^SELECT\b", "database": str(company_db),
                "user_metrics": [{"name": "shorter", "module": str(metric_file), "function": "shorter"}],
            }],
            "general": str(general),
            "generation": {"max_new_tokens": 8, "batch_size": 4},
            "bootstrap": {"resamples": 1000},
            "samples": 2,
            "gates": gates or {},
        }
    )  # fmt: skip


def test_evaluate_writes_a_complete_report(make_recipe: Any, tmp_path: Path, company_db: Path) -> None:
    recipe_path = sql_recipe(make_recipe, tmp_path, company_db, gates={"general_perplexity": {"max_increase": 10.0}})
    make_run(recipe_path)
    recipe = load_recipe(recipe_path)
    import sovtune

    report = sovtune.evaluate(recipe)  # the public API (the module is sovtune.evaluation, so the name stays a function)
    data = json.loads((recipe.run_dir / "report.json").read_text())
    assert data["schema_version"] == 1 and data["passed"] is True
    computed = {(r["dataset"], r["metric"]) for r in data["results"]}
    expected = {"loss", "perplexity", "token_accuracy", "exact_match", "contains", "regex", "chrf", "rouge_l",
                "sql_execution", "shorter"}  # fmt: skip
    assert computed == {("sql", m) for m in expected} | {("general", "perplexity")}
    n = data["results"][0]["n"]
    for result in data["results"]:
        assert result["ci_low"] <= result["difference"] <= result["ci_high"] or result["ci_low"] == result["ci_high"]
        assert result["significant"] == (result["ci_low"] > 0 or result["ci_high"] < 0)
        assert result["resamples"] == 1000
    assert data["forgetting"]["relative_change"] == pytest.approx(report.forgetting.tuned / report.forgetting.base - 1)
    predictions = (recipe.run_dir / "eval_predictions.jsonl").read_text().splitlines()
    sql_records = [json.loads(line) for line in predictions if json.loads(line)["dataset"] == "sql"]
    assert len(sql_records) == n and set(sql_records[0]["predictions"]) == {"base", "tuned"}
    # The reported sql_execution base value is the mean of the per-example scores written beside it.
    base_sql = sum(r["scores"]["sql_execution"]["base"] for r in sql_records) / n
    assert next(r for r in data["results"] if r["metric"] == "sql_execution")["base"] == pytest.approx(base_sql)
    assert len(data["samples"]) == 2
    markdown = (recipe.run_dir / "report.md").read_text()
    assert "| sql | sql_execution ↑ |" in markdown and "## Side by side" in markdown
    assert (recipe.run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_exits_3_naming_the_failing_gate(make_recipe: Any, tmp_path: Path, company_db: Path) -> None:
    recipe_path = sql_recipe(make_recipe, tmp_path, company_db)
    adapter = make_run(recipe_path).run_dir / "adapter"
    run_dir = tmp_path / "elsewhere"
    args = ["eval", str(run_dir), "--recipe", str(recipe_path), "--adapter", str(adapter), "--set",
            "eval.gates={sql_execution: {min_gain: 0.5}, general_perplexity: {max_increase: 100}}"]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    assert "gate failed: sql_execution (sql/sql_execution) min_gain 0.5" in " ".join(result.output.split())
    assert "general_perplexity" not in result.output.split("gate failed:")[1]  # only the failing gate is named
    assert json.loads((run_dir / "report.json").read_text())["passed"] is False  # the evidence is still written


def test_eval_cli_passes_and_bad_input_exits_2(make_recipe: Any, tmp_path: Path, company_db: Path) -> None:
    recipe_path = sql_recipe(make_recipe, tmp_path, company_db, gates={"sql_execution": {"min_gain": -1.0}})
    adapter = make_run(recipe_path).run_dir / "adapter"
    run_dir = adapter.parent
    bad_gate = invoke(
        "eval", str(run_dir), "--recipe", str(recipe_path), "--set", "eval.gates={sql_exec: {min_gain: 0}}"
    )
    assert bad_gate.exit_code == 2 and "did you mean 'sql_execution'?" in bad_gate.output
    copied_base = shutil.copytree(load_recipe(recipe_path).model_location, tmp_path / "base-copy")
    result = invoke("eval", str(run_dir), "--recipe", str(recipe_path), "--base", str(copied_base))
    assert result.exit_code == 0, result.output
    assert "sql_execution" in result.output and "gate pass" in result.output
    assert json.loads((run_dir / "report.json").read_text())["base_model"]["name_or_path"] == str(copied_base)
    missing = invoke("eval", str(tmp_path / "nothing-here"))
    assert missing.exit_code == 2 and "pass --recipe" in missing.output


def test_gate_failure_raises_from_the_api(make_recipe: Any, tmp_path: Path, company_db: Path) -> None:
    recipe_path = sql_recipe(
        make_recipe,
        tmp_path,
        company_db,
        gates={"general_perplexity": {"max_increase": 0.0}, "loss": {"max_value": 0.001}},
    )
    make_run(recipe_path)
    with pytest.raises(GateFailed, match=r"loss \(sql/loss\) max_value 0.001"):
        ev.evaluate(load_recipe(recipe_path))


@pytest.mark.slow
def test_run_trains_then_evaluates_and_exits_3_on_a_failing_gate(make_recipe: Any, tmp_path: Path) -> None:
    recipe_path = make_recipe(
        train={"max_steps": 2},
        eval={"generation": {"max_new_tokens": 4}, "gates": {"exact_match": {"min_value": 0.99}}},
    )
    result = invoke("run", str(recipe_path))
    assert result.exit_code == 3, result.output
    output = " ".join(result.output.split())
    assert "gate failed: exact_match (eval/exact_match) min_value 0.99" in output
    # Said before training, not found out after it: 4 new tokens cannot hold the answers.
    warning = output.index("warning: eval dataset 'eval': ")
    assert "references need more than eval.generation.max_new_tokens=4 tokens" in output
    assert warning < output.index("effective batch")
    run_dir = load_recipe(recipe_path).run_dir
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "report.json").is_file()
    # `sovtune eval RUN_DIR` alone re-evaluates with the recipe the run saved.
    again = invoke("eval", str(run_dir), "--set", "eval.gates={}", "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((run_dir / "report.json").read_text())["gates"] == []


def test_check_eval_finds_bad_eval_data_before_any_model_loads(
    make_recipe: Any, tmp_path: Path, company_db: Path
) -> None:
    good = sql_recipe(make_recipe, tmp_path, company_db)
    assert ev.check_eval(load_recipe(good)).examples == {"sql": 6, "general": 8}
    broken = write_jsonl(tmp_path / "broken.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "SELECT nope FROM employees"}]}
    ])  # fmt: skip
    recipe = make_recipe(
        name="broken",
        eval={"datasets": [{"source": str(broken), "metrics": ["sql_execution"], "database": str(company_db)}]},
    )
    with pytest.raises(DataError, match=r"broken.jsonl:1: reference SQL fails on company.db \(no such column: nope\)"):
        ev.check_eval(load_recipe(recipe))


def test_check_eval_warns_when_references_cannot_fit_the_generation_budget(
    make_recipe: Any, tmp_path: Path, company_db: Path
) -> None:
    """max_new_tokens=8 cuts SQL references short: the check says so (and how to fix it) before training."""
    recipe_path = sql_recipe(make_recipe, tmp_path, company_db)
    tight = ev.check_eval(load_recipe(recipe_path))
    assert len(tight.warnings) == 1
    assert re.fullmatch(
        r"eval dataset 'sql': [1-6] of 6 references need more than eval.generation.max_new_tokens=8 tokens "
        r"\(longest (\d+) with its stop token\) and cannot match; raise it to at least \1",
        tight.warnings[0],
    ), tight.warnings[0]
    longest = int(re.search(r"longest (\d+)", tight.warnings[0]).group(1))
    enough = ev.check_eval(load_recipe(recipe_path, [f"eval.generation.max_new_tokens={longest}"]))
    assert enough.warnings == []
    one_short = ev.check_eval(load_recipe(recipe_path, [f"eval.generation.max_new_tokens={longest - 1}"]))
    assert len(one_short.warnings) == 1 and f"raise it to at least {longest}" in one_short.warnings[0]
    result = invoke("check", str(recipe_path), "--json")
    checks = {check["check"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["generation budget"]["ok"] is False and tight.warnings[0] in checks["generation budget"]["detail"]
    assert result.exit_code == 0  # a warning, not a failure: the cap may be deliberate


def test_text_recipes_default_to_loss_metrics_and_gates_follow(make_recipe: Any, tmp_path: Path) -> None:
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 8)
    recipe = load_recipe(make_recipe(rows=None, data={"train": str(text), "format": "text"}))
    assert recipe.eval.datasets[0].metrics == ["loss", "perplexity", "token_accuracy"]
    with pytest.raises(RecipeError, match="gate 'exact_match' names a metric no eval dataset computes"):
        load_recipe(
            make_recipe(data={"train": str(text), "format": "text"}, eval={"gates": {"exact_match": {"min_gain": 0}}})
        )


# ---------------------------------------------------------------------------------------------------------------
# Recipe checks for the eval section (before anything loads)


@pytest.mark.parametrize(
    ("eval_section", "message"),
    [
        ({"datasets": [{"metrics": ["exact_mtch"]}]}, "allowed: 'loss', 'perplexity'.*did you mean 'exact_match'"),
        (
            {"gates": {"sql_execution": {"min_gain": 0.1}}},
            "gate 'sql_execution' names a metric no eval dataset computes",
        ),
        ({"gates": {"general_perplexity": {"max_increase": 0.05}}}, "needs eval.general"),
        (
            {"gates": {"exact_match": {"max_increase": 0.05}}},
            "max_increase does not fit exact_match \\(higher is better\\)",
        ),
        ({"datasets": [{"metrics": ["sql_execution"]}]}, "sql_execution needs database"),
        ({"datasets": [{"metrics": ["sql_execution"], "database": "missing.db"}]}, "database: .*missing.db not found"),
        ({"datasets": [{"metrics": ["regex"], "regex": "(unclosed"}]}, "does not compile"),
        (
            {"datasets": [{"format": "text", "source": "x.jsonl", "metrics": ["exact_match"]}]},
            "format text has no prompt",
        ),
        ({"datasets": [{}, {"name": "second"}]}, "only one eval dataset can use the recipe's held-out split"),
        ({"bootstrap": {"resamples": 200}}, "greater than or equal to 1000"),
        ({"generation": {"top_p": 0.9}}, "top_p only apply with do_sample"),
    ],
)
def test_eval_section_is_checked_at_load_time(make_recipe: Any, eval_section: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(make_recipe(eval=eval_section))
