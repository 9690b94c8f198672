"""The family grid: every family of tests/families.py with its real vocabulary, its real chat template and a tiny
random model of its architecture, through what a user runs. Per family: `sovtune check` passes with the template
round trip at 100%; the loss falls on exactly the assistant contents and the family's turn terminator (multi-turn,
with system text); one BOS; a pad token that never ends a turn; generation that stops at the turn end; `sovtune plan`
counting the parameters exactly and naming the family's target modules; and (slow) three training steps whose adapter
reloads in plain peft with the same logits and merges. The families' own quirks: tests/test_family_quirks.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import families
from families import GRID, Family
from helpers import invoke, write_recipe
from sovtune import model as models
from sovtune import plan as planner
from sovtune.config import Recipe, load_recipe
from sovtune.data import IGNORE_INDEX, Row, generation_prompt, stop_token_ids, to_example, tokenize
from sovtune.preflight import architecture_summary

SYSTEM = "You write SQL for the company database."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "How many employees work in Sales?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM employees WHERE department = 'Sales';"},
    {"role": "user", "content": "And their names?"},
    {"role": "assistant", "content": "SELECT name FROM employees WHERE department = 'Sales';"},
]
QUESTIONS = [
    ("How many employees are there?", "SELECT COUNT(*) FROM employees;"),
    ("List every department.", "SELECT DISTINCT department FROM employees;"),
    ("Who earns the most?", "SELECT name FROM employees ORDER BY salary DESC LIMIT 1;"),
    ("What is the average salary?", "SELECT AVG(salary) FROM employees;"),
]


def training_rows() -> list[dict[str, Any]]:
    """Single- and multi-turn conversations, some with a system message."""
    rows = []
    for i in range(12):
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        messages = [{"role": "user", "content": f"{question} (#{i})"}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            messages = [{"role": "system", "content": SYSTEM}, *messages]
        if i % 4 == 1:
            messages += CONVERSATION[3:]
        rows.append({"messages": messages})
    return rows


@dataclass
class Case:
    family: Family
    model_dir: Path
    recipe_path: Path
    recipe: Recipe
    tokenizer: Any


@pytest.fixture(scope="module", params=GRID, ids=[item.id for item in GRID])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    item: Family = request.param
    folder = tmp_path_factory.mktemp(item.id)
    model_dir = families.model_folder(item)
    recipe_path = write_recipe(
        folder,
        model_dir,
        item.id,
        rows=training_rows(),
        adapter={"r": 4, "dropout": 0.0, "target_modules": "all-linear"},
        data={"max_length": 160, "eval_fraction": 0.25, **families.chat_template_option(item)},
        train={"max_steps": 3, "batch_size": 2, "save_steps": 3, "logging_steps": 1},
        eval={"generation": {"max_new_tokens": 24}},
    )
    recipe = load_recipe(recipe_path)
    return Case(item, model_dir, recipe_path, recipe, models.load_tokenizer(recipe))


def supervised_runs(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[str]:
    """Each contiguous stretch of trained tokens, decoded with its special tokens."""
    runs: list[list[int]] = [[]]
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs if run]


def assert_answer_and_terminator(run: str, content: str, terminator: str) -> None:
    """A trained stretch is the content and the turn terminator, with at most the template's whitespace around the
    content: nothing of the prompt, the system text or the template's scaffolding."""
    assert run.endswith(terminator), (run, terminator)
    assert run[: -len(terminator)].strip() == content, run


# ---------------------------------------------------------------------------------------------------------------
# What `sovtune check` says


