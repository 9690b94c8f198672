"""`sovtune merge`: the adapter folded into its base model, checked against the unmerged adapter before writing.

A QLoRA adapter is merged into the base reloaded unquantised (never into 4-bit weights, peft #2321). The merge runs
in bf16 on CUDA GPUs that support it (fp16 on older ones) and in fp32 on the CPU, where 16-bit matmuls are slow and
less exact; `--dtype` chooses explicitly.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sovtune import model as models
from sovtune.config import RunOptIns, load_run_recipe
from sovtune.core.files import (
    atomic_write_json,
    check_output_place,
    deletion_hazard,
    fsync_tree,
    make_output_dir,
    replace_dir,
    temporary_sibling,
)
from sovtune.core.hashing import now, sha256_file, tree_entries
from sovtune.core.rundir import RunDir
from sovtune.data import render_template
from sovtune.errors import DataError, SovtuneError
from sovtune.inputs import prepare_recipe_data
from sovtune.run.verify import verify_before_loading

MERGE_REPORT = "sovtune_merge.json"
MAX_TOKENS = 128
# Allowed max |merged - adapter| logit difference, as a share of the largest |logit|. Merging changes only the
# rounding: W + s*B@A is rounded once instead of computing x@W and s*(x@A)@B separately. fp32: unit roundoff
# u = 6e-8, accumulated over dot products of length hidden and over every layer, stays below 1e-3 even for
# 8k-wide, 80-layer models (the 2-layer test model shows ~1e-6). 16-bit: the merged weight is rounded to unit
# roundoff u = 2^-8 (bf16) or 2^-11 (fp16); the 2-layer test model in bf16 already shows ~5u, so 16u leaves room
# for deeper models. A wrong merge (missing alpha/r scale, a layer left out, the adapter dropped) moves logits by
# the size of the adapter's own effect, typically well over 10% of the largest logit, and is reported beside it.
RTOL = {"float32": 1e-3, "bfloat16": 16 * 2**-8, "float16": 16 * 2**-11}
ATOL = 1e-5  # keeps the check meaningful for near-zero logits


class MergeError(SovtuneError):
    """The merge cannot run, or the merged model does not reproduce the adapter's outputs."""


@dataclass
class MergeCheck:
    dtype: str
    examples: int
    tokens: int
    source: str  # "held-out data" or "probe texts"
    max_abs_diff: float
    logit_scale: float
    tolerance: float
    top1_agreement: float
    mean_kl: float
    adapter_effect: float  # max |adapter - base| logit difference: what a wrong merge would lose

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        return (
            f"merged vs adapter logits on {self.examples} {self.source} ({self.tokens} tokens): max |diff| "
            f"{self.max_abs_diff:.2e} (tolerance {self.tolerance:.2e}, adapter effect {self.adapter_effect:.2e}), "
            f"top-1 agreement {self.top1_agreement:.1%}"
        )


@dataclass
class MergeResult:
    out_dir: Path
    check: MergeCheck
    report: dict[str, Any]


def merge_dtype(choice: str = "auto") -> str:
    import torch

    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def merge(
    run_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    examples: int = 4,
    overwrite: bool = False,
    opt_ins: RunOptIns = RunOptIns(),
    verify: bool = True,
) -> MergeResult:
    """Load base (unquantised) + adapter, compare logits before and after `merge_and_unload`, then write atomically.

    The run folder is data: verified against its manifest first (unless not `verify`), its recipe held to `opt_ins`.
    """
    import torch

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = RunDir(run_dir)
    adapter_dir = run.adapter_dir
    _check_paths(run_dir, adapter_dir, out_dir, overwrite)
    if dtype not in ("auto", *RTOL):
        raise MergeError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    if verify:
        verify_before_loading(run_dir)
    recipe = load_run_recipe(run_dir, opt_ins=opt_ins)
    _check_replaceable(out_dir, overwrite, [*recipe.local_inputs(), ("the run directory", run_dir)])
    models.check_adapter_files(adapter_dir, opt_ins.allow_pickle_weights)
    chosen = merge_dtype(dtype)
    if chosen == "float16" and not torch.cuda.is_available():
        raise MergeError("--dtype float16 needs a CUDA GPU (fp16 matmuls are not supported on the CPU); use float32")
    recipe.model.dtype = chosen
    tokenizer = models.load_adapter_tokenizer(recipe, adapter_dir)
    base = models.load_base_model(recipe, tokenizer, quantize=False)
    if torch.cuda.is_available():
        base = base.to(models.device())
    adapted = models.load_adapter(base, adapter_dir, allow_pickle=opt_ins.allow_pickle_weights)
    adapted.eval()
    batch, source = held_out_batch(recipe, tokenizer, examples)
    with torch.no_grad():
        reference = _logits(adapted, batch)
        with adapted.disable_adapter():
            base_logits = _logits(adapted, batch)
        merged = adapted.merge_and_unload(safe_merge=True)
        merged_logits = _logits(merged, batch)
    check = compare(reference, merged_logits, base_logits, batch["attention_mask"], chosen, source)
    if not check.passed:
        raise MergeError(f"the merged model does not reproduce the adapter: {check.describe()}; nothing was written")
    manifest = run.manifest() if (run / RunDir.MANIFEST).exists() else None
    report = {
        "merged_at": now(),
        "run_dir": str(run_dir.resolve()),
        "base_model": {"location": recipe.model_location, "revision": recipe.model.revision},
        "training_quantization": recipe.quantization.mode,
        "merged_into": f"{chosen} weights of the base reloaded unquantised",
        "adapter_files": {p.relative_to(adapter_dir).as_posix(): sha256_file(p) for p in run.adapter_files()},
        "manifest_sha256": sha256_file(run / RunDir.MANIFEST) if manifest is not None else None,
        "check": {**asdict(check), "passed": check.passed},
    }
    _write(merged, tokenizer, out_dir, report)
    report["files"] = tree_entries(out_dir, names=None)
    return MergeResult(out_dir=out_dir, check=check, report=report)


