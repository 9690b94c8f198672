"""Throughput settings of a training run: padding-free or length-grouped batches, Liger kernels, torch.compile,
mixed precision, the attention kernel and how the loss meets the vocabulary, each decided from the recipe, the model
and the machine, with its reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from sovtune import model as models
from sovtune.config import Recipe
from sovtune.errors import SovtuneError

log = logging.getLogger(__name__)

# Varlen kernels read the per-example boundaries (cu_seq_lens) that TRL's padding-free collator passes.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
# These get the block-diagonal causal mask that transformers' masking utilities build from position ids
# restarting at 0 (masking_utils.find_packed_sequence_indices), provided the modeling code uses those utilities.
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")
LIGER_MIN_VERSION = (0, 3, 0)  # what transformers' `apply_liger_kernel` accepts
# Without a varlen kernel (the CPU) a row's block-diagonal mask costs the square of the row's length, so a row holds
# at most this many tokens (counted as data.max_length per example): one example per pass at max_length 1024, eight
# at 128. Both were faster than one row of the whole batch (docs/benchmarks.md).
CPU_ROW_TOKENS = 1024


class SpeedError(SovtuneError):
    """A throughput setting the recipe asks for cannot be honoured on this model or machine."""


@dataclass(frozen=True)
class Decision:
    setting: str  # batching | attention | precision | liger kernels | torch.compile
    choice: str
    reason: str

    def line(self) -> str:
        return f"{self.setting}: {self.choice} ({self.reason})"


ROWS = "padding-free rows"
ONE_BY_ONE = "one example per micro-batch"
GROUPED = "padded, grouped by length"


@dataclass
class SpeedPlan:
    batching: str  # ROWS | ONE_BY_ONE | GROUPED
    micro_batch_size: int  # examples per forward pass
    accumulation: int  # forward passes per optimizer step (per device)
    liger_kernel: bool
    torch_compile: bool
    decisions: list[Decision] = field(default_factory=list)
    # The loss projects only the supervised positions to the vocabulary (transformers' `logits_to_keep` mask) instead
    # of TRL's fused LM head, which scores every position where it has no Triton kernel (training.supervised_loss).
    supervised_logits: bool = False

    @property
    def padding_free(self) -> bool:
        """TRL's padding-free collator: the micro-batch's examples flattened into one row."""
        return self.batching == ROWS

    def sft_kwargs(self, max_length: int) -> dict[str, Any]:
        """The `SFTConfig` arguments this plan sets."""
        return {
            "per_device_train_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.accumulation,
            # Never TRL's bin packing: an optimizer step keeps train.batch_size x gradient_accumulation examples.
            "packing": False,
            "padding_free": self.padding_free,
            # data.py has already cut every example to data.max_length. TRL refuses a max_length it cannot enforce on
            # padding-free batches without packing, so it gets None there; elsewhere its truncation is a no-op.
            "max_length": None if self.padding_free else max_length,
            "train_sampling_strategy": "group_by_length" if self.batching == GROUPED else "random",
            "use_liger_kernel": self.liger_kernel,
            "torch_compile": self.torch_compile,
        }

    def lines(self) -> list[str]:
        return [decision.line() for decision in self.decisions]


def plan_speed(recipe: Recipe, model: Any | None = None, cuda: bool | None = None) -> SpeedPlan:
    """Decide every throughput setting; `model` (the loaded base or peft model) refines the batching decision."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    attention = attention_implementation(recipe, model)
    decisions = [_attention_decision(attention, cuda), _precision_decision(recipe, cuda)]
    batching, micro_batch, passes, batching_decision = _batching(recipe, model, attention, cuda)
    liger, liger_decision = _liger(recipe, model, cuda)
    compile_model, compile_decision = _compile(recipe, cuda)
    supervised, loss_decision = _loss_head(model, cuda)
    decisions = [batching_decision, *decisions, liger_decision, compile_decision, loss_decision]
    return SpeedPlan(batching, micro_batch, passes, liger, compile_model, decisions, supervised)


def announce_plan(speed_plan: SpeedPlan) -> None:
    """Log each decision with its reason."""
    for line in speed_plan.lines():
        log.info("speed: %s", line)


