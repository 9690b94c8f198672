"""`sovtune init`: a commented starter recipe from a few answers, validated before it is written."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sovtune import data, plan
from sovtune import model as models
from sovtune.config import GENERATION_METRICS, Recipe, looks_like_local_path, validate_recipe
from sovtune.core.files import atomic_write_text, check_output_place
from sovtune.errors import RecipeError, SovtuneError

# Per target GPU: (quantisation, batch size, gradient accumulation, max length, optimizer, comment).
GPU_PRESETS = {
    "cpu": ("none", 4, 1, 512, "adamw_torch", "CPU: only small models are practical"),
    "rtx4090-24gb": ("4bit", 4, 4, 1024, "paged_adamw_8bit", "24 GB: QLoRA for 7-8B models"),
    "l4-24gb": ("4bit", 4, 4, 1024, "paged_adamw_8bit", "24 GB: QLoRA for 7-8B models"),
    "a100-40gb": ("4bit", 8, 2, 2048, "paged_adamw_8bit", "40 GB: QLoRA for 7-13B, LoRA for <= 7B at short context"),
    "a100-80gb": ("none", 8, 2, 2048, "adamw_torch_fused", "80 GB: bf16 LoRA for 7-8B models"),
    "h100-80gb": ("none", 8, 2, 2048, "adamw_torch_fused", "80 GB: bf16 LoRA for 7-8B models"),
}
# The general-text set `init` uses for the forgetting check unless told otherwise (relative to the working directory).
SHIPPED_GENERAL = Path("data/general/eval.jsonl")
LOSS_FIRST = ["loss", "perplexity", "token_accuracy"]

TEMPLATE = """\
# {name}: LoRA fine-tune of {model} on {data} ({gpu_comment}).
# Check first (no weights downloaded):  sovtune check {path}
# Then train and evaluate:              sovtune run {path}
# A quick try (a few steps):            sovtune run {path} --set train.max_steps=20
name: {name}
model:
  name_or_path: {model}
{revision_line}
quantization:
  mode: {quant}            # none | 4bit (QLoRA) | 8bit
adapter:
  r: 16                 # rank: 8-64; higher learns more, costs more memory
  alpha: 32             # usually alpha = 2 * r
  dropout: 0.05
  target_modules: {targets}
data:
  train:
    - {data}
{replay_line}
{eval_line}
  format: {format}        # messages | instruction | prompt_completion | text
{template_line}  max_length: {max_length}
train:
  epochs: 2             # passes over the data; --set train.max_steps=N replaces it
  batch_size: {batch}
  gradient_accumulation: {accumulation}   # effective batch = batch_size x this x GPUs
  learning_rate: 2.0e-4
  optimizer: {optimizer}
  gradient_checkpointing: {checkpointing}