def test_check_passes_with_the_template_round_trip_at_100_percent(case: Case) -> None:
    result = invoke("check", str(case.recipe_path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    checks = {item["check"]: item for item in report["checks"]}
    assert report["ok"], [item for item in report["checks"] if not item["ok"]]
    rows = report["data"]["train"]["kept"]
    assert checks["chat template round trip"]["detail"].startswith(f"{rows}/{rows} rows"), checks
    for name in ("chat template round trip", "EOS supervised", "pad != eos", "target modules", "supervised tokens"):
        assert checks[name]["ok"], checks[name]
    assert report["data"]["train"]["eos_supervised_fraction"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Labels, BOS, pad, stop


def tokenized(case: Case, messages: list[dict[str, str]]) -> tuple[Any, Any]:
    example = to_example(Row({"messages": messages}, "test:1"), case.recipe.data, case.tokenizer)
    return example, tokenize(example, case.tokenizer, 4096)


@pytest.mark.parametrize("turns", [1, 2], ids=["single-turn", "multi-turn"])
def test_only_assistant_contents_and_the_turn_terminator_are_trained(case: Case, turns: int) -> None:
    messages = CONVERSATION[: 1 + 2 * turns]
    example, tokens = tokenized(case, messages)
    runs = supervised_runs(case.tokenizer, tokens.input_ids, tokens.labels)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers), runs
    for run, answer in zip(runs, answers):
        assert_answer_and_terminator(run, answer, case.family.terminator)
    # The tokens are the tokenizer's own for the rendered text (what an inference server gets), and the system text
    # is in the context, never in the loss.
    assert tokens.exact
    assert tokens.input_ids == case.tokenizer(example.text, add_special_tokens=False)["input_ids"]
    assert SYSTEM in example.text and all(SYSTEM not in run for run in runs)


def test_one_bos_and_a_pad_token_that_never_ends_a_turn(case: Case) -> None:
    tokenizer = case.tokenizer
    example, tokens = tokenized(case, CONVERSATION)
    bos = tokenizer.bos_token_id
    if bos is not None:  # as many BOS tokens as the template writes, none added on top
        assert tokens.input_ids.count(bos) == example.text.count(tokenizer.bos_token)
        assert tokens.input_ids[:2] != [bos, bos]
    stops = stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids(case.family.terminator) in stops
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stops
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # An existing token: the vocabulary stays the base model's, so the adapter loads on it with plain peft.
    config = json.loads((case.model_dir / "config.json").read_text())
    assert len(tokenizer) <= config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))


def test_generation_stops_at_the_turn_end(case: Case) -> None:
    """A model whose head always picks the family's terminator answers with it once and stops there."""
    import torch
    from transformers import AutoModelForCausalLM

    from sovtune.generate import LoadedRun, complete

    tokenizer = case.tokenizer
    model = AutoModelForCausalLM.from_pretrained(case.model_dir).eval()
    terminator = tokenizer.convert_tokens_to_ids(case.family.terminator)
    head = torch.nn.Linear(model.get_output_embeddings().in_features, model.config.get_text_config().vocab_size)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[terminator] = 10.0
    model.set_output_embeddings(head)
    steps = []
    model.register_forward_hook(lambda *_: steps.append(1))
    prompt = generation_prompt(CONVERSATION[:2], tokenizer, case.recipe.data.system_message)
    answer = complete(LoadedRun(case.recipe, tokenizer, model), prompt, max_new_tokens=8)
    assert answer == "" and len(steps) == 1  # one token, the terminator, then generation stopped


# ---------------------------------------------------------------------------------------------------------------
# What `sovtune plan` says


