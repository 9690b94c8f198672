"""`sovtune check`: recipe, data, tokenizer and architecture checked before any weight is downloaded or trained."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sovtune import model as models
from sovtune import plan
from sovtune.config import Recipe
from sovtune.data import PreparedData, boundary_mismatches, stop_token_ids
from sovtune.errors import SovtuneError
from sovtune.evaluation import HeldOut, check_eval
from sovtune.inputs import prepare_recipe_data
from sovtune.licence import LicenceRefused, check_licence
from sovtune.publish.hub import check_push_settings
from sovtune.scan import describe

ROUND_TRIP_SAMPLE = 200
EMPTY_ANSWERS_WARN = 0.05  # above this share of training rows with empty answers, `check` warns


class PreflightFailed(SovtuneError):
    """A check found something that would silently ruin the run."""


@dataclass
class Finding:
    check: str
    ok: bool
    detail: str
    fatal: bool = True


@dataclass
class PreflightReport:
    recipe: str
    stats: dict[str, Any]
    architecture: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok and f.fatal]

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "ok": not self.failures,
            "data": self.stats,
            "architecture": self.architecture,
            "checks": [vars(finding) for finding in self.findings],
        }


def before_training(recipe: Recipe, tokenizer: Any, data: PreparedData) -> list[str]:
    """What `sovtune run` checks before training starts (and `sovtune check` too): the machine supports the recipe's
    settings, publishing can work, and evaluation can run (eval data read, SQL references executed, user metric
    files imported). Broken settings raise now, not after hours of training; returns warnings worth showing."""
    models.check_device_support(recipe)
    # hub.push without an endpoint or token, or an unusable signing key, fails now, not after training
    check_push_settings(recipe.hub, recipe.base_dir)
    if not recipe.eval.enabled:
        return []
    return check_eval(recipe, tokenizer, HeldOut.from_data(data)).warnings


def check(recipe: Recipe) -> PreflightReport:
    """Every check that needs no weights: tokenizer, data, masks, template, target modules, parameter count."""
    models.check_device_support(recipe)
    models.check_local_weights(recipe)  # headers only: a damaged weight file is found before a training run
    tokenizer = models.load_tokenizer(recipe)
    data = prepare_recipe_data(recipe, tokenizer)
    eval_warnings = before_training(recipe, tokenizer, data)
    report = PreflightReport(recipe=recipe.name, stats=data.stats, architecture=architecture_summary(recipe, tokenizer))
    add = report.findings.append
    train = data.stats["train"]
    add(
        Finding(
            "supervised tokens",
            train["supervised_tokens"] > 0,
            f"{train['supervised_token_fraction']:.1%} of {train['total_tokens']:,} training tokens carry loss",
        )
    )
    add(
        Finding(
            "truncation",
            train["truncation_rate"] < 1.0 or recipe.data.format == "text",
            f"{train['truncation_rate']:.1%} of rows longer than max_length={recipe.data.max_length}",
            fatal=train["truncation_rate"] >= 1.0,
        )
    )
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    add(
        Finding(
            "EOS supervised",
            train["eos_supervised_fraction"] > 0.99,
            f"{train['eos_supervised_fraction']:.1%} of rows train a stop token ({', '.join(stops)})",
            fatal=False,
        )
    )
    add(empty_answers_finding(train))
    add(
        Finding(
            "pad != eos",
            tokenizer.pad_token_id not in stop_token_ids(tokenizer),  # nor the turn terminator (<|im_end|>, ...)
            f"pad={tokenizer.pad_token!r} ({tokenizer.pad_token_id}), "
            f"eos={tokenizer.eos_token!r} ({tokenizer.eos_token_id})"
            + (f", turns end with {', '.join(stops[1:])}" if len(stops) > 1 else ""),
        )
    )
    if recipe.data.format in ("messages", "instruction"):
        add(template_round_trip(data.train[:ROUND_TRIP_SAMPLE], tokenizer))
    if recipe.data.format == "prompt_completion":
        add(boundary_finding(data.eval_examples[:ROUND_TRIP_SAMPLE], tokenizer))
    arch = report.architecture
    if arch.get("missing_modules"):
        detail = f"{arch['missing_modules']} not in {arch['architecture']}; linear layers: {arch['linear_modules']}"
    else:
        detail = f"adapting {', '.join(arch['targeted_modules'])}"
    add(Finding("target modules", not arch.get("missing_modules"), detail))
    add(Finding("eval split", bool(data.eval), f"{len(data.eval)} held-out examples", fatal=False))
    if recipe.eval.enabled:
        add(
            Finding(
                "generation budget",
                not eval_warnings,
                "; ".join(eval_warnings)
                or f"every reference fits in eval.generation.max_new_tokens={recipe.eval.generation.max_new_tokens}",
                fatal=False,
            )
        )
    add(data_scan_finding(data.stats["data_scan"]))
    add(licence_finding(recipe))
    return report


def empty_answers_finding(train: dict[str, Any]) -> Finding:
    """Rows whose every answer is empty teach only where to stop (prepare_data refuses when all are)."""
    empty, kept = train.get("empty_targets", 0), train["kept"]
    share = empty / kept if kept else 0.0
    detail = f"{empty} of {kept} training rows ({share:.1%}) have an empty answer"
    if share > EMPTY_ANSWERS_WARN:
        detail += ": they train only the end-of-turn token; fill them in or drop them"
    return Finding("empty answers", share <= EMPTY_ANSWERS_WARN, detail, fatal=False)


def data_scan_finding(summary: dict[str, Any]) -> Finding:
    """Counts only, never the values; policy block has already stopped in prepare_data."""
    return Finding("data scan", not summary["findings"] or summary["redacted"], describe(summary), fatal=False)


def licence_finding(recipe: Recipe) -> Finding:
    try:
        return Finding("licence", True, check_licence(recipe).describe())
    except LicenceRefused as exc:
        return Finding("licence", False, str(exc))


def template_round_trip(items: list[Any], tokenizer: Any) -> Finding:
    """Training tokens must be the tokenizer's own tokens of the rendered conversation, the ones an inference server
    sees for the same text. A row falls short where a prompt/completion boundary cuts through a token (the template
    ends its prompt in the middle of a word, e.g. with a trailing space before letters that a BPE merges), so the two
    sides had to be tokenised apart."""
    exact = sum(1 for item in items if item.exact)
    share = (len(items) - exact) / len(items) if items else 0.0
    return Finding(
        "chat template round trip",
        share < 0.05,
        f"{exact}/{len(items)} rows tokenise as the whole rendered text does",
        fatal=False,
    )


def boundary_finding(examples: list[Any], tokenizer: Any) -> Finding:
    """prompt_completion: do prompt and completion tokenise the same joined as apart (sovtune tokenises them apart)?"""
    checked, mismatched = boundary_mismatches(examples, tokenizer)
    if not mismatched:
        return Finding(
            "prompt/completion boundary", True, f"{checked}/{checked} held-out rows tokenise the same joined and apart"
        )
    return Finding(
        "prompt/completion boundary",
        False,
        f"{len(mismatched)}/{checked} held-out rows tokenise differently joined than apart (e.g. {mismatched[0]}): "
        "sovtune trains and scores the completion tokenised alone, as generation produces it; tools that tokenise "
        "prompt + completion together (lm-evaluation-harness) score other tokens. Move whitespace between the end of "
        "the prompt (or data.separator) and the start of the completion until the boundary falls between tokens "
        "(docs/evaluation.md)",
        fatal=False,
    )


def architecture_summary(recipe: Recipe, tokenizer: Any) -> dict[str, Any]:
    """Build the model on the meta device from its config alone: module names and the trainable parameter count."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(recipe.model_location, **models._hub_kwargs(recipe))
        meta = models.meta_model(config, trust_remote_code=recipe.model.trust_remote_code)
    except models.loading_errors() as exc:
        raise models._loading_error("config", recipe, exc) from None
    if len(tokenizer) > meta.get_input_embeddings().weight.shape[0]:
        meta.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    total = sum(p.numel() for p in meta.parameters())
    summary: dict[str, Any] = {
        "architecture": type(meta).__name__,
        "parameters": total,
        "linear_modules": sorted(models.linear_module_names(meta)),
    }
    try:
        models.check_target_modules(meta, recipe)
    except models.ModelError:
        targets = recipe.adapter.target_modules
        available = {name.rsplit(".", 1)[-1] for name, _ in meta.named_modules()}
        summary["missing_modules"] = sorted(set(targets) - available)
        return summary
    trainable, targeted = adapter_size(meta, recipe)
    summary["targeted_modules"] = targeted
    summary["trainable_parameters"] = trainable
    summary["trainable_share"] = trainable / total if total else 0.0
    return summary


def adapter_size(meta: Any, recipe: Recipe) -> tuple[int, list[str]]:
    """Trainable parameters of the recipe's adapter and the module names it adapts, from the layer shapes alone.

    The planner's count (`sovtune plan`), which tests hold equal to peft's get_peft_model: importing peft to count
    would cost ~2.8 s of `sovtune check`'s 10 s budget.
    """
    arch = plan.architecture_from_model(meta, meta.config, recipe.model.name_or_path, "config")
    settings = plan.Settings.from_recipe(recipe, device="cpu")
    trainable = sum(elements for elements, _ in plan.trainable_tensors(arch, settings))
    return trainable, plan.target_module_names(arch, settings)


def raise_on_failures(report: PreflightReport) -> None:
    if report.failures:
        first = report.failures[0]
        more = f" (+{len(report.failures) - 1} more failed checks)" if len(report.failures) > 1 else ""
        raise PreflightFailed(f"check failed: {first.check}: {first.detail}{more}")