def _check_paths(run_dir: Path, adapter_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if not (RunDir(run_dir) / RunDir.RECIPE).is_file():
        raise MergeError(f"{run_dir}: no recipe.yaml; give a run directory written by `sovtune train`")
    if not (adapter_dir / RunDir.ADAPTER_CONFIG).is_file():
        raise MergeError(f"{run_dir}: no trained adapter in {adapter_dir}; run `sovtune train` first")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"{out_dir}: OUT is a file; give a folder for the merged model")
    check_output_place(out_dir, "the merged model")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise MergeError(f"{out_dir}: already exists and is not empty; choose another OUT or pass --overwrite")
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve().is_relative_to(out_dir.resolve()):
        raise MergeError(f"{out_dir}: OUT must not be the run directory or contain it; choose a new folder")


def _check_replaceable(out_dir: Path, overwrite: bool, inputs: list[tuple[str, Path]]) -> None:
    """OUT is written by swapping a new folder in: an existing OUT is replaced only when it is a model an earlier
    `sovtune merge` wrote (its merge report is there), and never when it is a link or holds what the merge reads."""
    if out_dir.is_symlink():
        raise MergeError(f"{out_dir}: OUT is a symbolic link; sovtune never replaces through one; give a real folder")
    if not out_dir.is_dir():
        return
    hazard = deletion_hazard(out_dir, inputs)  # an empty OUT is swapped out too
    if hazard is None and any(out_dir.iterdir()) and not (out_dir / MERGE_REPORT).is_file():
        hazard = f"it is not a model written by sovtune merge (no {MERGE_REPORT})"
    if hazard is not None:
        raise MergeError(f"{out_dir}: OUT refused, nothing was deleted: {hazard}; choose a new folder")


def held_out_batch(recipe: Any, tokenizer: Any, examples: int) -> tuple[dict[str, Any], str]:
    """The first held-out examples of the run's data; generic probe texts when the data is not available here."""
    import torch

    try:
        sequences = [item.input_ids[:MAX_TOKENS] for item in prepare_recipe_data(recipe, tokenizer).eval[:examples]]
        source = "held-out examples"
    except (DataError, OSError):
        sequences = []
    if not sequences:
        source = "probe texts (held-out data not available)"
        # Rendered chat text carries the template's BOS: the tokenizer must not add a second one.
        chat = getattr(tokenizer, "chat_template", None) is not None
        sequences = [
            tokenizer(text, add_special_tokens=not chat)["input_ids"][:MAX_TOKENS]
            for text in _probe_texts(tokenizer)[:examples]
        ]
    width = max(len(ids) for ids in sequences)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in sequences])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences])
    return {"input_ids": input_ids, "attention_mask": mask}, source


def _probe_texts(tokenizer: Any) -> list[str]:
    questions = ["What does this model do?", "Summarise the last report.", "List three facts.", "Explain the result."]
    if getattr(tokenizer, "chat_template", None):
        return [
            render_template(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True) for q in questions
        ]
    return questions


def _logits(model: Any, batch: dict[str, Any]) -> Any:
    device = next(model.parameters()).device
    return model(**{key: value.to(device) for key, value in batch.items()}).logits.float().cpu()


def compare(reference: Any, merged: Any, base: Any, mask: Any, dtype: str, source: str) -> MergeCheck:
    """Differences over real (non-padding) positions only."""
    import torch

    keep = mask.bool()
    ref, got, plain = reference[keep], merged[keep], base[keep]
    scale = float(ref.abs().max())
    log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(got, dim=-1)
    kl = torch.sum(log_p.exp() * (log_p - log_q), dim=-1)
    return MergeCheck(
        dtype=dtype,
        examples=int(mask.shape[0]),
        tokens=int(keep.sum()),
        source=source,
        max_abs_diff=float((ref - got).abs().max()),
        logit_scale=scale,
        tolerance=ATOL + RTOL[dtype] * scale,
        top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        mean_kl=float(kl.mean()),
        adapter_effect=float((ref - plain).abs().max()),
    )


def _write(merged: Any, tokenizer: Any, out_dir: Path, report: dict[str, Any]) -> None:
    """Into a hidden sibling folder first, then swapped in: OUT holds a complete model or nothing."""
    make_output_dir(out_dir.parent, "the merged model")
    staged = temporary_sibling(out_dir)
    shutil.rmtree(staged, ignore_errors=True)
    try:
        merged.save_pretrained(str(staged), safe_serialization=True)
        tokenizer.save_pretrained(str(staged))
        atomic_write_json(staged / MERGE_REPORT, report)
        fsync_tree(staged)
        # OUT exists here only when it was empty or --overwrite was given (checked before loading).
        replace_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
