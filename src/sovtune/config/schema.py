"""The recipe schema: strict pydantic sections (unknown keys are errors) with cross-field checks and help texts."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from sovtune.config.validators import (
    check_endpoint,
    check_optional_path_text,
    check_path_text,
    check_repo_id,
    endpoint_host,
    is_loopback,
    looks_like_local_path,
)
from sovtune.core.secrets import redact_secrets

SCHEMA_VERSION = 1

# Bounds of numeric settings: a value outside is a typo or an attack, refused with the plausible range when the recipe
# loads (not after a download, or as a crash deep inside training). Floats must be finite (Section.model_config).
MAX_SEED = 2**32 - 1  # numpy and torch seeds are 32-bit
MAX_STEPS = 100_000_000
MAX_BATCH = 4096  # examples per micro-batch or per forward pass
MAX_TOKENS = 1_048_576  # tokens per example (the longest context windows of current models)
MAX_NEW_TOKENS = 131_072
MAX_EXAMPLES = 100_000_000
DEFAULT_MAX_ROW_BYTES = 4 * 2**20  # long-context rows (128k tokens) are well under 1 MB

# Marks a field whose value is a file or folder: the loader resolves it against the folder of the recipe file that
# set it (through any depth of `extends`), or against the working directory when it comes from --set.
PATH_FIELD: dict[str, Any] = {"recipe_path": True}

DType = Literal["auto", "bfloat16", "float16", "float32"]
# A file, folder or hub id: a string the operating system takes as a path (the validator sits outside the Optional,
# so field types read `str or None` in the recipe reference).
PathText = Annotated[str, AfterValidator(check_path_text)]
OptionalPathText = Annotated[str | None, AfterValidator(check_optional_path_text)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, never silently ignored."""

    # defer_build: the validators are built when a recipe is first validated, not when `sovtune --help` imports this.
    # allow_inf_nan=False: `.inf` or `.nan` in any float field (alpha, learning rate, gate thresholds) is refused, not
    # trained into an adapter of NaN weights.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), defer_build=True, allow_inf_nan=False
    )

    def explicitly_set(self, name: str) -> bool:
        """Set in the recipe to something other than the default (a resolved recipe repeats every default)."""
        return name in self.model_fields_set and getattr(self, name) != type(self).model_fields[name].default


class ModelSection(Section):
    name_or_path: PathText = Field(
        description="Hub id (e.g. mistralai/Mistral-7B-v0.3) or a local folder with config and weights.",
        json_schema_extra=PATH_FIELD,
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (commit sha, tag or branch) to pin; required for hub ids so runs are reproducible.",
    )
    dtype: DType = Field(
        default="auto", description="Weights dtype: auto = bf16 on GPUs that support it, else fp16; fp32 on the CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto", description="Attention kernel: auto = flash_attention_2 when installed on CUDA, else sdpa."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with the checkpoint. Only for code you have reviewed."
    )
    allow_pickle_weights: bool = Field(
        default=False, description="Allow loading .bin/.pt (pickle) weights; by default only safetensors are loaded."
    )
    license: str | None = Field(
        default=None, description="The base model's licence id, when its card or config does not declare one."
    )


class QuantizationSection(Section):
    mode: Literal["none", "4bit", "8bit"] = Field(
        default="none", description="none = LoRA on 16/32-bit weights; 4bit = QLoRA (bitsandbytes); 8bit = LLM.int8."
    )
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type; NF4 is the QLoRA default.")
    double_quant: bool = Field(
        default=True, description="Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: DType = Field(
        default="auto", description="dtype of the 4-bit matmuls: auto = the model dtype (bf16 on modern GPUs)."
    )
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        default="uint8",
        description="Storage of packed 4-bit weights; a float dtype (e.g. bfloat16) lets FSDP shard QLoRA weights.",
    )

    @model_validator(mode="after")
    def _settings_match_mode(self) -> QuantizationSection:
        four_bit_only = [f for f in ("quant_type", "double_quant", "storage_dtype") if self.explicitly_set(f)]
        if self.mode != "4bit" and four_bit_only:
            raise ValueError(
                f"{', '.join(four_bit_only)} only {'applies' if len(four_bit_only) == 1 else 'apply'} to mode: 4bit, "
                f"but mode is {self.mode!r}; "
                "set mode: 4bit or remove them"
            )
        if self.mode == "none" and self.explicitly_set("compute_dtype"):
            raise ValueError("compute_dtype only applies to a quantised model; set mode: 4bit or 8bit, or remove it")
        return self


class AdapterSection(Section):
    type: Literal["lora", "dora", "rslora"] = Field(
        default="lora",
        description="lora; dora (weight-decomposed LoRA); rslora (rank-stabilised scaling alpha/sqrt(r)).",
    )
    r: int = Field(default=16, gt=0, le=4096, description="LoRA rank.")
    alpha: float | None = Field(default=None, gt=0, le=1_000_000, description="LoRA alpha; default 2 * r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or all-linear "
        "(every linear layer but the output head).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained fully and saved with the adapter (e.g. [lm_head])."
    )
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases to train.")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules is empty; list module names or use all-linear")
        return value


Format = Literal["messages", "instruction", "prompt_completion", "text"]

# Which logical columns each format reads; `data.columns` maps them to the dataset's own names.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "instruction": ("instruction", "input", "output", "system"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


