"""Base vs adapter on the same held-out data, in one process on one loaded model, into a report.

The adapter is switched off with peft's `disable_adapter()` for the base pass and on again for the tuned pass, batch
by batch, so both models see identical inputs and nothing is loaded twice. Every metric is kept per example for the
paired bootstrap in metrics.py; report.py turns the comparisons into report.json/md/png and checks the gates.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
import re
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from sovtune import metrics as scoring
from sovtune import model as models
from sovtune import report as reports
from sovtune.config import GENERAL_DATASET, LOSS_METRICS, DataSection, EvalDataset, Recipe, load_recipe
from sovtune.core.hashing import now
from sovtune.core.rundir import RunDir
from sovtune.data import (
    IGNORE_INDEX,
    Example,
    PreparedData,
    SplitStats,
    Tokenized,
    document_of,
    load_examples,
    load_held_out,
    prepare_data,
    prompt_token_ids,
    split_windows,
    stop_token_ids,
    tokenize,
    tokenize_split,
)
from sovtune.errors import DataError, GateFailed, SovtuneError
from sovtune.run.lock import RunLock
from sovtune.run.manifest import record_eval

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def inference_mode(function: Callable[..., Any]) -> Callable[..., Any]:
    """torch.inference_mode() as a decorator, with torch imported when the function first runs."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return function(*args, **kwargs)

    return wrapper


@dataclass
class EvalItem:
    """One held-out example, prepared for both passes before the model is loaded."""

    origin: str
    tokens: Tokenized | None  # teacher-forced input with completion-only labels (loss metrics)
    prompt_ids: list[int] = field(default_factory=list)  # where generation starts
    reference: str = ""
    row: dict[str, Any] = field(default_factory=dict)
    shown_prompt: str = ""  # what report.md shows: the last user message or the raw prompt
    choices: list[list[int]] = field(default_factory=list)  # multiple_choice: token ids of each option
    answer: int = -1  # multiple_choice: index of the correct option
    sql_rows: list[tuple[Any, ...]] | None = None  # sql_execution: the reference's result
    prompt_truncated: bool = False
    # The document this item is (a window of): windows of one document are resampled together, never apart.
    document: str = ""

    def __post_init__(self) -> None:
        self.document = self.document or document_of(self.origin)


