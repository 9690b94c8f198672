"""The model card (README.md) of a published adapter, built from the run directory with huggingface_hub's ModelCard.

Metadata a hub validates (base model, datasets) only ever holds hub ids; local origins go into the body instead.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

from sovtune.config import GENERAL_DATASET, looks_like_local_path
from sovtune.core.rundir import RunDir, RunFileError
from sovtune.report import NO_FORGETTING_CHECK

# Licence ids the Hugging Face hub accepts in `license:` (https://huggingface.co/docs/hub/repositories-licenses);
# any other id is published as `license: other` with `license_name`, which every hub accepts.
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
    afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
    cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
    cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
    cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl
    gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr
    mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
    fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other""".split()
)


@dataclass
class MetricRow:
    dataset: str
    metric: str
    n: int | None
    base: float
    tuned: float
    gain: float
    ci_low: float | None
    ci_high: float | None
    significant: bool
    confidence: float | None
    higher_is_better: bool

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "no significant change"
        return "better" if (self.gain > 0) == self.higher_is_better else "worse"


def is_hub_id(value: Any) -> bool:
    """`name` or `org/name` as the hub accepts it, and not something that reads as a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value or looks_like_local_path(value) or "\\" in value:
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# The shapes the card reads. A run folder may come from elsewhere: every nested value the card (and the public forms
# of report.json and manifest.json) reads is checked to be what sovtune writes there, so a list where a number
# belongs is one line naming the file and the field, not a traceback. Other keys are not read, so not checked.

Scalar = Optional[Union[str, int, float, bool]]


class _Hub(TypedDict, total=False):
    id: Optional[str]
    commit: Optional[str]
    revision: Optional[str]


class _Entry(TypedDict, total=False):
    path: Optional[str]
    sha256: Optional[str]


class _DataRecord(TypedDict, total=False):
    split: Optional[str]
    hub: Optional[_Hub]
    files: Optional[list[_Entry]]


class _BaseRecord(TypedDict, total=False):
    name_or_path: Optional[str]
    revision: Optional[str]
    commit: Optional[str]
    local: Optional[bool]
    files: Optional[list[_Entry]]


class _Git(TypedDict, total=False):
    commit: Optional[str]
    dirty: Optional[bool]


class _RecipeRecord(TypedDict, total=False):
    sha256: Optional[str]
    git: Optional[_Git]


class _RunRecord(TypedDict, total=False):
    name: Optional[str]
    started_at: Optional[str]
    seed: Optional[int]


class _Stage(TypedDict, total=False):
    ended_at: Optional[str]


class _Tokenizer(TypedDict, total=False):
    chat_template_sha256: Optional[str]


class _Accelerator(TypedDict, total=False):
    name: Scalar


class _Hardware(TypedDict, total=False):
    accelerators: Optional[list[_Accelerator]]
    cpu_count: Optional[int]


class _Environment(TypedDict, total=False):
    packages: Optional[dict[str, Optional[str]]]
    hardware: Optional[_Hardware]


class ManifestShape(TypedDict, total=False):
    base_model: Optional[_BaseRecord]
    data: Optional[list[_DataRecord]]
    recipe: Optional[_RecipeRecord]
    run: Optional[_RunRecord]
    stages: Optional[list[_Stage]]
    tokenizer: Optional[_Tokenizer]
    environment: Optional[_Environment]


class _Result(TypedDict, total=False):
    dataset: Optional[str]
    metric: Optional[str]
    n: Optional[int]
    base: Optional[float]
    tuned: Optional[float]
    difference: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    confidence: Optional[float]
    significant: Optional[bool]
    higher_is_better: Optional[bool]


class _Gate(TypedDict, total=False):
    passed: Optional[bool]
    gate: Scalar
    dataset: Scalar
    metric: Scalar
    rule: Scalar
    threshold: Scalar
    value: Scalar


class ReportShape(TypedDict, total=False):
    results: Optional[list[_Result]]
    gates: Optional[list[_Gate]]
    samples: Optional[list[dict[str, Any]]]


class _Model(TypedDict, total=False):
    name_or_path: Optional[str]
    revision: Optional[str]
    license: Optional[str]


class _AdapterSettings(TypedDict, total=False):
    type: Optional[str]


class _Quantization(TypedDict, total=False):
    mode: Optional[str]


class _Source(TypedDict, total=False):
    path: Optional[str]
    revision: Optional[str]


class _Data(TypedDict, total=False):
    train: Optional[list[Union[str, _Source]]]
    eval: Optional[Union[str, _Source]]


class RecipeShape(TypedDict, total=False):
    description: Scalar
    model: Optional[_Model]
    adapter: Optional[_AdapterSettings]
    quantization: Optional[_Quantization]
    data: Optional[_Data]


def check_shape(value: Any, shape: Any, where: Path | str) -> None:
    """RunFileError naming the file, the field and what it should be when `value` does not have `shape` (strict:
    no coercion, so "1" is not a number and a list is never a mapping)."""
    try:
        _adapter(shape).validate_python(value, strict=True)
    except ValidationError as exc:
        error = max(exc.errors(), key=lambda item: len(item["loc"]))  # the deepest: inside a union member
        field = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part)) or "(top level)"
        found = type(error.get("input")).__name__
        raise RunFileError(
            f"{where}: {field}: {error['msg'].lower()}, found {found}; it is not as sovtune writes it (changed after "
            "it was written?), restore it"
        ) from None


@functools.cache
def _adapter(shape: Any) -> TypeAdapter[Any]:
    """One validator per shape (building one from a TypedDict takes ~15 ms; a push checks a dozen documents)."""
    return TypeAdapter(shape)


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried in the location ("str", "_Source", "float", ...).
    return isinstance(part, str) and (part[:1] == "_" or part in {"str", "int", "float", "bool", "none"})


def check_run_documents(
    run_dir: Path, recipe: dict[str, Any], manifest: dict[str, Any] | None, report: dict[str, Any] | None
) -> None:
    """The recorded recipe, manifest.json and report.json of `run_dir` hold what the card reads, in its shape."""
    run_dir = Path(run_dir)
    check_shape(recipe, RecipeShape, run_dir / RunDir.RECIPE)
    if manifest is not None:
        check_shape(manifest, ManifestShape, run_dir / RunDir.MANIFEST)
    if report is not None:
        check_shape(report, ReportShape, run_dir / RunDir.REPORT)


# ---------------------------------------------------------------------------------------------------------------
# Facts from the run


def base_model_facts(recipe: dict[str, Any], manifest: dict[str, Any] | None) -> dict[str, Any]:
    """name, revision, commit, whether it is local, and its recorded files: the manifest wins over the recipe."""
    model = recipe.get("model") or {}
    record = (manifest or {}).get("base_model") or {}
    name = record.get("name_or_path") or model.get("name_or_path") or "unknown"
    revision = record.get("revision", model.get("revision"))
    if "local" in record:
        local = bool(record["local"])
    else:
        # Without a manifest: recipes must pin a revision for hub models, so an unpinned name was a local folder.
        local = not is_hub_id(name) or revision is None
    return {
        "name": name,
        "revision": revision,
        "commit": record.get("commit"),
        "local": local or not is_hub_id(name),
        "files": [entry for entry in record.get("files") or [] if isinstance(entry, dict)],
    }


def public_base_name(base: dict[str, Any]) -> str:
    """What a published file calls the base model: the hub id of a hub base; for a local base the name its recipe
    declares for it, reduced to the folder's name (never a path of this machine)."""
    name = str(base.get("name") or "")
    if not base.get("local"):
        return name
    return re.split(r"[/\\]", name.rstrip("/\\"))[-1] or "local-base-model"