class DataSource(Section):
    # A source may be written as its path alone (`train: data/train.jsonl`).
    STRING_FIELD: ClassVar[str] = "path"

    path: PathText = Field(
        description="Local file or folder (jsonl, json, csv, parquet, txt) or a hub dataset id.",
        json_schema_extra=PATH_FIELD,
    )
    revision: str | None = Field(default=None, description="Hub dataset revision to pin.")
    subset: str | None = Field(default=None, description="Hub dataset configuration name.")
    split: str = Field(default="train", description="Hub dataset split.")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class TrainSource(DataSource):
    """One source of the training mixture: its own format and columns, and its share of each epoch."""

    path: PathText = Field(
        default="",
        description="Local file or folder (jsonl, json, csv, parquet, txt) or a hub dataset id; with general: true "
        "it defaults to eval.general.train.",
        json_schema_extra=PATH_FIELD,
    )
    format: Format | None = Field(default=None, description="Row format of this source; default data.format.")
    columns: dict[str, str] | None = Field(
        default=None,
        description="Column mapping of this source; default data.columns when the source has data.format.",
    )
    weight: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="This source's share of each epoch's examples, e.g. 0.2 = one example in five (drawn without "
        "replacement while the source lasts, repeated when it is smaller than its share). Sources without a weight "
        "contribute each of their examples once per epoch and the weights must sum below 1; when every source has "
        "one they must sum to 1.",
    )
    max_examples: int | None = Field(
        default=None,
        gt=0,
        le=MAX_EXAMPLES,
        description="Read a seeded sample of at most this many rows of this source.",
    )
    general: bool = Field(
        default=False,
        description="General-text replay against forgetting: reads eval.general.train (unless path is given) with "
        "eval.general's format and columns, is checked to share no passage with the forgetting check's eval.general, "
        "and is never held out for evaluation. E.g. {general: true, weight: 0.2}.",
    )

    @model_validator(mode="after")
    def _has_a_path(self) -> TrainSource:
        if not self.path and not self.general:
            raise ValueError("a training source needs a path (file, folder or hub id), or general: true")
        return self

    def format_in(self, data: DataSection) -> Format:
        return self.format or data.format

    def columns_in(self, data: DataSection) -> dict[str, str]:
        """Its own columns; else data.columns, which describe sources in data.format only."""
        if self.columns is not None:
            return self.columns
        return data.columns if self.format_in(data) == data.format else {}

    def describe(self) -> str:
        return self.path or "general"


class DataSection(Section):
    train: list[TrainSource] = Field(
        min_length=1,
        description="Training sources: a path/hub id, or a list of them, each a path or {path, format, columns, "
        "weight, max_examples, general} (a mixture: see docs/data-mixtures.md).",
    )
    eval: DataSource | None = Field(default=None, description="Held-out source; default: a seeded split of train.")
    eval_fraction: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Share of train held out when eval is not given."
    )
    format: Format = Field(default="messages", description="messages | instruction | prompt_completion | text.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map the format's columns to the dataset's, e.g. {prompt: question, completion: answer}.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Chat template: a built-in name (chatml, deepseek, llama2, llama3, mistral, plain, starcoder2), "
        "inline Jinja, or a path to a .jinja file; default: the tokenizer's.",
        json_schema_extra=PATH_FIELD,
    )
    system_message: Literal["keep", "merge"] = Field(
        default="keep",
        description="System messages: keep (rendered by the chat template; a template that rejects or drops them "
        "stops with an error) or merge (the system text, a blank line, then the first user message: for templates "
        "without a system role, such as Gemma 2's and Mistral's).",
    )
    separator: str = Field(
        default="",
        description="prompt_completion: text put between prompt and completion, on the prompt's side: generation "
        "starts after it and it is never scored. A row is BOS + prompt + separator (no loss unless train_on_inputs) + "
        "completion + EOS (loss), prompt and completion tokenised apart; `sovtune check` warns when they tokenise "
        'differently joined. Default: nothing; e.g. "\\n" or " ".',
    )
    max_length: int = Field(
        default=1024, gt=8, le=MAX_TOKENS, description="Maximum tokens per example; longer rows are truncated."
    )
    train_on_inputs: bool = Field(
        default=False, description="Also compute the loss on prompt/user tokens (default: completion/assistant only)."
    )
    packing: Literal["auto"] | bool = Field(
        default="auto",
        description="Padding-free batches: a batch's examples share one row, position ids restarting per example, "
        "so no padding is computed and no example attends to another. auto = on where the model's attention keeps "
        "examples apart, else padded batches grouped by length; true = on or stop; false = padded batches grouped by "
        "length.",
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        default="error", description="Malformed rows stop the run (error) or are skipped and reported (skip)."
    )
    max_row_bytes: int = Field(
        default=DEFAULT_MAX_ROW_BYTES,
        ge=1024,
        le=2**31,
        description="Largest row (a JSONL/CSV line, a JSON row, a .txt file) in bytes; a larger one is a malformed "
        "row and is never read whole into memory.",
    )
    chat_template_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Time budget in seconds for rendering one conversation with the chat template; a template that "
        "takes longer (a runaway loop) stops the command.",
    )

    @model_validator(mode="before")
    @classmethod
    def _train_list(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("train"), (str, dict)):
            value = {**value, "train": [value["train"]]}
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> DataSection:
        allowed = FORMAT_COLUMNS[self.format]
        unknown = sorted(set(self.columns) - set(allowed))
        if unknown:
            raise ValueError(f"columns {unknown} do not apply to format {self.format!r}; allowed: {list(allowed)}")
        for index, source in enumerate(self.train):
            source_format = source.format_in(self)
            unknown = sorted(set(source.columns or {}) - set(FORMAT_COLUMNS[source_format]))
            if unknown:
                raise ValueError(
                    f"train[{index}]: columns {unknown} do not apply to format {source_format!r}; "
                    f"allowed: {list(FORMAT_COLUMNS[source_format])}"
                )
        self._check_weights()
        if self.eval is not None and self.explicitly_set("eval_fraction"):
            raise ValueError("give either eval (a held-out source) or eval_fraction (a split of train), not both")
        if self.format == "text" and self.train_on_inputs:
            raise ValueError("train_on_inputs has no meaning for format text (every token is trained); remove it")
        if self.separator and self.format != "prompt_completion":
            raise ValueError(f"separator only applies to format prompt_completion, not {self.format!r}; remove it")
        return self

    @field_validator("chat_template")
    @classmethod
    def _template_path(cls, value: str | None) -> str | None:
        return value if value is None or "{" in value else check_path_text(value)

    def _check_weights(self) -> None:
        weights = [source.weight for source in self.train if source.weight is not None]
        if not weights:
            return
        total = sum(weights)
        if len(weights) < len(self.train) and total >= 1:
            raise ValueError(
                f"train: the weights sum to {total:g}, but sources without a weight also take part in every epoch; "
                "weights are shares of an epoch, so keep their sum below 1 (e.g. weight: 0.2 for a replay source)"
            )
        if len(weights) == len(self.train) and abs(total - 1) > 1e-6:
            raise ValueError(
                f"train: every source has a weight and they sum to {total:g}; as shares of each epoch they must sum "
                "to 1 (or leave the main source without a weight: it then contributes all its examples)"
            )

    def column(self, logical: str) -> str:
        return self.columns.get(logical, logical)

    def held_out_sources(self) -> list[TrainSource]:
        """The sources the eval_fraction split draws from: those in data.format, general-text replay excluded."""
        return [source for source in self.train if not source.general and source.format_in(self) == self.format]

    def source_view(self, source: TrainSource) -> DataSection:
        """These data settings as one source reads them: its format and columns."""
        return self.model_copy(update={"format": source.format_in(self), "columns": source.columns_in(self)})


