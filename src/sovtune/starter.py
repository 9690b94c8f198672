"""`sovtune init`: a commented starter recipe from a few answers, validated before it is written."""

from __future__ import annotations

from pathlib import Path

import yaml

from sovtune.config import looks_like_local_path, validate_recipe
from sovtune.core.files import atomic_write_text
from sovtune.errors import RecipeError

# Per target GPU: (quantisation, batch size, gradient accumulation, max length, optimizer, comment).
GPU_PRESETS = {
    "cpu": ("none", 4, 1, 512, "adamw_torch", "CPU: only small models are practical"),
    "rtx4090-24gb": ("4bit", 4, 4, 1024, "paged_adamw_8bit", "24 GB: QLoRA for 7-8B models"),
    "l4-24gb": ("4bit", 4, 4, 1024, "paged_adamw_8bit", "24 GB: QLoRA for 7-8B models"),
    "a100-40gb": ("4bit", 8, 2, 2048, "paged_adamw_8bit", "40 GB: QLoRA for 7-13B, LoRA for <= 7B at short context"),
    "a100-80gb": ("none", 8, 2, 2048, "adamw_torch_fused", "80 GB: bf16 LoRA for 7-8B models"),
    "h100-80gb": ("none", 8, 2, 2048, "adamw_torch_fused", "80 GB: bf16 LoRA for 7-8B models"),
}

TEMPLATE = """\
# {name}: LoRA fine-tune of {model} on {data} ({gpu_comment}).
# Check first (no weights downloaded):  sovtune check {path}
# Then train and evaluate:              sovtune run {path}
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
  target_modules: all-linear
data:
  train: {data}
  eval_fraction: 0.1    # or eval: path/to/heldout.jsonl
  format: {format}        # messages | instruction | prompt_completion | text
  max_length: {max_length}
train:
  epochs: 2
  batch_size: {batch}
  gradient_accumulation: {accumulation}   # effective batch = batch_size x this x GPUs
  learning_rate: 2.0e-4
  optimizer: {optimizer}
  gradient_checkpointing: {checkpointing}
"""


def starter_recipe(path: Path, model: str, data: str, data_format: str, gpu: str, revision: str | None) -> str:
    if gpu not in GPU_PRESETS:
        raise RecipeError(f"--gpu {gpu!r}: unknown; choose one of {', '.join(GPU_PRESETS)}")
    if not looks_like_local_path(model) and not Path(model).exists() and not revision:
        raise RecipeError(f"--model {model!r} is a hub id: pass --revision <commit sha> so the run is reproducible")
    quant, batch, accumulation, max_length, optimizer, comment = GPU_PRESETS[gpu]
    name = path.stem
    text = TEMPLATE.format(
        name=name,
        model=model,
        data=data,
        gpu_comment=comment,
        path=path,
        quant=quant,
        revision_line=f"  revision: {revision}    # pinned: the run is reproducible" if revision else "",
        format=data_format,
        max_length=max_length,
        batch=batch,
        accumulation=accumulation,
        optimizer=optimizer,
        checkpointing="true" if gpu != "cpu" else "false",
    )
    data_dict = yaml.safe_load(text)
    data_dict["source_path"] = str(path.resolve())
    validate_recipe(data_dict)
    return text


def write_starter(path: Path, text: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise RecipeError(f"{path}: already exists; choose another path or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