def attention_implementation(recipe: Recipe, model: Any | None = None) -> str:
    """What the model runs (transformers records it in the config), else what model.py will ask for."""
    config = getattr(model, "config", None)
    loaded = getattr(config, "_attn_implementation", None) if config is not None else None
    return loaded or models.attn_implementation(recipe)


def padding_free_blocker(model: Any | None, attention: str) -> str | None:
    """Why examples sharing a row could attend to each other under this model and kernel; None when they cannot."""
    if attention in VARLEN_ATTENTION:
        return None
    if attention not in MASKED_ATTENTION:
        return f"attention implementation {attention!r} is not known to keep examples in one row apart"
    if model is None:
        return None  # decided again once the model is loaded
    base = _base_model(model)
    module = sys.modules.get(type(base).__module__)
    if module is None or not any(hasattr(module, name) for name in MASK_BUILDERS):
        return (
            f"{type(base).__name__} does not build its attention mask with transformers' masking utilities, "
            "so examples sharing a row would attend to each other"
        )
    return None


def _base_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)  # peft wrappers
    return get_base() if callable(get_base) else model


def _batching(recipe: Recipe, model: Any | None, attention: str, cuda: bool) -> tuple[str, int, int, Decision]:
    """(batching, examples per forward pass, forward passes per optimizer step, decision).

    The examples of an optimizer step never change: a batch split into smaller forward passes is accumulated, and
    the loss is normalised by the supervised tokens of the whole step (tests/test_loss_normalisation.py).
    """
    batch, accumulation = recipe.train.batch_size, recipe.train.gradient_accumulation
    choice = recipe.data.packing
    if choice is False:
        return GROUPED, batch, accumulation, Decision("batching", GROUPED, "data.packing: false")
    if batch == 1:
        return ONE_BY_ONE, 1, accumulation, Decision("batching", ONE_BY_ONE, "train.batch_size is 1: nothing to pad")
    micro, why_smaller = batch, ""
    if choice == "auto" and not cuda:
        micro = largest_divisor_at_most(batch, CPU_ROW_TOKENS // recipe.data.max_length)
        fits = max(1, CPU_ROW_TOKENS // recipe.data.max_length)
        why_smaller = (
            f"no varlen attention kernel on the CPU: a row's block-diagonal mask costs the square of its length, so a "
            f"row holds at most {CPU_ROW_TOKENS} tokens ({fits} example{'s' if fits > 1 else ''} of data.max_length "
            f"{recipe.data.max_length})"
        )
    passes = batch // micro * accumulation
    if micro == 1:
        return (
            ONE_BY_ONE,
            1,
            passes,
            Decision(
                "batching",
                f"padding-free, {ONE_BY_ONE}, {passes} accumulated per optimizer step",
                f"{why_smaller}: one example per pass needs neither padding nor a mask",
            ),
        )
    blocker = padding_free_blocker(model, attention)
    if blocker is None:
        how = (
            f"{attention} reads each example's boundaries"
            if attention in VARLEN_ATTENTION
            else f"{attention} gets a block-diagonal causal mask"
        )
        split = f", {micro} examples per row, {passes} rows per optimizer step" if micro != batch else ""
        reason = f"each row restarts position ids per example; {how}" + (f"; {why_smaller}" if split else "")
        return ROWS, micro, passes, Decision("batching", ROWS + split, reason)
    if choice is True:
        raise SpeedError(
            f"data.packing: true, but {blocker}; set data.packing: auto (length-grouped padded batches) or false"
        )
    return GROUPED, batch, accumulation, Decision("batching", GROUPED, f"padding-free rows are off: {blocker}")


def largest_divisor_at_most(number: int, limit: int) -> int:
    """The largest divisor of `number` not above `limit` (at least 1), so micro-batches tile the batch exactly."""
    return max(d for d in range(1, max(1, min(number, limit)) + 1) if number % d == 0)


def _attention_decision(attention: str, cuda: bool) -> Decision:
    if not cuda:
        return Decision("attention", attention, "flash-attention needs CUDA")
    if attention in VARLEN_ATTENTION:
        return Decision("attention", attention, "varlen kernels: padding-free rows cost no attention across examples")
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        return Decision("attention", attention, "set by model.attn_implementation")
    return Decision(
        "attention", attention, "flash-attn is not installed: pip install 'sovtune[flash-attn]' for varlen kernels"
    )


def _precision_decision(recipe: Recipe, cuda: bool) -> Decision:
    import torch

    dtype = models.resolve_dtype(recipe.model.dtype)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    if not cuda:
        return Decision("precision", name, "no CUDA device: 16-bit mixed precision is a GPU setting here")
    if dtype == torch.float32:
        return Decision("precision", name, "model.dtype: float32")
    why = "model.dtype: auto picks bf16 where the GPU supports it" if recipe.model.dtype == "auto" else "model.dtype"
    return Decision("precision", f"{name} mixed precision", why)


def liger_model_types() -> set[str] | None:
    """Model types Liger can patch, or None when a usable liger-kernel is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None
    if _version_tuple(version) < LIGER_MIN_VERSION:
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _liger(recipe: Recipe, model: Any | None, cuda: bool) -> tuple[bool, Decision]:
    choice = recipe.train.liger_kernel
    if choice is False:
        return False, Decision("liger kernels", "off", "train.liger_kernel: false")
    if not cuda:
        return False, Decision(
            "liger kernels", "off", "Liger's kernels are Triton GPU kernels and there is no CUDA device"
        )
    supported = liger_model_types()
    if supported is None:
        if choice is True:
            raise SpeedError(
                "train.liger_kernel: true, but liger-kernel is not installed; pip install 'sovtune[liger]' or set auto"
            )
        return False, Decision("liger kernels", "off", "liger-kernel is not installed: pip install 'sovtune[liger]'")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is not None and model_type not in supported:
        if choice is True:
            raise SpeedError(
                f"train.liger_kernel: true, but Liger has no kernels for model type {model_type!r}; set auto"
            )
        return False, Decision("liger kernels", "off", f"Liger has no kernels for model type {model_type!r}")
    # TRL's fused, chunked LM head already computes the loss without the full logits, so Liger's fused linear
    # cross-entropy stays off (TRL refuses it) and Liger contributes RMSNorm, RoPE and SwiGLU.
    return True, Decision("liger kernels", "on", "RMSNorm, RoPE and SwiGLU; TRL's fused LM head computes the loss")


def takes_logits_to_keep(model: Any) -> bool:
    """transformers' causal LMs project only the positions `logits_to_keep` names; older remote code may not."""
    return "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters


def _loss_head(model: Any | None, cuda: bool) -> tuple[bool, Decision]:
    """Where the loss meets the vocabulary. TRL's fused, chunked LM head skips unsupervised positions only with its
    Triton kernels (CUDA); elsewhere it projects every position, prompt tokens included, and projects again in the
    backward pass. On the CPU the supervised positions alone are projected instead (1.4x the training steps per second
    on the quickstart, docs/benchmarks.md), with the same loss and gradients (tests/test_loss_normalisation.py)."""
    fused = "TRL's fused, chunked LM head"
    if cuda:
        return False, Decision("loss", fused, "its Triton kernels score only the supervised positions")
    if model is not None and not takes_logits_to_keep(model):
        return False, Decision("loss", fused, f"{type(_base_model(model)).__name__} does not take logits_to_keep")
    return True, Decision(
        "loss",
        "supervised positions only",
        "no Triton on the CPU: TRL's fused LM head would project every position, the prompt's too, and again in "
        "the backward pass",
    )


def _compile(recipe: Recipe, cuda: bool) -> tuple[bool, Decision]:
    if not recipe.train.torch_compile:
        return False, Decision("torch.compile", "off", "train.torch_compile: false")
    if not cuda:
        return False, Decision(
            "torch.compile", "off", "no CUDA device: compiling on the CPU takes minutes and is set aside here"
        )
    return True, Decision(
        "torch.compile", "on", "train.torch_compile: true (the first steps are slow while it compiles)"
    )