def dataset_facts(recipe: dict[str, Any], manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each training/eval source: hub id (with revision/commit) or a local file with its recorded hash."""
    facts: list[dict[str, Any]] = []
    records = (manifest or {}).get("data")
    if isinstance(records, list) and records:
        for record in records:
            hub = record.get("hub")
            if hub:
                facts.append(
                    {
                        "split": record.get("split"),
                        "hub_id": hub.get("id"),
                        "revision": hub.get("commit") or hub.get("revision"),
                    }
                )
            else:
                for entry in record.get("files") or []:
                    facts.append(
                        {
                            "split": record.get("split"),
                            "file": Path(str(entry.get("path"))).name,
                            "sha256": entry.get("sha256"),
                        }
                    )
        return facts
    data = recipe.get("data") or {}
    sources = [("train", source) for source in data.get("train") or []]
    if data.get("eval"):
        sources.append(("eval", data["eval"]))
    for split, source in sources:
        source = {"path": source} if isinstance(source, str) else source or {}
        path = str(source.get("path", ""))
        # Without a manifest only ORG/NAME ids count as hub datasets: a bare name may be a local folder.
        if path.count("/") == 1 and is_hub_id(path):
            facts.append({"split": split, "hub_id": path, "revision": source.get("revision")})
        else:
            facts.append({"split": split, "file": Path(path).name, "sha256": None})
    return facts


def find_licence(recipe: dict[str, Any], manifest: dict[str, Any] | None) -> str | None:
    """The base model's licence: the recipe's model.license, else what the licence check recorded in the manifest."""
    declared = (recipe.get("model") or {}).get("license")
    if declared:
        return str(declared).lower()
    for node in _walk_dicts(manifest or {}):
        licences = node.get("licences")
        if isinstance(licences, list) and licences and "source" in node:
            return str(licences[0]).lower()
    return None


def report_rows(report: dict[str, Any] | None) -> list[MetricRow]:
    """Every base-vs-tuned comparison of report.json (`results`, one per dataset and metric)."""
    rows: list[MetricRow] = []
    for result in (report or {}).get("results") or []:
        base, tuned = _number(result.get("base")), _number(result.get("tuned"))
        if base is None or tuned is None:
            continue  # an undefined metric (e.g. perplexity overflow) has no value a hub can index
        gain = _number(result.get("difference"))
        rows.append(
            MetricRow(
                dataset=str(result.get("dataset") or "eval"),
                metric=str(result.get("metric")),
                n=result.get("n") if isinstance(result.get("n"), int) else None,
                base=base,
                tuned=tuned,
                gain=gain if gain is not None else tuned - base,
                ci_low=_number(result.get("ci_low")),
                ci_high=_number(result.get("ci_high")),
                significant=bool(result.get("significant")),
                confidence=_number(result.get("confidence")),
                higher_is_better=bool(result.get("higher_is_better", True)),
            )
        )
    return rows


def _walk_dicts(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk_dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_dicts(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# ---------------------------------------------------------------------------------------------------------------
# The card


def build_card(run_dir: Path, repo_id: str, revision: str | None = None) -> Any:
    """A `huggingface_hub.ModelCard` for the adapter in `run_dir`, to be published as `repo_id`."""
    from huggingface_hub import ModelCard

    run = RunDir(run_dir)
    # The recorded recipe is read for display only, not validated: its relative paths point at the machine it ran on,
    # and a run directory is often published from elsewhere (an exported bundle on a connected machine).
    recipe = run.recipe_data()
    manifest = run.read_json(RunDir.MANIFEST, "manifest")
    report = run.report()
    check_run_documents(run_dir, recipe, manifest, report)
    base = base_model_facts(recipe, manifest)
    datasets = dataset_facts(recipe, manifest)
    rows = report_rows(report)
    data = card_metadata(repo_id, recipe, base, datasets, rows, find_licence(recipe, manifest))
    body = card_body(repo_id, revision, recipe, manifest, base, datasets, rows, data.get("license"), report)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def card_metadata(
    repo_id: str,
    recipe: dict[str, Any],
    base: dict[str, Any],
    datasets: list[dict[str, Any]],
    rows: list[MetricRow],
    licence: str | None,
) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    hub_datasets = sorted({fact["hub_id"] for fact in datasets if fact.get("hub_id") and is_hub_id(fact["hub_id"])})
    tags = ["sovtune", "peft", "lora", _adapter_type(recipe)]
    if base["local"]:
        base_model = None
    else:
        base_model = base["name"]
        tags.append(f"base_model:adapter:{base_model}")
    eval_results = []
    for row in rows:
        common = {"task_type": "text-generation", "dataset_type": row.dataset, "dataset_name": row.dataset}
        eval_results += [
            EvalResult(**common, metric_type=row.metric, metric_value=row.tuned, metric_name=f"{row.metric} (adapter)"),
            EvalResult(
                **common,
                metric_type=f"{row.metric}_base",
                metric_value=row.base,
                metric_name=f"{row.metric} (base model)",
            ),
            EvalResult(
                **common,
                metric_type=f"{row.metric}_gain",
                metric_value=row.gain,
                metric_name=f"{row.metric} gain (adapter - base)",
                metric_args={"ci_low": row.ci_low, "ci_high": row.ci_high} if row.ci_low is not None else None,
            ),
        ]
    licence_fields: dict[str, Any] = {}
    if licence in HUB_LICENSES:
        licence_fields["license"] = licence
    elif licence:
        licence_fields = {"license": "other", "license_name": licence}
    return ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=hub_datasets or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
        **licence_fields,
    )


_ADAPTER_NAMES = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "rslora": "rsLoRA"}


def _adapter_type(recipe: dict[str, Any]) -> str:
    adapter = (recipe.get("adapter") or {}).get("type") or "lora"
    quant = (recipe.get("quantization") or {}).get("mode")
    return "qlora" if quant == "4bit" and adapter == "lora" else str(adapter)


def card_body(
    repo_id: str,
    revision: str | None,
    recipe: dict[str, Any],
    manifest: dict[str, Any] | None,
    base: dict[str, Any],
    datasets: list[dict[str, Any]],
    rows: list[MetricRow],
    licence: str | None,
    report: dict[str, Any] | None = None,
) -> str:
    sections = [
        _intro(repo_id, revision, recipe, base),
        _evaluation(rows, (report or {}).get("gates") or []),
        _training(recipe, datasets),
        _provenance(manifest, base),
    ]
    if licence is None:
        sections.append(
            "## Licence\n\nThe base model's licence was not declared; check it before using this adapter.\n"
        )
    return "\n".join(sections)


def _intro(repo_id: str, revision: str | None, recipe: dict[str, Any], base: dict[str, Any]) -> str:
    name = repo_id.split("/")[-1]
    description = recipe.get("description")
    if base["local"]:
        hashed = (
            f"its {len(base['files'])} files are hashed in `manifest.json`" if base["files"] else "see `manifest.json`"
        )
        origin = f"a local base model (`{public_base_name(base)}`, not on a hub; {hashed})"
        load_base = '"/path/to/the/same/base/model"'
    else:
        pinned = base["commit"] or base["revision"]
        origin = f"`{base['name']}`" + (f" at revision `{pinned}`" if pinned else "")
        load_base = f'"{base["name"]}"' + (f', revision="{pinned}"' if pinned else "")
    revision_arg = f', revision="{revision}"' if revision and revision != "main" else ""
    lines = [
        f"# {name}",
        "",
        (
            f"A {_ADAPTER_NAMES.get(_adapter_type(recipe), _adapter_type(recipe))} adapter for {origin}, "
            "trained with sovtune."
        ),
    ]
    if description:
        lines += ["", str(description)]
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({load_base})",
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{revision_arg})',
        (
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{revision_arg})  '
            "# with the chat template used in training"
        ),
        "```",
        "",
        (
            f"`sovtune pull {repo_id}` downloads exactly the files listed in `publish_manifest.json` and checks each "
            "one (this card too) against it and against the run's `manifest.json`; `--trust PUBKEY.pem` also "
            "requires a valid signature (`model.sig`)."
        ),
        "",
    ]
    return "\n".join(lines)


def _evaluation(rows: list[MetricRow], gates: list[dict[str, Any]]) -> str:
    if not rows:
        return "## Evaluation\n\nThis adapter was not evaluated against its base model (no `report.json` in the run).\n"
    confidence = next((row.confidence for row in rows if row.confidence), None)
    level = f"{confidence:.0%} " if confidence else ""
    lines = [
        "## Evaluation: base model vs adapter",
        "",
        f"Same held-out examples for both models. Gain = adapter - base (for loss and perplexity lower is better); "
        f"the interval is its paired-bootstrap {level}confidence interval. Dataset `general` is the forgetting check "
        "on general text.",
        "",
        "| dataset | metric | n | base | adapter | gain | interval of the gain | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        interval = (
            f"[{row.ci_low:+.4g}, {row.ci_high:+.4g}]" if row.ci_low is not None and row.ci_high is not None else "-"
        )
        n = row.n if row.n is not None else "-"
        lines.append(
            f"| {row.dataset} | {row.metric} | {n} | {row.base:.4g} | {row.tuned:.4g} | {row.gain:+.4g} | "
            f"{interval} | {row.verdict} |"
        )
    if not any(row.dataset == GENERAL_DATASET and row.metric == "perplexity" for row in rows):
        lines += ["", NO_FORGETTING_CHECK]
    if gates:
        lines += ["", "Gates:", ""]
        for gate in gates:
            verdict = "pass" if gate.get("passed") else "FAIL"
            lines.append(
                f"- {verdict}: {gate.get('gate')} ({gate.get('dataset')}/{gate.get('metric')}) "
                f"{gate.get('rule')} {gate.get('threshold')}, got {gate.get('value')}"
            )
    lines.append("")
    return "\n".join(lines)


_TRAINING_FIELDS = {
    "adapter": ("type", "r", "alpha", "dropout", "target_modules", "modules_to_save"),
    "quantization": ("mode", "quant_type", "double_quant", "compute_dtype"),
    "train": (
        "epochs", "max_steps", "batch_size", "gradient_accumulation", "learning_rate", "scheduler", "warmup_ratio",
        "warmup_steps", "weight_decay", "optimizer", "seed",
    ),
    "data": ("format", "max_length", "train_on_inputs", "packing"),
}  # fmt: skip


def _training(recipe: dict[str, Any], datasets: list[dict[str, Any]]) -> str:
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    for section, names in _TRAINING_FIELDS.items():
        values = recipe.get(section) or {}
        if section == "quantization" and values.get("mode") in (None, "none"):
            names = ("mode",)  # the 4-bit settings mean nothing without quantisation
        for name in names:
            value = values.get(name)
            if name == "epochs" and values.get("max_steps") is not None:
                continue  # ignored when max_steps is set
            if value is not None and value != []:
                shown = ", ".join(map(str, value)) if isinstance(value, list) else value
                lines.append(f"| {section}.{name} | {shown} |")
    lines += ["", "Data:", ""]
    for fact in datasets:
        if fact.get("hub_id"):
            pinned = f" @ `{fact['revision']}`" if fact.get("revision") else ""
            lines.append(f"- {fact['split']}: hub dataset `{fact['hub_id']}`{pinned}")
        else:
            digest = f" (sha256 `{fact['sha256']}`)" if fact.get("sha256") else ""
            lines.append(f"- {fact['split']}: local file `{fact['file']}`{digest}")
    if not datasets:
        lines.append("- not recorded")
    lines.append("")
    return "\n".join(lines)


def _provenance(manifest: dict[str, Any] | None, base: dict[str, Any]) -> str:
    if not manifest:
        return "## Provenance\n\nNo `manifest.json` was recorded for this run.\n"
    lines = ["## Provenance", "", "Everything below is in `manifest.json`, next to this card.", ""]
    recipe = manifest.get("recipe") or {}
    if recipe.get("sha256"):
        lines.append(f"- recipe sha256: `{recipe['sha256']}`")
    git = recipe.get("git") or {}
    if git.get("commit"):
        lines.append(
            f"- recipe repository commit: `{git['commit']}`"
            + (" (with uncommitted changes)" if git.get("dirty") else "")
        )
    run = manifest.get("run") or {}
    ended = [
        stage.get("ended_at")
        for stage in manifest.get("stages") or []
        if isinstance(stage, dict) and stage.get("ended_at")
    ]
    if run.get("started_at"):
        lines.append(f"- run: started {run['started_at']}" + (f", last stage ended {ended[-1]}" if ended else ""))
    if run.get("seed") is not None:
        lines.append(f"- seed: {run['seed']}")
    if base["local"] and base["files"]:
        lines.append(f"- local base model files ({len(base['files'])}):")
        for entry in base["files"]:
            lines.append(f"  - `{Path(str(entry.get('path'))).name}` sha256 `{entry.get('sha256')}`")
    elif base["commit"]:
        lines.append(f"- base model commit: `{base['commit']}`")
    tokenizer = manifest.get("tokenizer") or {}
    if tokenizer.get("chat_template_sha256"):
        lines.append(f"- chat template sha256: `{tokenizer['chat_template_sha256']}`")
    environment = manifest.get("environment") or {}
    packages = {k: v for k, v in (environment.get("packages") or {}).items() if v}
    if packages:
        lines.append("- packages: " + ", ".join(f"{name} {version}" for name, version in packages.items()))
    hardware = environment.get("hardware") or {}
    accelerators = [item.get("name") for item in hardware.get("accelerators") or [] if isinstance(item, dict)]
    if hardware:
        lines.append(f"- hardware: {', '.join(accelerators) or 'CPU only'}; {hardware.get('cpu_count')} CPUs")
    lines.append("")
    return "\n".join(lines)