@dataclass
class Suite:
    """A dataset with its metrics and scorers: everything that can fail on bad input fails here, before any model."""

    name: str
    items: list[EvalItem]
    metrics: list[str]
    higher_is_better: dict[str, bool]
    scorers: dict[str, Callable[[str, EvalItem], float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    cut_off: str = ""  # references longer than the generation budget: they can never match

    @property
    def needs_generation(self) -> bool:
        return bool(self.scorers)


@dataclass
class PairedScores:
    base: scoring.Scores
    tuned: scoring.Scores
    # Generation metrics: the tuned model's most frequent output given as the answer to every example, scored alike.
    constant: scoring.Scores | None = None


@dataclass
class SuiteOutcome:
    name: str
    scores: dict[str, PairedScores]
    higher_is_better: dict[str, bool]
    examples: list[dict[str, Any]]
    notes: list[str]
    seconds: dict[str, float]
    outputs: dict[str, Any] = field(default_factory=dict)  # generation: distinct outputs, the most frequent one


@dataclass
class HeldOut:
    """The held-out examples a training run recorded: their origins in evaluation order, and why others were dropped."""

    origins: list[str]
    dropped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_run(cls, run_dir: Path) -> HeldOut | None:
        """What `sovtune train` recorded in the run directory; None for a run that recorded none."""
        run = RunDir(run_dir)
        origins = run.heldout()
        if origins is None:
            return None
        return cls(origins, dict(((run.data_stats() or {}).get("eval") or {}).get("dropped") or {}))

    @classmethod
    def from_data(cls, prepared: PreparedData) -> HeldOut:
        return cls([example.origin for example in prepared.eval_examples], dict(prepared.stats["eval"]["dropped"]))


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def evaluate(
    recipe: Recipe | str | Path,
    run_dir: str | Path | None = None,
    adapter_dir: str | Path | None = None,
    write: bool = True,
    held_out: HeldOut | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle_adapter: bool = False,
) -> Any:
    """Evaluate the adapter against its base; write report.json/md/png and eval_predictions.jsonl.

    The report goes into `out_dir`, by default the run directory; a report already there is replaced only with
    `overwrite` (checked before any model loads). `held_out` names the rows of the recipe's held-out split (what
    training recorded); without it the split is made again from the data. Raises GateFailed (exit 3, with the report
    as `.report`) after the report is written when a gate in `eval.gates` fails. `allow_pickle_adapter`: the command
    line's --allow-pickle-weights (safetensors only otherwise).
    """
    recipe = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    run_dir = Path(run_dir) if run_dir is not None else recipe.run_dir
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else RunDir(run_dir).adapter_dir
    if not (adapter_dir / RunDir.ADAPTER_CONFIG).is_file():
        raise SovtuneError(
            f"{adapter_dir}: no adapter_config.json; train first (sovtune train) or point --adapter at a peft adapter"
        )
    target = Path(out_dir) if out_dir is not None else run_dir
    if write and _inside(target, adapter_dir):
        # Files added to an adapter folder make its run fail verification (and travel with every push and export).
        raise ReportExists(
            f"{target}: --out is inside the adapter folder {adapter_dir}; give --out a folder of its own"
        )
    models.check_adapter_files(adapter_dir, allow_pickle_adapter)
    # No second writer of the report's folder meanwhile (a training with --overwrite, another eval).
    with RunLock(target, enabled=write):
        if write:
            refuse_existing_report(target, overwrite)
        return _evaluate(recipe, run_dir, adapter_dir, target if write else None, held_out, allow_pickle_adapter)


class ReportExists(SovtuneError):
    """A report is already where this one would go."""


def _inside(path: Path, folder: Path) -> bool:
    real, outer = path.resolve(), folder.resolve()
    return real == outer or outer in real.parents


def refuse_existing_report(target: Path, overwrite: bool) -> None:
    """A report (or a file where the folder should be) is never replaced by accident: say how to keep both."""
    if target.exists() and not target.is_dir():
        raise ReportExists(f"{target}: is a file, not a folder; give --out a folder for the report")
    present = [name for name in RunDir.REPORT_FILES if (target / name).exists()]
    if present and not overwrite:
        raise ReportExists(
            f"{target / present[0]}: a report is already there; write this one elsewhere with --out DIR, "
            "or replace it with --overwrite"
        )


def _evaluate(
    recipe: Recipe,
    run_dir: Path,
    adapter_dir: Path,
    target: Path | None,
    held_out: HeldOut | None,
    allow_pickle: bool = False,
) -> Any:
    started, started_at = time.perf_counter(), now()
    tokenizer = models.load_adapter_tokenizer(recipe, adapter_dir)
    suites = prepare_suites(recipe, tokenizer, held_out)
    try:
        model = models.load_adapted_model(recipe, tokenizer, adapter_dir, allow_pickle)
        check_context(getattr(model.config.get_text_config(), "max_position_embeddings", None), suites, recipe)
        outcomes = [run_suite(model, tokenizer, suite, recipe) for suite in suites]
    finally:
        for suite in suites:
            for close in suite.closers:
                close()
    report = reports.build_report(
        recipe,
        outcomes,
        adapter_dir=adapter_dir,
        seconds=time.perf_counter() - started,
        training_data=training_sources(run_dir),
    )
    if target is not None:
        written = report.write(target)
        # The manifest records the run's own report; one written elsewhere (--out) or into a folder sovtune did not
        # train (no manifest) is not part of the run's provenance.
        if _same_folder(target, run_dir) and (RunDir(run_dir) / RunDir.MANIFEST).is_file():
            record_eval(run_dir, report.to_json(), written, started_at)
    log.info("%s", report.summary_text(), extra={"renderable": report})
    failed = [gate for gate in report.gates if not gate.passed]
    if failed:
        where = target / RunDir.REPORT_MD if target is not None else "the report"
        error = GateFailed("gate failed: " + "; ".join(gate.describe() for gate in failed) + f" (see {where})")
        error.report = report
        raise error
    return report


def _same_folder(first: Path, second: Path) -> bool:
    return first.resolve() == second.resolve()


SOURCE_FIELDS = {"source": str, "format": str, "examples": int, "per_epoch": int, "share": float, "tokens": int}


def training_sources(run_dir: Path) -> list[dict[str, Any]]:
    """What each training source gave an epoch, as training recorded it (data_stats.json); [] when the run recorded
    none or the file does not hold it in that shape (a run folder from elsewhere is data, not trusted to be right)."""
    stats = RunDir(run_dir).data_stats() or {}
    sources = stats.get("train", {}).get("sources") if isinstance(stats.get("train"), dict) else None
    if not isinstance(sources, list):
        return []
    return [
        source
        for source in sources
        if isinstance(source, dict)
        and all(isinstance(source.get(key), kind) or (kind is float and isinstance(source.get(key), int))
                for key, kind in SOURCE_FIELDS.items())
        and isinstance(source.get("token_share"), (int, float))
        and (source.get("weight") is None or isinstance(source.get("weight"), (int, float)))
    ]  # fmt: skip


@dataclass
class EvalCheck:
    """What `check_eval` found: examples per dataset, and warnings worth showing before training starts."""

    examples: dict[str, int]
    warnings: list[str] = field(default_factory=list)


def check_eval(recipe: Recipe, tokenizer: Any = None, held_out: HeldOut | None = None) -> EvalCheck:
    """Everything evaluation needs except the model: data read, references executed, user metrics imported.

    Run before training so a broken eval setting fails in seconds, not after hours. `tokenizer` defaults to the
    recipe's.
    """
    tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(recipe)
    suites = prepare_suites(recipe, tokenizer, held_out)
    for suite in suites:
        for close in suite.closers:
            close()
    if recipe.eval.general is not None:
        check_context(models.context_length(recipe), suites, recipe)
    return EvalCheck(
        examples={suite.name: len(suite.items) for suite in suites},
        warnings=[f"eval dataset {suite.name!r}: {suite.cut_off}" for suite in suites if suite.cut_off],
    )


# ---------------------------------------------------------------------------------------------------------------
# During training (train.eval_steps): the tuned model alone, on the sample the final evaluation scores


@dataclass
class TrainingEval:
    """What in-training evaluation scores: held-out sequences (the seeded sample of eval.max_examples that the final
    evaluation uses) and the prompts of `train.eval_samples` of them, for sample generations."""

    sequences: list[Tokenized]
    prompts: list[EvalItem]


def training_eval(recipe: Recipe, data: PreparedData, tokenizer: Any) -> TrainingEval:
    held_out = next((dataset for dataset in recipe.eval.datasets if dataset.source is None), None)
    cap = (held_out.max_examples if held_out is not None else None) or recipe.eval.max_examples
    items = _sample([EvalItem(origin=tokens.origin, tokens=tokens) for tokens in data.eval], cap,
                    recipe.eval.bootstrap.seed, [])  # fmt: skip
    by_origin = {example.origin: example for example in data.eval_examples}
    prompts = [
        _item(item.tokens, by_origin[item.document], tokenizer, recipe.data.max_length)
        for item in items[: recipe.train.eval_samples]
        if item.tokens is not None and recipe.data.format != "text"
    ]
    return TrainingEval([item.tokens for item in items if item.tokens is not None], prompts)


def held_out_metrics(model: Any, sequences: Sequence[Tokenized], batch_size: int) -> dict[str, float]:
    """Token-weighted loss and accuracy of `model` as it is (batched, length-sorted): sums over every supervised
    token, so the figure does not depend on how examples are batched or on the number of processes."""
    sums = teacher_forced_sums(model, sequences, batch_size)
    tokens = float(sums.tokens.sum())
    return {
        "eval_loss": float(sums.nll.sum()) / tokens,
        "eval_token_accuracy": float(sums.correct.sum()) / tokens,
        "eval_examples": len(sequences),
    }


def sample_generations(model: Any, tokenizer: Any, prompts: Sequence[EvalItem], recipe: Recipe) -> list[dict[str, str]]:
    """The model's answers (greedy unless eval.generation samples) to a few held-out prompts."""
    if not prompts:
        return []
    settings = recipe.eval.generation
    config = generation_config(tokenizer, recipe)
    generated = generate_batch(model, [item.prompt_ids for item in prompts], config, tokenizer, seed=settings.seed)
    return [
        {"origin": item.origin, "prompt": item.shown_prompt, "reference": item.reference,
         "output": decode(tokenizer, ids, settings.stop)}
        for item, ids in zip(prompts, generated)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Model and tokenizer


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def both_models(model: Any) -> Iterator[tuple[str, Any]]:
    """('base', adapter off) then ('tuned', adapter on), on the same weights in memory."""
    yield "base", model.disable_adapter()
    yield "tuned", nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Data: recipe datasets -> suites


def prepare_suites(recipe: Recipe, tokenizer: Any, held_out: HeldOut | None = None) -> list[Suite]:
    suites = [prepare_dataset(recipe, tokenizer, dataset, held_out) for dataset in recipe.eval.datasets]
    if recipe.eval.general is not None:
        suites.append(prepare_general(recipe, tokenizer))
    return suites


def eval_view(data: DataSection, data_format: str, columns: dict[str, str]) -> DataSection:
    """The data settings as seen by one eval dataset: its format and columns, and loss on completions only (the domain
    gain is in the answers, whatever the training objective was)."""
    return data.model_copy(update={"format": data_format, "columns": columns, "train_on_inputs": False})


def prepare_dataset(recipe: Recipe, tokenizer: Any, dataset: EvalDataset, held_out: HeldOut | None = None) -> Suite:
    data_format = dataset.format or recipe.data.format
    columns = dataset.columns if dataset.columns is not None else recipe.data.columns
    view = eval_view(recipe.data, data_format, columns)
    policy = recipe.sovereignty.data_scan
    if dataset.source is None and held_out is not None:
        examples, tokenized, stats = load_held_out(
            view, tokenizer, held_out.origins, base_dir=recipe.base_dir, scan_policy=policy
        )
        dropped = {**held_out.dropped, **stats.dropped}
        notes = [f"{count} rows dropped: {reason}" for reason, count in dropped.items()]
        source_name = "held-out split of data" if recipe.data.eval is None else recipe.data.eval.path
    elif dataset.source is None:
        prepared = prepare_data(view, tokenizer, base_dir=recipe.base_dir, seed=recipe.train.seed, scan_policy=policy)
        examples, tokenized, notes = prepared.eval_examples, prepared.eval, _drop_notes(prepared.stats.get("eval", {}))
        source_name = "held-out split of data" if recipe.data.eval is None else recipe.data.eval.path
    else:
        stats = SplitStats()
        examples = load_examples([dataset.source], view, tokenizer, stats, recipe.base_dir)
        tokenized = tokenize_split(examples, view, tokenizer, stats)
        notes, source_name = _drop_notes(stats.summary()), dataset.source.path
    if not tokenized:
        raise DataError(
            f"eval dataset {dataset.name!r} ({source_name}): no usable rows; check its path, format and columns"
        )
    # Text windows have no prompt: they get loss metrics only (the recipe check forbids the others).
    by_origin = {example.origin: example for example in examples} if data_format != "text" else {}
    items = [
        _item(token_row, by_origin.get(document_of(token_row.origin)), tokenizer, recipe.data.max_length)
        for token_row in tokenized
    ]
    items = _sample(items, dataset.max_examples or recipe.eval.max_examples, recipe.eval.bootstrap.seed, notes)
    truncated = sum(item.prompt_truncated for item in items)
    if truncated:
        notes.append(f"{truncated} prompts longer than data.max_length={recipe.data.max_length} lost their beginning")
    suite = Suite(
        name=dataset.name,
        items=items,
        metrics=dataset.metric_names(),
        higher_is_better={metric: dataset.higher_is_better(metric) for metric in dataset.metric_names()},
        notes=notes,
    )
    _add_scorers(suite, dataset, recipe)
    if suite.needs_generation:
        suite.cut_off = generation_cut_off(items, tokenizer, recipe.eval.generation.max_new_tokens)
        if suite.cut_off:
            suite.notes.append(suite.cut_off)
    if "multiple_choice" in dataset.metrics:
        for item in items:
            _attach_choices(item, dataset, tokenizer)
    return suite


def generation_cut_off(items: list[EvalItem], tokenizer: Any, max_new_tokens: int) -> str:
    """Say how many references do not fit in `max_new_tokens` (answer plus its stop token): cut off at the budget,
    such answers score zero on every generation metric however good the model is. Empty when all fit."""
    needed = [len(tokenizer(item.reference, add_special_tokens=False)["input_ids"]) + 1 for item in items]
    over = [count for count in needed if count > max_new_tokens]
    if not over:
        return ""
    return (
        f"{len(over)} of {len(needed)} references need more than eval.generation.max_new_tokens={max_new_tokens} "
        f"tokens (longest {max(over)} with its stop token) and cannot match; raise it to at least {max(over)}"
    )


def prepare_general(recipe: Recipe, tokenizer: Any) -> Suite:
    """General text for the forgetting check: perplexity per document, every token scored.

    Each document is scored whole, or in consecutive windows of `eval.general.window` tokens when longer: a fixed
    size, so the figure does not move with `data.max_length`. The windows of a document stay one example: the
    bootstrap resamples documents, not windows, which are not independent.
    """
    general = recipe.eval.general
    assert general is not None
    view = eval_view(recipe.data, general.format, general.columns)
    stats = SplitStats()
    examples = load_examples([general], view, tokenizer, stats, recipe.base_dir)
    notes = _drop_notes(stats.summary())
    documents = [EvalItem(origin=example.origin, tokens=None) for example in examples]
    kept = {item.origin for item in _sample(documents, general.max_examples or recipe.eval.max_examples,
                                            recipe.eval.bootstrap.seed, notes)}  # fmt: skip
    items = [
        EvalItem(origin=window.origin, tokens=window, document=example.origin)
        for example in examples
        if example.origin in kept
        for window in split_windows(tokenize(example, tokenizer, max_length=10**9), general.window)
        if any(label != IGNORE_INDEX for label in window.labels[1:])
    ]
    if not items:
        raise DataError(f"eval.general ({general.path}): no usable text; check its path, format and columns")
    windowed = len(items) - len({item.document for item in items})
    if windowed:
        notes.append(
            f"{len(kept)} documents scored in {len(items)} windows of at most eval.general.window={general.window} "
            "tokens; resampled by document"
        )
    return Suite(
        name=GENERAL_DATASET, items=items, metrics=["perplexity"], higher_is_better={"perplexity": False}, notes=notes
    )


def check_context(limit: int | None, suites: Sequence[Suite], recipe: Recipe) -> None:
    """General text is scored in windows of eval.general.window tokens: no longer than the base model's context
    (`limit`, its max_position_embeddings; None when unknown)."""
    for suite in suites:
        if suite.name != GENERAL_DATASET or limit is None or recipe.eval.general is None:
            continue
        longest = max(len(item.tokens.input_ids) for item in suite.items if item.tokens is not None)
        if longest > limit:
            raise SovtuneError(
                f"eval.general: a window of {longest} tokens is longer than the base model's context ({limit} "
                f"positions); set eval.general.window to at most {limit} "
                f"(eval.general: {{path: {recipe.eval.general.path}, window: {limit}}})"
            )


def _drop_notes(summary: dict[str, Any]) -> list[str]:
    return [f"{count} rows dropped: {reason}" for reason, count in (summary.get("dropped") or {}).items()]


def _sample(items: list[EvalItem], cap: int | None, seed: int, notes: list[str]) -> list[EvalItem]:
    """A seeded sample of `cap` documents (all windows of each kept document), in the original order."""
    documents = list(dict.fromkeys(item.document for item in items))
    if cap is None or len(documents) <= cap:
        return items
    keep = {documents[index] for index in random.Random(seed).sample(range(len(documents)), cap)}
    notes.append(f"evaluated a seeded sample of {cap} of {len(documents)} examples")
    return [item for item in items if item.document in keep]


def _item(tokens: Tokenized, example: Example | None, tokenizer: Any, max_length: int) -> EvalItem:
    if example is None:  # text windows: loss metrics only
        return EvalItem(origin=tokens.origin, tokens=tokens)
    prompt = prompt_token_ids(example, tokenizer)
    return EvalItem(
        origin=example.origin,
        tokens=tokens,
        # Generation continues from the end of the prompt, so long prompts lose their beginning, never their end.
        prompt_ids=prompt[-max_length:],
        prompt_truncated=len(prompt) > max_length,
        reference=example.reference,
        row=example.row,
        shown_prompt=_shown_prompt(example),
    )


def _shown_prompt(example: Example) -> str:
    messages = example.row.get("messages") if isinstance(example.row, dict) else None
    if isinstance(messages, list):
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    return example.prompt


def _add_scorers(suite: Suite, dataset: EvalDataset, recipe: Recipe) -> None:
    for metric in dataset.metrics:
        if metric in scoring.TEXT_METRICS:
            suite.scorers[metric] = _text_scorer(scoring.TEXT_METRICS[metric])
    if "regex" in dataset.metrics:
        pattern = re.compile(dataset.regex or "")
        suite.scorers["regex"] = lambda prediction, item: scoring.regex_match(prediction, item.reference, pattern)
    if "sql_execution" in dataset.metrics:
        executor = scoring.SqlExecutor(recipe.resolve(dataset.database or ""), timeout_s=dataset.sql_timeout_s)
        suite.closers.append(executor.close)
        for item in suite.items:
            item.sql_rows = executor.reference_result(item.reference, item.origin)
        suite.scorers["sql_execution"] = lambda prediction, item: executor.score(
            prediction, item.reference, item.sql_rows or []
        )
    for user in dataset.user_metrics:
        function = scoring.load_user_function(
            recipe.resolve(user.module), user.function, f"eval.user_metrics.{user.name}"
        )
        suite.scorers[user.name] = _user_scorer(function, f"{user.module}:{user.function}")


def _text_scorer(function: Callable[[str, str], float]) -> Callable[[str, EvalItem], float]:
    return lambda prediction, item: function(prediction, item.reference)


def _user_scorer(function: Callable[..., Any], where: str) -> Callable[[str, EvalItem], float]:
    return lambda prediction, item: scoring.call_user_metric(
        function, prediction, item.reference, item.row, f"{where} on {item.origin}"
    )


def _attach_choices(item: EvalItem, dataset: EvalDataset, tokenizer: Any) -> None:
    choices = item.row.get(dataset.choices_column)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(
            f"{item.origin}: multiple_choice needs column {dataset.choices_column!r} with a list of at least two "
            "non-empty option strings; set eval.datasets[].choices_column"
        )
    answer = item.row.get(dataset.answer_column, item.reference)
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise DataError(f"{item.origin}: {dataset.answer_column!r} must be an option index or the option text")
    if isinstance(answer, int):
        index = answer
    else:
        stripped = [choice.strip() for choice in choices]
        index = stripped.index(answer.strip()) if answer.strip() in stripped else -1
    if not 0 <= index < len(choices):
        raise DataError(
            f"{item.origin}: answer {answer!r} is not one of the {len(choices)} options in {dataset.choices_column!r}"
        )
    item.choices = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
    item.answer = index


# ---------------------------------------------------------------------------------------------------------------
# Running a suite on both models


def run_suite(model: Any, tokenizer: Any, suite: Suite, recipe: Recipe) -> SuiteOutcome:
    settings = recipe.eval
    scores: dict[str, PairedScores] = {}
    seconds: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    # One record (and one bootstrap unit) per document: a long text's windows are summed, never resampled apart.
    owners, documents = document_index(suite.items)
    first = {owner: index for index, owner in reversed(list(enumerate(owners)))}
    records = [_record(suite.items[first[number]], document) for number, document in enumerate(documents)]
    loss_metrics = [metric for metric in suite.metrics if metric in LOSS_METRICS]
    if loss_metrics:
        started = time.perf_counter()
        sequences = [item.tokens for item in suite.items]  # every item of a loss suite has tokens
        sums = {
            name: teacher_forced_sums(model, sequences, settings.batch_size, context).grouped(owners, len(documents))
            for name, context in both_models(model)
        }
        seconds["loss"] = time.perf_counter() - started
        _refuse_non_finite(sums, suite.name)
        for metric in loss_metrics:
            scores[metric] = PairedScores(*(loss_scores(metric, sums[name]) for name in ("base", "tuned")))
        for index, record in enumerate(records):
            record["loss"] = {name: float(sums[name].nll[index] / sums[name].tokens[index]) for name in sums}
            # What token-weighted metrics are made of, so runs can later be compared example by example.
            record["token_sums"] = {
                "tokens": int(sums["base"].tokens[index]),
                "nll": {name: float(sums[name].nll[index]) for name in sums},
                "correct": {name: int(sums[name].correct[index]) for name in sums},
            }
    if suite.needs_generation or "multiple_choice" in suite.metrics:
        assert len(documents) == len(suite.items), "prompts are never split into windows"
    if "multiple_choice" in suite.metrics:
        started = time.perf_counter()
        scores["multiple_choice"] = multiple_choice_scores(model, suite.items, settings.batch_size)
        seconds["multiple_choice"] = time.perf_counter() - started
        for index, record in enumerate(records):
            record.setdefault("scores", {})["multiple_choice"] = {
                "base": float(scores["multiple_choice"].base.numerators[index]),
                "tuned": float(scores["multiple_choice"].tuned.numerators[index]),
            }
    if suite.needs_generation:
        started = time.perf_counter()
        predictions = generate_both(model, tokenizer, [item.prompt_ids for item in suite.items], recipe)
        seconds["generation"] = time.perf_counter() - started
        outputs = output_diversity(predictions)
        scores.update(score_generations(suite, predictions, outputs["most_frequent"]["text"], records))
    ordered = {metric: scores[metric] for metric in suite.metrics}
    return SuiteOutcome(suite.name, ordered, suite.higher_is_better, records, suite.notes, seconds, outputs)


def document_index(items: Sequence[EvalItem]) -> tuple[list[int], list[str]]:
    """For each item the number of its document, and the documents in order of first appearance."""
    numbers: dict[str, int] = {}
    owners = [numbers.setdefault(item.document, len(numbers)) for item in items]
    return owners, list(numbers)


def _refuse_non_finite(sums: dict[str, TokenSums], suite: str) -> None:
    import torch

    for name, totals in sums.items():
        if not bool(torch.isfinite(totals.nll).all()):
            raise SovtuneError(
                f"eval dataset {suite!r}: the {name} model gives non-finite losses (NaN/inf logits, often a "
                "float16 overflow); set model.dtype: bfloat16 or float32"
            )


def output_diversity(predictions: dict[str, list[str]]) -> dict[str, Any]:
    """How many different answers each model gave, and the tuned model's most frequent one (the constant baseline).

    Ties go to the answer seen first, so the choice is deterministic.
    """
    text, count = Counter(predictions["tuned"]).most_common(1)[0]
    return {
        "n": len(predictions["tuned"]),
        "distinct": {name: len(set(answers)) for name, answers in predictions.items()},
        "most_frequent": {"text": text, "count": count},
    }


def score_generations(
    suite: Suite, predictions: dict[str, list[str]], constant: str, records: list[dict[str, Any]]
) -> dict[str, PairedScores]:
    """Every generation metric for base, tuned and the constant baseline (the tuned model's most frequent answer given
    for every example): a gain the constant also gets is a gain in form, not in content."""
    answers = {**predictions, "constant": [constant] * len(suite.items)}
    per_metric: dict[str, dict[str, list[float]]] = {metric: {name: [] for name in answers} for metric in suite.scorers}
    for index, item in enumerate(suite.items):
        records[index]["predictions"] = {name: predictions[name][index] for name in predictions}
        records[index].setdefault("scores", {})
        for metric, scorer in suite.scorers.items():
            values = {name: scorer(answers[name][index], item) for name in answers}
            records[index]["scores"][metric] = values
            for name, value in values.items():
                per_metric[metric][name].append(value)
    return {
        metric: PairedScores(*(scoring.Scores.mean(values[name]) for name in ("base", "tuned", "constant")))
        for metric, values in per_metric.items()
    }


def _record(item: EvalItem, document: str) -> dict[str, Any]:
    return {"origin": document, "prompt": item.shown_prompt, "reference": item.reference}


@dataclass
class TokenSums:
    """Per-sequence sums over supervised tokens from one teacher-forced pass."""

    nll: torch.Tensor  # sum of negative log-likelihoods (nats)
    tokens: torch.Tensor  # number of supervised tokens
    correct: torch.Tensor  # tokens whose argmax prediction is the label

    def grouped(self, owners: Sequence[int], groups: int) -> TokenSums:
        """Sums per group (document) instead of per sequence (window): `owners[i]` is sequence i's group."""
        import torch

        if len(owners) == groups:  # every sequence is its own document
            return self
        index = torch.tensor(list(owners))
        return TokenSums(*(torch.zeros(groups, dtype=torch.float64).index_add_(0, index, values)
                           for values in (self.nll, self.tokens, self.correct)))  # fmt: skip


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by length (longest first, so a memory problem shows on the first batch): little padding."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@inference_mode
def teacher_forced_sums(model: Any, sequences: Sequence[Tokenized], batch_size: int, context: Any = None) -> TokenSums:
    """NLL, token count and correct count per sequence, over the positions whose label is supervised.

    Only those positions are projected to the vocabulary (`logits_to_keep` mask): the prompt's logits, often most
    of the sequence, are never materialised.
    """
    import torch

    device = model_device(model)
    n = len(sequences)
    nll, tokens, correct = (
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
    )
    pad_id = _pad_id(model)
    slicing = supports_logits_to_keep(model)
    with context if context is not None else nullcontext():
        for batch in length_batches([len(sequence.input_ids) for sequence in sequences], batch_size):
            width = max(len(sequences[index].input_ids) for index in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                length = len(sequences[index].input_ids)
                input_ids[row, :length] = torch.tensor(sequences[index].input_ids)
                labels[row, :length] = torch.tensor(sequences[index].labels)
                attention[row, :length] = 1
            targets = labels[:, 1:]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != IGNORE_INDEX
            if slicing:
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), logits_to_keep=keep.to(device)
                ).logits
            else:
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[
                    keep.to(device)
                ]
            gold = targets[keep[:, :-1]].to(device)
            logits = logits.reshape(-1, logits.shape[-1]).float()
            token_nll = torch.nn.functional.cross_entropy(logits, gold, reduction="none").double().cpu()
            token_correct = (logits.argmax(-1) == gold).double().cpu()
            rows = torch.tensor(batch)[keep.nonzero()[:, 0]]
            nll.index_add_(0, rows, token_nll)
            tokens.index_add_(0, rows, torch.ones_like(token_nll))
            correct.index_add_(0, rows, token_correct)
    return TokenSums(nll, tokens, correct)


def supports_logits_to_keep(model: Any) -> bool:
    """transformers models take `logits_to_keep`; older remote-code models may not, and get full logits instead."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _pad_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def loss_scores(metric: str, sums: TokenSums) -> scoring.Scores:
    """Token-weighted: loss = sum NLL / sum tokens; perplexity = exp of it; accuracy = sum correct / sum tokens."""
    if metric == "token_accuracy":
        return scoring.Scores(sums.correct.numpy(), sums.tokens.numpy(), "ratio")
    return scoring.Scores(sums.nll.numpy(), sums.tokens.numpy(), "exp_ratio" if metric == "perplexity" else "ratio")


def multiple_choice_scores(model: Any, items: Sequence[EvalItem], batch_size: int) -> PairedScores:
    """Pick the option with the highest total log-likelihood after the prompt; all options of all items in one pass."""
    sequences, owners = [], []
    for index, item in enumerate(items):
        for option in item.choices:
            sequences.append(
                Tokenized(item.prompt_ids + option, [IGNORE_INDEX] * len(item.prompt_ids) + option, item.origin)
            )
            owners.append(index)
    result = {}
    for name, context in both_models(model):
        loglik = -teacher_forced_sums(model, sequences, batch_size, context).nll
        best: dict[int, tuple[float, int]] = {}
        first: dict[int, int] = {}
        for position, owner in enumerate(owners):
            first.setdefault(owner, position)
        for position, owner in enumerate(owners):
            choice = position - first[owner]
            if owner not in best or loglik[position] > best[owner][0]:
                best[owner] = (float(loglik[position]), choice)
        result[name] = scoring.Scores.mean([float(best[i][1] == item.answer) for i, item in enumerate(items)])
    return PairedScores(result["base"], result["tuned"])


# ---------------------------------------------------------------------------------------------------------------
# Generation


def generation_config(tokenizer: Any, recipe: Recipe) -> Any:
    """A fresh config, so sampling defaults shipped with a checkpoint never leak into a 'greedy' evaluation."""
    from transformers import GenerationConfig

    settings = recipe.eval.generation
    sampling = (
        {"temperature": settings.temperature or 1.0, "top_p": settings.top_p or 1.0} if settings.do_sample else {}
    )
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=settings.stop or None,
        use_cache=True,
        **sampling,
    )


def generate_both(model: Any, tokenizer: Any, prompts: Sequence[list[int]], recipe: Recipe) -> dict[str, list[str]]:
    """Base and tuned answers to every prompt, decoded and cut at the stop strings."""
    settings = recipe.eval.generation
    config = generation_config(tokenizer, recipe)
    outputs = generate_ids_both(model, prompts, config, settings.batch_size, tokenizer, settings.seed)
    return {name: [decode(tokenizer, ids, settings.stop) for ids in outputs[name]] for name in outputs}


def generate_ids_both(
    model: Any, prompts: Sequence[list[int]], config: Any, batch_size: int, tokenizer: Any = None, seed: int = 0
) -> dict[str, list[list[int]]]:
    """New token ids for every prompt from base and tuned, batch by batch on the same left-padded tensors."""
    outputs: dict[str, list[list[int]]] = {"base": [[] for _ in prompts], "tuned": [[] for _ in prompts]}
    for number, batch in enumerate(length_batches([len(prompt) for prompt in prompts], batch_size)):
        for name, context in both_models(model):
            with context:
                generated = generate_batch(model, [prompts[i] for i in batch], config, tokenizer, seed=seed + number)
            for index, ids in zip(batch, generated):
                outputs[name][index] = ids
    return outputs


@inference_mode
def generate_batch(
    model: Any, prompts: Sequence[list[int]], config: Any, tokenizer: Any = None, seed: int = 0
) -> list[list[int]]:
    """New token ids per prompt: left padding (so every prompt ends where generation starts), KV cache, trimmed at
    the first stop token."""
    import torch

    device = model_device(model)
    width = max(len(prompt) for prompt in prompts)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    torch.manual_seed(seed)  # sampling only; greedy ignores it
    extra = {"tokenizer": tokenizer} if config.stop_strings else {}
    generated = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config, **extra
    )
    stops = set(_as_list(config.eos_token_id)) | {pad_id}
    out = []
    for row in generated[:, width:].tolist():
        end = next((position for position, token in enumerate(row) if token in stops), len(row))
        out.append(row[:end])
    return out


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def decode(tokenizer: Any, ids: list[int], stop: Sequence[str] = ()) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for marker in stop:
        position = text.find(marker)
        if position >= 0:
            text = text[:position]
    return text.strip()