def test_plan_counts_every_parameter_and_names_the_target_modules(case: Case) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(case.model_dir)
    result = planner.plan(case.recipe, ["h100-80gb"]).to_json()
    assert result["architecture_source"] == "config"
    assert result["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert result["parameters"]["target_modules"] == sorted(case.family.target_modules)
    assert architecture_summary(case.recipe, case.tokenizer)["targeted_modules"] == sorted(case.family.target_modules)
    # The same names work as an explicit list: what `sovtune init` writes into a recipe.
    linear = models.linear_module_names(model) - {"lm_head", "embed_out"}
    assert linear == set(case.family.target_modules)


# ---------------------------------------------------------------------------------------------------------------
# What `sovtune init` writes


def test_init_picks_the_family_template_and_target_modules_from_the_config(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "starter.yaml"
    train = case.recipe.data.train[0].path
    result = invoke("init", str(path), "--model", str(case.model_dir), "--data", train)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(path)
    assert recipe.adapter.target_modules == sorted(case.family.target_modules)
    builtin = case.family.template.removeprefix("builtin:") if case.family.template.startswith("builtin:") else None
    assert recipe.data.chat_template == builtin  # the family's built-in where the tokenizer ships no template
    assert recipe.data.system_message == case.family.system_message  # merge where the template has no system role
    if builtin is None:
        assert "# chat_template: the tokenizer's own" in path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Training, reloading, merging


@pytest.mark.slow
def test_three_steps_then_plain_peft_reloads_the_adapter_and_merge_passes(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sovtune import training
    from sovtune.merge import merge

    kept: dict[str, Any] = {}
    save = training.save_adapter

    def keep_and_save(peft_model: Any, *args: Any, **kwargs: Any) -> Path:
        kept["model"] = peft_model
        return save(peft_model, *args, **kwargs)

    monkeypatch.setattr(training, "save_adapter", keep_and_save)
    result = training.train(case.recipe, overwrite=True)
    assert result.metrics["global_step"] == 3
    _, tokens = tokenized(case, CONVERSATION)
    probe = torch.tensor([tokens.input_ids])
    with torch.no_grad():
        trained = kept["model"].eval()(input_ids=probe).logits
        base = AutoModelForCausalLM.from_pretrained(case.model_dir)
        reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        torch.testing.assert_close(reloaded(input_ids=probe).logits, trained, rtol=0, atol=1e-5)
        with reloaded.disable_adapter():
            assert not torch.equal(reloaded(input_ids=probe).logits, trained)  # the adapter does something
    merged = merge(result.run_dir, tmp_path / "merged")
    assert merged.check.passed, merged.check.describe()


# ---------------------------------------------------------------------------------------------------------------
# docs/model-families.md


def test_the_families_doc_is_generated_from_this_grid_and_current(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = families.REPO / "scripts" / "gen_families_doc.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    stale = tmp_path / "model-families.md"
    stale.write_text((families.REPO / "docs" / "model-families.md").read_text().replace("Falcon", "Falkon"))
    done = subprocess.run(
        [sys.executable, str(script), "--check", "--out", str(stale)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "regenerate it with `python scripts/gen_families_doc.py`" in done.stderr
    text = (families.REPO / "docs" / "model-families.md").read_text()
    for item in GRID:  # one row per family, naming how to run its tests
        assert f"| {item.name} | `{item.architecture}` |" in text and item.test_id in text


# ---------------------------------------------------------------------------------------------------------------
# The planner's offline table

# Parameter counts the model cards publish (rounded as they give them), for the table's numbers.
PUBLISHED = {
    "EleutherAI/pythia-1b": 1_011_781_632,  # the Pythia suite's table, exact
    "EleutherAI/pythia-6.9b": 6_857_302_016,  # the Pythia suite's table, exact
    "tiiuae/falcon-7b": 7.0e9,
    "Qwen/Qwen3-0.6B": 0.6e9,
    "Qwen/Qwen3-8B": 8.2e9,
    "Qwen/Qwen3-14B": 14.8e9,
    "bigcode/starcoder2-3b": 3.0e9,
    "deepseek-ai/deepseek-llm-7b-base": 7.0e9,
    "google/gemma-3-1b-it": 1.0e9,
    "google/gemma-4-31B-it": 31e9 - 0.4e9,  # text model only: the card's 31B includes a 0.4B vision tower
    "microsoft/Phi-3-medium-4k-instruct": 14e9,
}


@pytest.mark.parametrize("item", GRID, ids=[item.id for item in GRID])
def test_the_offline_table_has_a_real_model_of_every_family(item: Family) -> None:
    found = planner.known_architecture(item.hub_id)
    assert found is not None, item.hub_id
    arch = planner._from_table(item.hub_id)
    assert arch.model_type == item.model_type
    assert planner.target_module_names(arch, planner.Settings.from_recipe(_table_recipe(item), device="cpu")) == sorted(
        item.target_modules
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_table_counts_what_the_model_cards_publish(name: str) -> None:
    total = planner._from_table(name).total_params
    assert abs(total - PUBLISHED[name]) / PUBLISHED[name] < 0.03, f"{total:,}"


def _table_recipe(item: Family) -> Recipe:
    from sovtune.config import validate_recipe

    return validate_recipe(
        {"model": {"name_or_path": item.hub_id, "revision": "0" * 40}, "data": {"train": "train.jsonl"}}
    )
