"""The model card: hub-valid metadata (hub ids only), eval results from report.json, provenance from manifest.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

HUB_BASE = "meta-llama/Llama-3.1-8B"
BASE_COMMIT = "d04e592bb4f6aa9cfee91e2e20afa771667e1d4b"


def metric(dataset: str, name: str, base: float, tuned: float, low: float, high: float, n: int = 40) -> Any:
    from sovtune.report import MetricResult

    return MetricResult(
        dataset=dataset, metric=name, higher_is_better=name not in ("loss", "perplexity"), aggregate="mean", n=n,
        base=base, tuned=tuned, difference=tuned - base, ci_low=low, ci_high=high, significant=low > 0 or high < 0,
        base_ci_low=base, base_ci_high=base, tuned_ci_low=tuned, tuned_ci_high=tuned, relative_change=None,
        relative_ci_low=None, relative_ci_high=None, confidence=0.95, resamples=2000, seed=0,
    )  # fmt: skip


def report_json(results: list[Any]) -> dict[str, Any]:
    from sovtune.report import GateResult, Report

    gate = GateResult(
        gate="exact_match",
        dataset="eval",
        metric="exact_match",
        rule="min_gain",
        threshold=0.05,
        value=0.35,
        passed=True,
    )
    return Report(run="support", base_model={}, adapter="adapter", settings={}, results=results, gates=[gate],
                  samples=[], notes={}, timing={}).to_json()  # fmt: skip


def manifest_json(local_base: bool, licence: list[str] | None = None) -> dict[str, Any]:
    """The shape manifest.start/record_* write (the keys the card reads)."""
    if local_base:
        base = {"name_or_path": "/srv/models/llama-8b", "local": True, "revision": None, "commit": None,
                "files": [{"path": "/srv/models/llama-8b/model.safetensors", "root": "absolute",
                           "sha256": "ab" * 32, "bytes": 10}]}  # fmt: skip
    else:
        base = {"name_or_path": HUB_BASE, "local": False, "revision": "main", "commit": BASE_COMMIT, "files": []}
    if licence is not None:
        base["licence"] = {"licences": licence, "source": "model card", "allowed": [], "passed": True}
    return {
        "manifest_version": 1,
        "run": {"name": "support", "started_at": "2026-11-20T10:00:00Z", "seed": 7},
        "recipe": {"sha256": "cd" * 32, "git": {"commit": "ef" * 20, "dirty": True}},
        "data": [
            {
                "split": "train",
                "source": "/home/ana/private/tickets.jsonl",
                "files": [
                    {"path": "/home/ana/private/tickets.jsonl", "root": "absolute", "sha256": "12" * 32, "bytes": 5}
                ],
            },
            {
                "split": "train",
                "source": "acme/faq",
                "hub": {"id": "acme/faq", "revision": "v2", "commit": "34" * 20},
                "files": [],
            },
        ],  # fmt: skip
        "base_model": base,
        "tokenizer": {"chat_template_sha256": "56" * 32},
        "environment": {
            "packages": {"peft": "0.21.0", "transformers": "5.23.0", "bitsandbytes": None},
            "hardware": {"cpu_count": 16, "accelerators": [{"name": "NVIDIA H100"}]},
        },  # fmt: skip
        "stages": [{"stage": "train", "ended_at": "2026-11-20T11:00:00Z", "files": []}],
    }


def write_run(
    tmp_path: Path, model: dict[str, Any], manifest: dict[str, Any] | None, report: dict[str, Any] | None
) -> Path:
    from sovtune.config import validate_recipe

    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    recipe = validate_recipe(
        {
            "name": "support",
            "description": "Answers support tickets.",
            "model": model,
            "quantization": {"mode": "4bit"},
            "adapter": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": "tickets.jsonl"},
            "train": {"learning_rate": 1e-4, "max_steps": 50},
        }  # fmt: skip
    )
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    for name, value in (("manifest.json", manifest), ("report.json", report)):
        if value is not None:
            (run_dir / name).write_text(json.dumps(value), encoding="utf-8")
    return run_dir


REPORT = [metric("eval", "exact_match", 0.20, 0.55, 0.30, 0.41), metric("general", "perplexity", 12.0, 12.3, -0.1, 0.7)]


def test_hub_base_goes_into_metadata_with_adapter_tag_eval_results_and_hub_datasets_only(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from sovtune.publish.card import build_card

    run_dir = write_run(
        tmp_path,
        {"name_or_path": HUB_BASE, "revision": "main"},
        manifest_json(False, ["llama3.1"]),
        report_json(REPORT),
    )
    card = ModelCard(str(build_card(run_dir, "acme/support-adapter")))  # parsed back as the hub would
    data = card.data
    assert data.base_model == HUB_BASE
    assert data.library_name == "peft"
    assert f"base_model:adapter:{HUB_BASE}" in data.tags and "qlora" in data.tags
    assert data.license == "llama3.1"
    assert data.datasets == ["acme/faq"]  # the local training file is not a hub dataset
    values = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert values[("eval", "exact_match")] == 0.55
    assert values[("eval", "exact_match_base")] == 0.20
    assert values[("eval", "exact_match_gain")] == pytest.approx(0.35)
    assert values[("general", "perplexity_base")] == 12.0 and values[("general", "perplexity_gain")] == pytest.approx(
        0.3
    )
    gain = next(r for r in data.eval_results if r.metric_type == "exact_match_gain")
    assert gain.metric_args == {"ci_low": 0.30, "ci_high": 0.41}
    assert f"revision `{BASE_COMMIT}`" in card.text and f'"{HUB_BASE}", revision="{BASE_COMMIT}"' in card.text


def test_local_base_stays_out_of_metadata_and_goes_into_the_body(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from sovtune.publish.card import build_card

    run_dir = write_run(tmp_path, {"name_or_path": "/srv/models/llama-8b"}, manifest_json(True), report_json(REPORT))
    text = str(build_card(run_dir, "acme/support-adapter"))
    card = ModelCard(text)
    assert card.data.base_model is None
    assert not any(tag.startswith("base_model:") for tag in card.data.tags)
    # Named by its folder's name: no path of the training machine anywhere in the card (issue 15).
    assert "/srv/models" not in text and "/home/ana" not in text
    assert "a local base model (`llama-8b`, not on a hub; its 1 files are hashed" in card.text
    assert f"`model.safetensors` sha256 `{'ab' * 32}`" in card.text
    # Local data appears by file name and hash only, never its folder.
    assert f"local file `tickets.jsonl` (sha256 `{'12' * 32}`)" in card.text and "/home/ana" not in card.text


def test_body_reports_base_adapter_gain_interval_gates_settings_and_provenance(tmp_path: Path) -> None:
    from sovtune.publish.card import build_card

    results = [*REPORT, metric("general", "loss", 2.0, 2.5, 0.3, 0.7)]
    run_dir = write_run(
        tmp_path, {"name_or_path": HUB_BASE, "revision": "main"}, manifest_json(False), report_json(results)
    )
    text = str(build_card(run_dir, "acme/support-adapter", revision="release"))
    assert "| general | loss | 40 | 2 | 2.5 | +0.5 | [+0.3, +0.7] | worse |" in text  # lower is better
    assert "| eval | exact_match | 40 | 0.2 | 0.55 | +0.35 | [+0.3, +0.41] | better |" in text
    assert "| general | perplexity | 40 | 12 | 12.3 | +0.3 | [-0.1, +0.7] | no significant change |" in text
    assert "95% confidence interval" in text
    assert "- pass: exact_match (eval/exact_match) min_gain 0.05, got 0.35" in text
    for setting in ("| adapter.r | 8 |", "| adapter.target_modules | q_proj, v_proj |", "| quantization.mode | 4bit |",
                    "| train.learning_rate | 0.0001 |", "| train.max_steps | 50 |"):  # fmt: skip
        assert setting in text
    assert "train.epochs" not in text and "adapter.modules_to_save" not in text  # ignored / empty
    assert f"- recipe sha256: `{'cd' * 32}`" in text and "(with uncommitted changes)" in text
    assert "- packages: peft 0.21.0, transformers 5.23.0" in text and "bitsandbytes" not in text
    assert f"- chat template sha256: `{'56' * 32}`" in text and "NVIDIA H100" in text
    assert f"- base model commit: `{BASE_COMMIT}`" in text
    assert 'PeftModel.from_pretrained(base, "acme/support-adapter", revision="release")' in text
    assert "hub dataset `acme/faq` @ `" + "34" * 20 + "`" in text


def test_licence_from_the_recipe_wins_unknown_ids_become_other_and_missing_is_said(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from sovtune.publish.card import build_card

    hub_model = {"name_or_path": HUB_BASE, "revision": "main"}
    first = write_run(tmp_path / "a", {**hub_model, "license": "Apache-2.0"}, manifest_json(False, ["llama3.1"]), None)
    assert ModelCard(str(build_card(first, "acme/x"))).data.license == "apache-2.0"
    second = write_run(tmp_path / "b", hub_model, manifest_json(False, ["acme-internal-1.0"]), None)
    data = ModelCard(str(build_card(second, "acme/x"))).data
    assert data.license == "other" and data.license_name == "acme-internal-1.0"
    third = write_run(tmp_path / "c", hub_model, manifest_json(False), None)
    card = ModelCard(str(build_card(third, "acme/x")))
    assert card.data.license is None and "licence was not declared" in card.text


def test_without_report_the_card_says_so_and_has_no_model_index(tmp_path: Path) -> None:
    from sovtune.publish.card import build_card

    run_dir = write_run(tmp_path, {"name_or_path": HUB_BASE, "revision": "main"}, manifest_json(False), None)
    text = str(build_card(run_dir, "acme/x"))
    assert "model-index" not in text and "was not evaluated against its base model" in text


def test_without_manifest_only_pinned_hub_models_count_as_hub_ids(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from sovtune.publish.card import build_card

    hub_run = write_run(tmp_path / "a", {"name_or_path": HUB_BASE, "revision": "main"}, None, None)
    assert ModelCard(str(build_card(hub_run, "acme/x"))).data.base_model == HUB_BASE
    local_run = write_run(tmp_path / "b", {"name_or_path": "./models/base"}, None, None)
    card = ModelCard(str(build_card(local_run, "acme/x")))
    assert card.data.base_model is None and card.data.datasets is None
    assert "No `manifest.json` was recorded" in card.text


def test_undefined_metric_values_are_left_out_of_the_model_index(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from sovtune.publish.card import build_card

    report = report_json([metric("eval", "exact_match", 0.2, 0.5, 0.1, 0.4)])
    report["results"].append({**report["results"][0], "metric": "perplexity", "base": float("inf")})
    run_dir = write_run(tmp_path, {"name_or_path": HUB_BASE, "revision": "main"}, manifest_json(False), report)
    results = ModelCard(str(build_card(run_dir, "acme/x"))).data.eval_results
    assert {r.metric_type for r in results} == {"exact_match", "exact_match_base", "exact_match_gain"}


def test_damaged_run_files_are_clear_errors(tmp_path: Path) -> None:
    from sovtune.core.rundir import RunFileError as CardError
    from sovtune.publish.card import build_card

    run_dir = write_run(tmp_path, {"name_or_path": HUB_BASE, "revision": "main"}, manifest_json(False), None)
    (run_dir / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CardError, match="manifest.json: unreadable manifest"):
        build_card(run_dir, "acme/x")
    (run_dir / "recipe.yaml").unlink()
    with pytest.raises(CardError, match="recipe.yaml: missing; is .* a run directory"):
        build_card(run_dir, "acme/x")