class TrainSection(Section):
    epochs: float = Field(
        default=1.0,
        gt=0,
        le=10_000,
        description="Passes over the training data (over one epoch of the mixture when data.train weights sources); "
        "--set train.max_steps=N replaces it.",
    )
    max_steps: int | None = Field(
        default=None,
        gt=0,
        le=MAX_STEPS,
        description="Stop after this many optimizer steps instead of after epochs (the trainer cycles through the "
        "mixture's epoch as often as needed); --set train.epochs=N replaces it.",
    )
    batch_size: int = Field(default=4, gt=0, le=MAX_BATCH, description="Examples per device per micro-batch.")
    gradient_accumulation: int = Field(default=1, gt=0, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(
        default=None, ge=0, le=MAX_STEPS, description="Warmup in steps (instead of warmup_ratio)."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=10, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, le=1_000_000, description="Gradient clipping norm.")
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = Field(default="adamw_torch", description="Optimizer; paged_adamw_8bit is the QLoRA paper's choice on CUDA.")
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations in backward to save memory.")
    seed: int = Field(
        default=42, ge=0, le=MAX_SEED, description="Seed for data order, LoRA init, dropout and the eval split."
    )
    logging_steps: int = Field(default=10, gt=0, le=MAX_STEPS, description="Log loss and learning rate every N steps.")
    save_steps: int = Field(default=200, gt=0, le=MAX_STEPS, description="Write a resumable checkpoint every N steps.")
    save_total_limit: int = Field(default=2, gt=0, le=1000, description="Checkpoints kept on disk (oldest removed).")
    eval_steps: int | None = Field(
        default=None,
        gt=0,
        le=MAX_STEPS,
        description="Held-out loss every N steps during training: token-weighted, batched by eval.batch_size, on the "
        "sample of eval.max_examples that the final evaluation scores; logged to TensorBoard and logs/train_log.jsonl.",
    )
    eval_samples: int = Field(
        default=0,
        ge=0,
        le=32,
        description="At each train.eval_steps evaluation, the adapter's answers to this many held-out prompts, written "
        "to TensorBoard as text (tab TEXT); 0 = none.",
    )
    liger_kernel: Literal["auto"] | bool = Field(
        default="auto",
        description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) on CUDA: auto = on when liger-kernel is "
        "installed and supports the architecture; true = on or stop; false = off. Always off on the CPU.",
    )
    torch_compile: bool = Field(
        default=False, description="Compile the model with torch.compile on CUDA (slow first steps); off on the CPU."
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainSection:
        if self.explicitly_set("warmup_ratio") and self.warmup_steps is not None:
            raise ValueError("give warmup_ratio or warmup_steps, not both")
        if self.explicitly_set("epochs") and self.max_steps is not None:
            raise ValueError(
                "give epochs or max_steps, not both (a --set of one on the command line replaces the recipe's other)"
            )
        if self.eval_samples and self.eval_steps is None:
            raise ValueError("eval_samples are generated at each in-training evaluation; set eval_steps too")
        return self


class OutputSection(Section):
    dir: OptionalPathText = Field(
        default=None, description="Run directory; default runs/<recipe name> under the working directory."
    )


class HubSection(Section):
    repo: str | None = Field(default=None, description="Repository the adapter is published to: ORG/NAME.")
    endpoint: str | None = Field(
        default=None, description="Your hub's URL, e.g. https://hub.internal.example; default: $HF_ENDPOINT."
    )
    revision: str | None = Field(default=None, description="Branch to publish to (created when missing); default main.")
    private: bool = Field(
        default=True,
        description="Create the repository private; false makes it public. An existing repository keeps its "
        "visibility unless `sovtune push --public/--private` says otherwise.",
    )
    push: bool = Field(
        default=False, description="Publish at the end of `sovtune run` (after evaluation and its gates)."
    )
    include_examples: bool = Field(
        default=False,
        description="Also publish report.json's example generations (held-out prompts, references, predictions); "
        "by default they stay on this machine.",
    )
    signing_key: str | None = Field(
        default=None,
        description="PEM private key (ECDSA, e.g. P-256) that signs the published files (OpenSSF model signing); "
        "relative to the recipe. Password: $SOVTUNE_SIGNING_KEY_PASSWORD.",
    )

    @field_validator("repo")
    @classmethod
    def _valid_repo(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @field_validator("endpoint")
    @classmethod
    def _valid_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint(value)

    @field_validator("revision")
    @classmethod
    def _valid_branch(cls, value: str | None) -> str | None:
        if value is not None and (".." in value or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", value)):
            raise ValueError(f"{value!r} is not a branch name; use letters, digits, '.', '_', '-' or '/', e.g. release")
        return value

    @model_validator(mode="after")
    def _push_needs_repo(self) -> HubSection:
        if self.push and self.repo is None:
            raise ValueError("push: true needs repo: ORG/NAME (the repository to publish to)")
        return self


# Evaluation: base vs adapter. Metric names are checked here, at load time; their code lives in metrics.py.
MetricName = Literal[
    "loss", "perplexity", "token_accuracy", "exact_match", "contains", "regex", "rouge_l", "chrf",
    "multiple_choice", "sql_execution",
]  # fmt: skip
LOSS_METRICS = ("loss", "perplexity", "token_accuracy")  # one teacher-forced pass over the reference
GENERATION_METRICS = ("exact_match", "contains", "regex", "rouge_l", "chrf", "sql_execution")  # on generated text
LOWER_IS_BETTER = ("loss", "perplexity")
GENERAL_DATASET = "general"  # the forgetting check's dataset name; its gate is `general_perplexity`
_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _default_metrics() -> list[MetricName]:
    """EvalDataset.metrics when a dataset lists none (a new list each time)."""
    return ["loss", "perplexity", "token_accuracy", "exact_match"]


class UserMetric(Section):
    name: str = Field(pattern=_IDENTIFIER, description="Name in the report and in gates.")
    module: PathText = Field(
        description="Path to a .py file, relative to the recipe; only this file is imported.",
        json_schema_extra=PATH_FIELD,
    )
    function: str = Field(
        pattern=_IDENTIFIER, description="function(prediction, reference, row) -> float in that file."
    )
    higher_is_better: bool = Field(default=True, description="Whether a larger score is better (for gates).")


class EvalDataset(Section):
    name: str = Field(
        default="eval", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name in the report and gates."
    )
    source: DataSource | None = Field(
        default=None, description="A path/hub id, or {path, split, revision}; default: the recipe's held-out split."
    )
    format: Format | None = Field(default=None, description="Row format of `source`; default data.format.")
    columns: dict[str, str] | None = Field(
        default=None, description="Column mapping of `source`; default data.columns."
    )
    metrics: list[MetricName] = Field(
        default_factory=_default_metrics,
        description="Metrics computed on this dataset (each per example, base and tuned).",
    )
    user_metrics: list[UserMetric] = Field(
        default_factory=list, description="Your own metrics: [{name, module: path/to/file.py, function}]."
    )
    regex: str | None = Field(
        default=None,
        description="Pattern for the regex metric: with a group, group 1 must equal the reference; else it must match.",
    )
    database: OptionalPathText = Field(
        default=None, description="SQLite file for sql_execution (opened read-only).", json_schema_extra=PATH_FIELD
    )
    sql_timeout_s: float = Field(
        default=5.0, gt=0, le=3600, description="Time budget per SQL query before it counts as wrong."
    )
    choices_column: str = Field(default="choices", description="multiple_choice: row column with the list of options.")
    answer_column: str = Field(
        default="answer",
        description="multiple_choice: column with the correct option (index or text); default: the reference.",
    )
    max_examples: int | None = Field(
        default=None, gt=0, le=MAX_EXAMPLES, description="Evaluate a seeded sample of this many rows."
    )

    def metric_names(self) -> list[str]:
        return [*self.metrics, *(metric.name for metric in self.user_metrics)]

    def higher_is_better(self, metric: str) -> bool:
        for user in self.user_metrics:
            if user.name == metric:
                return user.higher_is_better
        return metric not in LOWER_IS_BETTER

    @model_validator(mode="after")
    def _check_combinations(self) -> EvalDataset:
        duplicated = sorted({m for m in self.metric_names() if self.metric_names().count(m) > 1})
        if duplicated:
            raise ValueError(f"dataset {self.name!r}: metrics {duplicated} are listed twice; keep one of each")
        clashes = sorted({user.name for user in self.user_metrics} & set(get_args(MetricName)))
        if clashes:
            raise ValueError(f"user_metrics {clashes} reuse built-in metric names; rename them")
        if not self.metric_names():
            raise ValueError(f"dataset {self.name!r} has no metrics; list some, e.g. metrics: [loss, exact_match]")
        if ("sql_execution" in self.metrics) != (self.database is not None):
            raise ValueError(
                "sql_execution needs database: path/to/file.db (and database is only used by sql_execution); "
                f"set both or neither on dataset {self.name!r}"
            )
        if ("regex" in self.metrics) != (self.regex is not None):
            raise ValueError(
                f"the regex metric needs regex: <pattern> (and regex needs the metric) on dataset {self.name!r}"
            )
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile ({exc}); fix the pattern") from None
        return self


class GeneralText(DataSource):
    format: Format = Field(default="text", description="Row format of the general-text set (usually text).")
    columns: dict[str, str] = Field(default_factory=dict, description="Column mapping, e.g. {text: body}.")
    max_examples: int | None = Field(
        default=None, gt=0, le=MAX_EXAMPLES, description="Evaluate a seeded sample of this many rows."
    )
    window: int = Field(
        default=1024,
        gt=8,
        le=MAX_TOKENS,
        description="Tokens per scoring window: a document is scored whole when it fits, else in consecutive windows "
        "of this size (at most the base model's context). Fixed, so the figure does not move with data.max_length; "
        "the bootstrap resamples documents, never windows apart.",
    )
    train: str | None = Field(
        default=None,
        description="General text for replay in training, read by a data.train source {general: true, weight: 0.2}; "
        "must share no passage with the evaluated set (replaying the passages the forgetting check scores would "
        "hide forgetting), e.g. data/general/train.jsonl.",
        json_schema_extra=PATH_FIELD,
    )


class Gate(Section):
    min_gain: float | None = Field(
        default=None,
        description="Smallest improvement, tuned over base (for loss/perplexity: a decrease); negative = drop allowed.",
    )
    max_increase: float | None = Field(
        default=None, ge=0, description="Lower-is-better metrics: largest relative increase allowed, 0.05 = +5%."
    )
    min_value: float | None = Field(
        default=None, description="Higher-is-better metrics: the tuned value must reach this."
    )
    max_value: float | None = Field(
        default=None, description="Lower-is-better metrics: the tuned value must not exceed this."
    )
    significant: bool = Field(default=False, description="The improvement's confidence interval must exclude 0.")
    beats_constant: bool = Field(
        default=False,
        description="Generation metrics: the tuned model must beat the constant baseline (its own most frequent "
        "output given for every example), the interval of the difference excluding 0.",
    )
    confident: bool = Field(
        default=False,
        description="The rules hold for the whole confidence interval, not only the estimate: max_increase and "
        "max_value against its upper bound, min_gain and min_value against its lower bound (e.g. forgetting: "
        "{max_increase: 0.25, confident: true}).",
    )

    @model_validator(mode="after")
    def _has_a_rule(self) -> Gate:
        if not self.model_fields_set - {"confident"}:
            raise ValueError(
                "a gate needs a rule: min_gain, max_increase, min_value, max_value, significant or beats_constant"
            )
        return self


class GenerationSection(Section):
    max_new_tokens: int = Field(
        default=128, gt=0, le=MAX_NEW_TOKENS, description="Tokens generated per example at most."
    )
    do_sample: bool = Field(default=False, description="Sample instead of greedy decoding (greedy is reproducible).")
    temperature: float | None = Field(
        default=None, gt=0, le=100, description="Sampling temperature (only with do_sample)."
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass (only with do_sample).")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed for sampling.")
    stop: list[str] = Field(
        default_factory=list, description="Extra stop strings (EOS and the turn terminator always stop)."
    )
    batch_size: int = Field(
        default=16, gt=0, le=MAX_BATCH, description="Prompts generated together (left-padded, KV cache)."
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> GenerationSection:
        sampling_only = [name for name in ("temperature", "top_p") if getattr(self, name) is not None]
        if sampling_only and not self.do_sample:
            raise ValueError(f"{', '.join(sampling_only)} only apply with do_sample: true; set it or remove them")
        if any(not stop for stop in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


class BootstrapSection(Section):
    resamples: int = Field(
        default=2000, ge=1000, le=1_000_000, description="Paired-bootstrap resamples (at least 1000)."
    )
    seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="Seed of the resampling: the same seed gives the same intervals."
    )
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="Confidence level of the intervals.")


class EvalSection(Section):
    enabled: bool = Field(default=True, description="Evaluate base vs adapter after training in `sovtune run`.")
    datasets: list[EvalDataset] = Field(
        default_factory=lambda: [EvalDataset()], description="Held-out sets; default: the recipe's eval split."
    )
    general: GeneralText | None = Field(
        default=None,
        description="General text for the forgetting check (perplexity base vs tuned), e.g. data/general/eval.jsonl.",
    )
    generation: GenerationSection = Field(
        default_factory=GenerationSection, description="How answers are generated for the generation metrics."
    )
    bootstrap: BootstrapSection = Field(
        default_factory=BootstrapSection, description="The paired bootstrap behind every interval."
    )
    batch_size: int = Field(
        default=8, gt=0, le=MAX_BATCH, description="Examples per forward pass in loss evaluation (sorted by length)."
    )
    max_examples: int | None = Field(
        default=None, gt=0, le=MAX_EXAMPLES, description="Cap per dataset (a seeded sample); default: all."
    )
    samples: int = Field(
        default=3, ge=0, le=1000, description="Side-by-side generations, base vs tuned, shown in report.md."
    )
    gates: dict[str, Gate] = Field(
        default_factory=dict,
        description="Pass/fail rules, e.g. {exact_match: {min_gain: 0.05}, general_perplexity: {max_increase: 0.05}}.",
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> EvalSection:
        names = [dataset.name for dataset in self.datasets]
        if len(set(names)) != len(names) or GENERAL_DATASET in names:
            raise ValueError(f"eval.datasets names must be unique and not {GENERAL_DATASET!r}; found {names}")
        if sum(dataset.source is None for dataset in self.datasets) > 1:
            raise ValueError("only one eval dataset can use the recipe's held-out split; give the others a source")
        for key, gate in self.gates.items():
            self._check_gate(key, gate)
        return self

    def gate_targets(self, key: str) -> list[tuple[str, str]]:
        """(dataset, metric) pairs a gate key refers to: `metric`, `dataset/metric` or `general_perplexity`."""
        if key == f"{GENERAL_DATASET}_perplexity":
            return [(GENERAL_DATASET, "perplexity")] if self.general is not None else []
        dataset_name, _, metric = key.rpartition("/")
        return [
            (dataset.name, metric)
            for dataset in self.datasets
            if metric in dataset.metric_names() and dataset_name in ("", dataset.name)
        ]

    def is_generation_metric(self, dataset_name: str, metric: str) -> bool:
        """Scored on generated text (so it has a constant baseline): built-in generation metrics and user metrics."""
        dataset = next((dataset for dataset in self.datasets if dataset.name == dataset_name), None)
        users = [user.name for user in dataset.user_metrics] if dataset is not None else []
        return metric in GENERATION_METRICS or metric in users

    def higher_is_better(self, dataset_name: str, metric: str) -> bool:
        for dataset in self.datasets:
            if dataset.name == dataset_name:
                return dataset.higher_is_better(metric)
        return metric not in LOWER_IS_BETTER

    def _check_gate(self, key: str, gate: Gate) -> None:
        targets = self.gate_targets(key)
        if not targets:
            if key == f"{GENERAL_DATASET}_perplexity":
                raise ValueError(f"gate {key!r} needs eval.general (a general-text set); add it or remove the gate")
            pairs = [(d.name, m) for d in self.datasets for m in d.metric_names()]
            computed = sorted({m for _, m in pairs} | {f"{d}/{m}" for d, m in pairs})
            if self.general is not None:
                computed.append(f"{GENERAL_DATASET}_perplexity")
            guess = difflib.get_close_matches(key, computed, n=1, cutoff=0.6)
            hint = f"did you mean {guess[0]!r}?" if guess else f"computed: {', '.join(computed)}"
            raise ValueError(f"gate {key!r} names a metric no eval dataset computes; {hint}")
        for dataset_name, metric in targets:
            if gate.beats_constant and not self.is_generation_metric(dataset_name, metric):
                raise ValueError(
                    f"gate {key!r}: beats_constant applies to metrics of generated text "
                    f"({', '.join(GENERATION_METRICS)} or a user metric) and {metric} is not one; remove it or gate a "
                    "generation metric"
                )
            higher = self.higher_is_better(dataset_name, metric)
            wrong = ["max_increase", "max_value"] if higher else ["min_value"]
            used = [name for name in wrong if getattr(gate, name) is not None]
            if used:
                fix = "use min_gain or min_value" if higher else "use min_gain, max_increase or max_value"
                direction = "higher" if higher else "lower"
                raise ValueError(
                    f"gate {key!r}: {', '.join(used)} does not fit {metric} ({direction} is better); {fix}"
                )

    def check_against(self, recipe: Recipe) -> None:
        """Checks that need the rest of the recipe: formats and files."""
        for index, dataset in enumerate(self.datasets):
            where = f"eval.datasets[{index}] ({dataset.name})"
            data_format = dataset.format or recipe.data.format
            needs_prompt = [m for m in dataset.metrics if m in GENERATION_METRICS or m == "multiple_choice"]
            if data_format == "text" and needs_prompt and not dataset.explicitly_set("metrics"):
                # The default metric list includes exact_match; text has no prompt, so keep the loss-based ones.
                dataset.metrics = [m for m in dataset.metrics if m not in needs_prompt]
                needs_prompt = []
            if data_format == "text" and (needs_prompt or dataset.user_metrics):
                raise ValueError(
                    f"{where}: format text has no prompt to generate from, so {needs_prompt or 'user metrics'} "
                    "cannot be computed; use loss/perplexity/token_accuracy or a chat/prompt_completion dataset"
                )
            if dataset.columns is not None:
                unknown = sorted(set(dataset.columns) - set(FORMAT_COLUMNS[data_format]))
                if unknown:
                    raise ValueError(f"{where}: columns {unknown} do not apply to format {data_format!r}")
            if dataset.database is not None and not os.path.isfile(recipe.resolve(dataset.database)):
                raise ValueError(
                    f"{where}.database: {recipe.resolve(dataset.database)} not found; give the SQLite file"
                )
            for user in dataset.user_metrics:
                if not os.path.isfile(recipe.resolve(user.module)) or not user.module.endswith(".py"):
                    raise ValueError(
                        f"{where}: user metric {user.name!r} module {recipe.resolve(user.module)} is not a .py file"
                    )
        if self.general is not None:
            unknown = sorted(set(self.general.columns) - set(FORMAT_COLUMNS[self.general.format]))
            if unknown:
                raise ValueError(f"eval.general: columns {unknown} do not apply to format {self.general.format!r}")
        for key, gate in self.gates.items():  # again: text datasets may have lost their generation metrics above
            self._check_gate(key, gate)


class SovereigntySection(Section):
    offline: bool = Field(
        default=False,
        description="Refuse every network connection except loopback and allowed_hosts; sets the HF offline switches.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts reachable in offline mode (push, pull and downloads), e.g. [hub.internal.example]; "
        "a URL is reduced to its host. Loopback is always reachable.",
    )
    allowed_endpoints: list[str] = Field(
        default_factory=list,
        description="Older name of allowed_hosts (URLs); their hosts are added to allowed_hosts.",
    )
    audit_log: OptionalPathText = Field(
        default=None,
        description="Append-only JSONL audit log; default $SOVTUNE_AUDIT_LOG or ~/.sovtune/audit.jsonl.",
        json_schema_extra=PATH_FIELD,
    )
    data_scan: Literal["warn", "redact", "block"] = Field(
        default="warn",
        description="Secrets/PII found in the data: warn (counts only), redact (replace before tokenising), "
        "block (stop).",
    )
    allowed_licenses: list[str] = Field(
        default_factory=list,
        description="Base-model licences allowed (e.g. [apache-2.0, mit]); empty = no licence gate.",
    )

    @field_validator("allowed_hosts", "allowed_endpoints")
    @classmethod
    def _valid_hosts(cls, value: list[str]) -> list[str]:
        bad = [entry for entry in value if endpoint_host(entry) is None]
        if bad:
            raise ValueError(
                f"{bad} are not host names or http(s) URLs; write e.g. hub.internal.example or https://10.0.0.5:8443"
            )
        return value

    @model_validator(mode="after")
    def _merge_hosts(self) -> SovereigntySection:
        # Stored as bare hosts (lower case, IPs normalised): what the network guard compares.
        hosts = [endpoint_host(entry) for entry in [*self.allowed_hosts, *self.allowed_endpoints]]
        merged = list(dict.fromkeys(host for host in hosts if host))
        if merged != self.allowed_hosts:
            # validate_assignment would run this validator again; set the field without it.
            self.__dict__["allowed_hosts"] = merged
        return self

    @field_validator("allowed_licenses")
    @classmethod
    def _valid_licenses(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", name)]
        if bad:
            raise ValueError(f"{bad} are not licence ids; use SPDX-style ids such as apache-2.0, mit, llama3.1")
        return [name.lower() for name in value]


def _reachable_offline(host: str, sovereignty: SovereigntySection) -> bool:
    """Loopback or an allowed host: what offline mode lets through (sovtune.offline enforces the same rule)."""
    return is_loopback(host) or host in sovereignty.allowed_hosts


class Recipe(Section):
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION, description="Recipe schema version.")
    name: str = Field(
        default="run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=128,  # it names the run's folder and its lock file
        description="Run name (default: the file name).",
    )
    description: str | None = Field(default=None, description="What this recipe is for.")
    model: ModelSection = Field(
        description="The base model: model.name_or_path (hub id or local folder) and its revision."
    )
    quantization: QuantizationSection = Field(
        default_factory=QuantizationSection, description="Load the base quantised (QLoRA: 4bit) or not (default)."
    )
    adapter: AdapterSection = Field(
        default_factory=AdapterSection, description="The adapter trained on the frozen base: LoRA and its variants."
    )
    data: DataSection = Field(description="The training data: data.train (file, folder or hub id) and its format.")
    train: TrainSection = Field(
        default_factory=TrainSection, description="The optimisation: steps or epochs, batches, learning rate, logging."
    )
    eval: EvalSection = Field(
        default_factory=EvalSection,
        description="Base vs adapter on held-out data: metrics, the forgetting check, generation, intervals, gates.",
    )
    output: OutputSection = Field(default_factory=OutputSection, description="Where the run directory goes.")
    hub: HubSection = Field(
        default_factory=HubSection,
        description="Where `sovtune run` (hub.push) publishes the adapter; `sovtune push RUN` uses the run's recorded "
        "section only with --use-run-hub.",
    )
    sovereignty: SovereigntySection = Field(
        default_factory=SovereigntySection,
        description="Offline mode, allowed endpoints, the audit log, the data scan and the licence allow-list.",
    )
    # Where the recipe came from: relative input paths resolve against `base_dir`.
    source_path: str | None = Field(default=None, exclude=True, description="(internal) the recipe file.")

    @model_validator(mode="after")
    def _check_combinations(self) -> Recipe:
        if not looks_like_local_path(self.model.name_or_path) and not os.path.exists(
            self.resolve(self.model.name_or_path)
        ):
            if self.model.revision is None:
                raise ValueError(
                    f"model.revision: hub model {self.model.name_or_path!r} has no pinned revision; "
                    "set model.revision to a commit sha or tag so the run is reproducible"
                )
        if (
            self.quantization.mode != "none"
            and self.model.dtype == "float32"
            and self.quantization.compute_dtype
            in (
                "bfloat16",
                "float16",
            )
        ):
            raise ValueError(
                "quantization.compute_dtype is 16-bit but model.dtype is float32; use the same dtype for both"
            )
        return self

    @model_validator(mode="after")
    def _check_training_samples(self) -> Recipe:
        if self.train.eval_samples and self.data.format == "text":
            raise ValueError(
                "train.eval_samples: format text has no prompts to answer; remove it (held-out loss is logged anyway)"
            )
        return self

    @model_validator(mode="after")
    def _check_eval(self) -> Recipe:
        self.eval.check_against(self)
        return self

    @model_validator(mode="after")
    def _general_sources(self) -> Recipe:
        """`{general: true}` sources read eval.general's training text, in its format and columns."""
        general = self.eval.general
        for index, source in enumerate(self.data.train):
            if not source.general:
                continue
            where = f"data.train[{index}] (general: true)"
            if general is None:
                raise ValueError(
                    f"{where} replays the general text of eval.general, which is not set; add eval.general: "
                    "{path: <evaluated passages>, train: <other passages for replay>}, or give this source a path "
                    "and format: text"
                )
            if not source.path:
                if general.train is None:
                    raise ValueError(
                        f"{where} needs eval.general.train: general text for replay that shares no passage with "
                        f"eval.general ({general.path}), e.g. data/general/train.jsonl"
                    )
                source.path = general.train
            if self.resolve(source.path) == self.resolve(general.path):
                raise ValueError(
                    f"{where} reads {source.path}, the passages the forgetting check evaluates: replaying them would "
                    "hide forgetting; use other general text (eval.general.train)"
                )
            if source.format is None:
                source.format = general.format
            if source.columns is None:
                source.columns = dict(general.columns)
        return self

    @model_validator(mode="after")
    def _check_offline_push(self) -> Recipe:
        # Found here, not by the network guard after a whole training run.
        if self.sovereignty.offline and self.hub.push and self.hub.endpoint is None:
            raise ValueError(
                "sovereignty.offline with hub.push needs hub.endpoint (your private hub); "
                "offline mode refuses the public hub that $HF_ENDPOINT or the default would reach"
            )
        host = endpoint_host(self.hub.endpoint) if self.hub.endpoint else None
        if self.sovereignty.offline and self.hub.push and host and not _reachable_offline(host, self.sovereignty):
            raise ValueError(
                f"sovereignty.offline with hub.push: the hub's host {host} is not in sovereignty.allowed_hosts, so "
                f"offline mode would refuse the push after training; add it: allowed_hosts: [{host}]"
            )
        return self

    @property
    def base_dir(self) -> Path:
        return Path(self.source_path).resolve().parent if self.source_path else Path.cwd()

    def resolve(self, path: str) -> Path:
        """A recipe path made absolute: relative paths are relative to the recipe file's folder ("a/../b" is "b",
        also where the folder does not exist yet, as for `sovtune init`)."""
        expanded = Path(os.path.expanduser(path))
        return expanded if expanded.is_absolute() else Path(os.path.normpath(self.base_dir / expanded))

    @property
    def run_dir(self) -> Path:
        return Path(os.path.expanduser(self.output.dir)) if self.output.dir else Path("runs") / self.name

    def local_inputs(self) -> list[tuple[str, Path]]:
        """Every local file or folder the recipe reads, named by its field: what no command may delete."""
        named: list[tuple[str, str | None]] = [("the recipe", self.source_path)]
        named += [(f"data.train[{i}]", source.path) for i, source in enumerate(self.data.train)]
        named += [("data.eval", self.data.eval.path if self.data.eval else None)]
        if self.data.chat_template and "{" not in self.data.chat_template:
            named.append(("data.chat_template", self.data.chat_template))
        for i, dataset in enumerate(self.eval.datasets):
            named += [(f"eval.datasets[{i}].source", dataset.source.path if dataset.source else None)]
            named += [(f"eval.datasets[{i}].database", dataset.database)]
            named += [(f"eval.datasets[{i}].user_metrics", user.module) for user in dataset.user_metrics]
        named += [("eval.general", self.eval.general.path if self.eval.general else None)]
        named += [("sovereignty.audit_log", self.sovereignty.audit_log)]
        paths = [(what, self.resolve(value)) for what, value in named if value]
        if self.model_is_local:
            paths.append(("model.name_or_path", Path(self.model_location)))
        return [(what, path) for what, path in paths if os.path.lexists(path)]

    @property
    def model_is_local(self) -> bool:
        return looks_like_local_path(self.model.name_or_path) or os.path.exists(self.resolve(self.model.name_or_path))

    @property
    def model_location(self) -> str:
        """What to hand to `from_pretrained`: an absolute local folder or the hub id."""
        return str(self.resolve(self.model.name_or_path)) if self.model_is_local else self.model.name_or_path

    def to_yaml(self) -> str:
        """The resolved recipe; `source_path` is kept so relative paths still resolve when re-loaded from a run."""
        dumped = self.model_dump(mode="json", exclude_none=False)
        dumped["source_path"] = self.source_path
        # A ${TOKEN} interpolated into any field must not reach recipe.yaml, the manifest or a published card.
        return redact_secrets(yaml.safe_dump(dumped, sort_keys=False))