eval:
  datasets:
    - name: eval          # the held-out data above, base vs adapter
      metrics: [{metrics}]
{database_line}
{general_block}
  # Gates fail `sovtune run` (exit 3) when the adapter does not show the gain, or forgets too much:
  # gates:
  #   eval/{gated}: {{min_gain: 0.05, significant: true}}
{forgetting_gate}
"""


# Chat templates for bases whose tokenizer ships none, by the model's config: its model_type, and the vocabulary size
# where one architecture serves several families. Anything else gets "plain", which works with any vocabulary.
FAMILY_TEMPLATES = {"mistral": "mistral", "mixtral": "mistral", "starcoder2": "starcoder2"}
LLAMA_VOCABULARIES = {128256: "llama3", 32000: "llama2", 102400: "deepseek"}


def family_template(arch: plan.Architecture) -> str:
    if arch.model_type == "llama":
        return LLAMA_VOCABULARIES.get(arch.vocab_size, "plain")
    return FAMILY_TEMPLATES.get(arch.model_type, "plain")


def ships_chat_template(recipe: Recipe) -> bool | None:
    """Whether the model's tokenizer comes with a chat template (None: its files cannot be read from here)."""
    if recipe.model_is_local:
        folder = Path(recipe.model_location)
        if any((folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
            return True
        return _has_template(folder / "tokenizer_config.json")
    from huggingface_hub import hf_hub_download

    try:  # only what is cached: init downloads nothing
        found = hf_hub_download(
            recipe.model.name_or_path, "tokenizer_config.json", revision=recipe.model.revision, local_files_only=True
        )
    except Exception:  # not cached: unknown, and the starter says so
        return None
    return _has_template(Path(found))


def _has_template(config: Path) -> bool | None:
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return None


def family_settings(recipe: Recipe, data_format: str) -> tuple[str, str]:
    """The target_modules value and the chat-template line for the model's family, read from its config."""
    try:
        arch = plan.load_architecture(recipe)
    except plan.PlanError:
        return "all-linear     # the model's config could not be read here: every linear layer", ""
    names = sorted({layer.leaf for layer in arch.quantisable()})
    targets = f"[{', '.join(names)}]   # every linear layer of {arch.model_type} (= all-linear)"
    if data_format not in ("messages", "instruction"):
        return targets, ""
    ships = ships_chat_template(recipe)
    builtin = family_template(arch)
    if ships:
        return targets, "  # chat_template: the tokenizer's own\n" + _system_line(recipe, None)
    if ships is None:
        return (
            targets,
            f"  # chat_template: {builtin}   # built-in for {arch.model_type}, if its tokenizer ships none\n",
        )
    return (
        targets,
        f"  chat_template: {builtin}   # built-in for {arch.model_type}: the tokenizer ships none\n"
        + _system_line(recipe, builtin),
    )


def _system_line(recipe: Recipe, builtin: str | None) -> str:
    """`system_message: merge` where the chosen template rejects or drops system messages (Gemma, Mistral, Phi-3):
    a local tokenizer is loaded to find out, nothing is downloaded; '' when it takes them or cannot be read here."""
    if not recipe.model_is_local:
        return ""
    chosen = recipe.model_copy(update={"data": recipe.data.model_copy(update={"chat_template": builtin})})
    try:
        tokenizer = models.load_tokenizer(chosen)
        data.place_system_text([{"role": "system", "content": "s"}], tokenizer, "keep")
    except data.TemplateError as exc:
        why = "rejects" if "rejects" in str(exc) else "drops"
        return f"  system_message: merge   # the template {why} system messages: their text opens the first user turn\n"
    except SovtuneError:  # the tokenizer cannot be read here: `sovtune check` says why
        return ""
    return ""


@dataclass
class StarterAnswers:
    """What `sovtune init` was told; paths as typed (relative to the working directory, or absolute)."""

    model: str = "data/base-model"
    data: str = "data/sql/train.jsonl"
    data_format: str = "messages"
    gpu: str = "cpu"
    revision: str | None = None
    eval: str | None = None
    metrics: list[str] = field(default_factory=list)
    database: str | None = None
    general: str | None = None  # None: the shipped set when it exists
    no_general: bool = False


def recipe_path_value(value: str, recipe: Path) -> str:
    """A path typed on the command line as the recipe must hold it: absolute paths stay absolute, relative ones
    (relative to the working directory) become relative to the recipe's folder; hub ids stay hub ids."""
    expanded = Path(os.path.expanduser(value))
    if expanded.is_absolute() or not (looks_like_local_path(value) or expanded.exists()):
        return value
    target, folder = Path(os.path.abspath(expanded)), Path(os.path.abspath(recipe)).parent  # symlinks kept
    if os.path.commonpath([target, folder]) == target.anchor:  # nothing shared but the root: say it absolutely
        return str(target)
    relative = os.path.relpath(target, folder)
    return relative if relative.startswith(".") else f"./{relative}"


def starter_recipe(path: Path, answers: StarterAnswers) -> str:
    if answers.gpu not in GPU_PRESETS:
        raise RecipeError(f"--gpu {answers.gpu!r}: unknown; choose one of {', '.join(GPU_PRESETS)}")
    model = answers.model
    if not looks_like_local_path(model) and not Path(model).exists() and not answers.revision:
        raise RecipeError(f"--model {model!r} is a hub id: pass --revision <commit sha> so the run is reproducible")
    quant, batch, accumulation, max_length, optimizer, comment = GPU_PRESETS[answers.gpu]
    metrics = _metrics(answers)
    general, general_train = _general(answers, path)
    fields = dict(
        name=path.stem,
        model=recipe_path_value(model, path),
        data=recipe_path_value(answers.data, path),
        gpu_comment=comment,
        path=path,
        quant=quant,
        revision_line=f"  revision: {answers.revision}    # pinned: the run is reproducible"
        if answers.revision
        else "",
        replay_line=_replay_line(general_train),
        eval_line=(
            f"  eval: {recipe_path_value(answers.eval, path)}    # held-out rows: base vs adapter are compared on them"
            if answers.eval
            else "  eval_fraction: 0.1    # a seeded 10% of train is held out; or eval: path/to/heldout.jsonl"
        ),
        format=answers.data_format,
        max_length=max_length,
        batch=batch,
        accumulation=accumulation,
        optimizer=optimizer,
        checkpointing="true" if answers.gpu != "cpu" else "false",
        metrics=", ".join(metrics),
        gated=next((m for m in metrics if m not in LOSS_FIRST), "loss"),
        database_line=(
            f"      database: {recipe_path_value(answers.database, path)}" if answers.database is not None else ""
        ),
        general_block=_general_block(general, general_train),
        forgetting_gate="  #   general_perplexity: {max_increase: 0.10, confident: true}" if general else "",
    )
    draft = _validated(_render(fields, "all-linear", ""), path)
    targets, template_line = family_settings(draft, answers.data_format)
    text = _render(fields, targets, template_line)
    _validated(text, path)
    return text


def _render(fields: dict[str, Any], targets: str, template_line: str) -> str:
    text = TEMPLATE.format(**fields, targets=targets, template_line=template_line)
    return "\n".join(line for line in text.splitlines() if line.strip()) + "\n"  # the lines of unused slots go


def _validated(text: str, path: Path) -> Recipe:
    data_dict = yaml.safe_load(text)
    data_dict["source_path"] = str(path.resolve())
    return validate_recipe(data_dict)


def _metrics(answers: StarterAnswers) -> list[str]:
    chosen = list(dict.fromkeys(answers.metrics))
    if answers.data_format == "text":
        generating = [metric for metric in chosen if metric in GENERATION_METRICS]
        if generating:
            raise RecipeError(
                f"--metric {generating[0]}: format text has no prompt to generate from; use loss, perplexity or "
                "token_accuracy, or a chat/prompt_completion format"
            )
        return [*LOSS_FIRST, *(metric for metric in chosen if metric not in LOSS_FIRST)]
    return [*LOSS_FIRST, *(metric for metric in chosen or ["exact_match"] if metric not in LOSS_FIRST)]


def _general(answers: StarterAnswers, path: Path) -> tuple[str | None, str | None]:
    """The forgetting check's general text (and replay text beside it, train.jsonl), as the recipe holds them."""
    if answers.no_general:
        return None, None
    chosen = Path(answers.general) if answers.general is not None else SHIPPED_GENERAL
    if answers.general is None and not chosen.is_file():
        return None, None
    if not chosen.exists():
        raise RecipeError(
            f'--general {answers.general}: not found; give a JSONL file of general text ({{"text": ...}})'
        )
    beside = chosen.with_name("train" + chosen.suffix)
    replay = recipe_path_value(str(beside), path) if beside.is_file() and beside.resolve() != chosen.resolve() else None
    return recipe_path_value(str(chosen), path), replay


def _replay_line(general_train: str | None) -> str:
    if general_train is None:
        return ""
    return "    # - {general: true, weight: 0.1}   # replay general text (eval.general.train): less forgetting"


def _general_block(general: str | None, general_train: str | None) -> str:
    if general is None:
        return "  # No forgetting check: sovtune init --general path/to/general.jsonl adds one."
    lines = [
        "  general:",
        f"    path: {general}    # the forgetting check: perplexity on general text, base vs adapter",
    ]
    if general_train is not None:
        lines.append(f"    train: {general_train}    # other general text, for replay (data.train above)")
    return "\n".join(lines)


def write_starter(path: Path, text: str, overwrite: bool) -> None:
    if path.is_symlink() or path.is_dir():
        raise RecipeError(f"{path}: is a folder or a link, not a recipe file; give the file's name, e.g. mine.yaml")
    if path.exists() and not overwrite:
        raise RecipeError(f"{path}: already exists; choose another path or pass --overwrite")
    check_output_place(path, "the recipe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot write the recipe ({exc.strerror or exc}); choose a writable place") from None
