"""`sovtune plan`: per-GPU training memory of a recipe from the model config alone (meta device, no weights),
whether it fits the chosen GPUs, and the smallest recipe change that would make it fit.

How each component is estimated (T = batch_size x max_length tokens per micro-batch, h = hidden size,
i = intermediate size, a / kv = attention / key-value heads, d = head dim, L = layers, V = vocabulary,
e = bytes of the compute dtype: 2 for bf16/fp16, 4 for fp32):

- base weights: 16-bit = 2 B/param. 4-bit NF4 = 0.5 B/param + constants (one absmax per 64 weights: fp32 =
  0.5 bit/param, or with double quantisation uint8 + one fp32 per 256 blocks = 0.127 bit/param, the QLoRA paper's
  figure); 8-bit = 1 B/param + one fp32 scale per output row. Layers bitsandbytes does not quantise (embeddings,
  output head, norms) stay in the model dtype, except that peft's `prepare_model_for_kbit_training` (which sovtune
  calls for QLoRA) upcasts them to fp32.
- adapter: each targeted linear adds r x (in + out) LoRA parameters (DoRA: + out), kept in fp32 by peft; gradients are
  the same size; AdamW keeps two fp32 moments (8 B/param), 8-bit AdamW ~2 B/param (tensors under 4,096 elements stay
  32-bit).
- activations per decoder layer, without gradient checkpointing (what autograd saves for the backward pass):
      8·T·h          the two RMSNorm inputs, upcast to fp32
    + e·T·h ·(1-2)   the normalised inputs, saved when a LoRA layer reads them (attention block / MLP block)
    + e·T·h·3 ... e·T·(h + 2·kv·d + h)
                     q after RoPE, k and v (repeated to `a` heads when a padding mask is present), attention output
    + 4·T·a          attention log-sum-exp
    + e·b·s²         the padding mask, converted per layer to the compute dtype by SDPA; with padding-free batches
                     (data.packing true/auto: the batch is one row, position ids restarting per example) the
                     block-diagonal mask over the row, e·(b·s)²; none with flash-attention 2 or a batch of one
    + e·T·i·4        gated MLP: gate, activation, up and their product (2 for a plain MLP)
    + e·T·Σr         LoRA A outputs (Σ over targeted linears of the layer); with LoRA dropout each targeted input
                     is copied (e+1 bytes)
  With gradient checkpointing only each layer's input (e·T·h) is kept, and one layer is recomputed during the backward
  pass.
- logits: TRL's SFTTrainer scores tokens with a fused, chunked LM head: tiles of min(T, 4096) x min(V, 32768) in the
  compute dtype and an fp32 gradient of the final hidden states; the full T x V fp32 logits are never built (the
  JSON output also gives what they would cost: T·V·(e + 12) bytes with their fp32 copy, log-softmax and gradient).
- backward working set: gradients of one layer's activations in flight (2·4·T·h + 3·e·T·i).
- sharding: FSDP / ZeRO-3 divide weights, trainable parameters, gradients and optimizer state by the number of GPUs and
  all-gather one decoder layer at a time (+2 layers of weights); DDP keeps full copies plus gradient buckets.
- framework overhead (CUDA only): 0.75 GiB for the CUDA context, cuBLAS workspace and kernels, plus 10 % of the tensors
  for allocator fragmentation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sovtune import model as models
from sovtune.config import Recipe
from sovtune.errors import SovtuneError
from sovtune.sizes import optimizer_state_bytes
from sovtune.speed import plan_speed

MiB = 2**20
GiB = 2**30

# TRL's fused LM head tile (trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE, trl/trainer/utils.py
# _CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16); tests/test_plan.py checks they still match the installed TRL.
TRL_TOKEN_CHUNK = 4096
TRL_VOCAB_CHUNK = 32768
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
FRAGMENTATION = 0.10
NF4_BLOCK = 64
NESTED_BLOCK = 256

Strategy = Literal["ddp", "fsdp", "deepspeed"]


class PlanError(SovtuneError):
    """The planner cannot read the architecture or was given an unknown GPU."""


@dataclass(frozen=True)
class Gpu:
    name: str
    label: str
    memory_bytes: int


# Memory as `nvidia-smi` reports it (MiB), which is what the CUDA allocator can hand out at most.
GPUS: dict[str, Gpu] = {
    gpu.name: gpu
    for gpu in (
        Gpu("h100-80gb", "NVIDIA H100 80GB", 81559 * MiB),
        Gpu("h200-141gb", "NVIDIA H200 141GB", 143771 * MiB),
        Gpu("a100-40gb", "NVIDIA A100 40GB", 40960 * MiB),
        Gpu("a100-80gb", "NVIDIA A100 80GB", 81920 * MiB),
        Gpu("l40s-48gb", "NVIDIA L40S 48GB", 46068 * MiB),
        Gpu("a10g-24gb", "NVIDIA A10G 24GB", 23028 * MiB),
        Gpu("l4-24gb", "NVIDIA L4 24GB", 23034 * MiB),
        Gpu("rtx4090-24gb", "NVIDIA RTX 4090 24GB", 24564 * MiB),
        Gpu("rtx3090-24gb", "NVIDIA RTX 3090 24GB", 24576 * MiB),
    )
}
DEFAULT_GPUS = ("rtx4090-24gb", "l4-24gb", "a100-40gb", "a100-80gb", "h100-80gb")


def parse_gpu(spec: str) -> Gpu:
    """A known GPU name (h100-80gb, ...) or a plain capacity such as 32gb / 48GiB."""
    key = spec.strip().lower()
    if key in GPUS:
        return GPUS[key]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gb|gib)", key)
    if match:
        return Gpu(key, f"{match.group(1)} GiB GPU", int(float(match.group(1)) * GiB))
    raise PlanError(f"--gpu {spec!r}: unknown GPU; use one of {', '.join(GPUS)} or a capacity such as 32gb")


# Config numbers of popular bases, for when even the config cannot be read (offline, gated repo). Each entry is
# handed to `AutoConfig.for_model`, so parameters are still counted exactly on the meta device.
def _llama(
    vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, tied: bool = False, **extra: Any
) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "tie_word_embeddings": tied,
        **extra,
    }


def _neox(vocab: int, hidden: int, layers: int, heads: int) -> dict[str, Any]:
    """GPT-NeoX / Pythia: a 4x MLP, untied output head."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "tie_word_embeddings": False,
    }


def _as(model_type: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "model_type": model_type}


KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "huggyllama/llama-7b": _llama(32000, 4096, 11008, 32, 32, 32, max_position_embeddings=2048),
    "meta-llama/Llama-2-7b-hf": _llama(32000, 4096, 11008, 32, 32, 32, max_position_embeddings=4096),
    "meta-llama/Llama-2-13b-hf": _llama(32000, 5120, 13824, 40, 40, 40, max_position_embeddings=4096),
    "meta-llama/Llama-2-70b-hf": _llama(32000, 8192, 28672, 80, 64, 8, max_position_embeddings=4096),
    "meta-llama/Meta-Llama-3-8B": _llama(128256, 4096, 14336, 32, 32, 8, max_position_embeddings=8192),
    "meta-llama/Llama-3.1-8B": _llama(128256, 4096, 14336, 32, 32, 8, max_position_embeddings=131072),
    "meta-llama/Llama-3.1-70B": _llama(128256, 8192, 28672, 80, 64, 8, max_position_embeddings=131072),
    "meta-llama/Llama-3.2-1B": _llama(128256, 2048, 8192, 16, 32, 8, tied=True, head_dim=64),
    "meta-llama/Llama-3.2-3B": _llama(128256, 3072, 8192, 28, 24, 8, tied=True, head_dim=128),
    "mistralai/Mistral-7B-v0.1": _as("mistral", _llama(32000, 4096, 14336, 32, 32, 8)),
    "mistralai/Mistral-7B-v0.3": _as("mistral", _llama(32768, 4096, 14336, 32, 32, 8)),
    "Qwen/Qwen2.5-0.5B": _as("qwen2", _llama(151936, 896, 4864, 24, 14, 2, tied=True)),
    "Qwen/Qwen2.5-1.5B": _as("qwen2", _llama(151936, 1536, 8960, 28, 12, 2, tied=True)),
    "Qwen/Qwen2.5-3B": _as("qwen2", _llama(151936, 2048, 11008, 36, 16, 2, tied=True)),
    "Qwen/Qwen2.5-7B": _as("qwen2", _llama(152064, 3584, 18944, 28, 28, 4)),
    "Qwen/Qwen2.5-14B": _as("qwen2", _llama(152064, 5120, 13824, 48, 40, 8)),
    "Qwen/Qwen2.5-32B": _as("qwen2", _llama(152064, 5120, 27648, 64, 40, 8)),
    "Qwen/Qwen2.5-72B": _as("qwen2", _llama(152064, 8192, 29568, 80, 64, 8)),
    "google/gemma-2-2b": _as("gemma2", _llama(256000, 2304, 9216, 26, 8, 4, tied=True, head_dim=256)),
    "google/gemma-2-9b": _as("gemma2", _llama(256000, 3584, 14336, 42, 16, 8, tied=True, head_dim=256)),
    "microsoft/Phi-3-mini-4k-instruct": _as("phi3", _llama(32064, 3072, 8192, 32, 32, 32)),
    "microsoft/Phi-3.5-mini-instruct": _as("phi3", _llama(32064, 3072, 8192, 32, 32, 32)),
    "microsoft/Phi-3-medium-4k-instruct": _as("phi3", _llama(32064, 5120, 17920, 40, 40, 10)),
    "Qwen/Qwen3-0.6B": _as("qwen3", _llama(151936, 1024, 3072, 28, 16, 8, tied=True, head_dim=128)),
    "Qwen/Qwen3-1.7B": _as("qwen3", _llama(151936, 2048, 6144, 28, 16, 8, tied=True, head_dim=128)),
    "Qwen/Qwen3-4B": _as("qwen3", _llama(151936, 2560, 9728, 36, 32, 8, tied=True, head_dim=128)),
    "Qwen/Qwen3-8B": _as("qwen3", _llama(151936, 4096, 12288, 36, 32, 8, head_dim=128)),
    "Qwen/Qwen3-14B": _as("qwen3", _llama(151936, 5120, 17408, 40, 40, 8, head_dim=128)),
    "google/gemma-3-1b-it": _as("gemma3_text", _llama(262144, 1152, 6912, 26, 4, 1, tied=True, head_dim=256)),
    # Gemma 4 31B's text model (its checkpoint adds a 0.4B vision tower the planner does not count).
    "google/gemma-4-31B-it": _as(
        "gemma4_text",
        _llama(
            262144,
            5376,
            21504,
            60,
            32,
            16,
            tied=True,
            head_dim=256,
            global_head_dim=512,
            num_global_key_value_heads=4,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,
            sliding_window=1024,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 10,
        ),
    ),
    "deepseek-ai/deepseek-llm-7b-base": _llama(102400, 4096, 11008, 30, 32, 32),
    "deepseek-ai/deepseek-llm-7b-chat": _llama(102400, 4096, 11008, 30, 32, 32),
    "deepseek-ai/deepseek-llm-67b-base": _llama(102400, 8192, 22016, 95, 64, 8),
    "bigcode/starcoder2-3b": _as("starcoder2", _llama(49152, 3072, 12288, 30, 24, 2, tied=True)),
    "bigcode/starcoder2-7b": _as("starcoder2", _llama(49152, 4608, 18432, 32, 36, 4, tied=True)),
    "EleutherAI/pythia-1b": {"model_type": "gpt_neox", **_neox(50304, 2048, 16, 8)},
    "EleutherAI/pythia-6.9b": {"model_type": "gpt_neox", **_neox(50432, 4096, 32, 32)},
    "EleutherAI/gpt-neox-20b": {"model_type": "gpt_neox", **_neox(50432, 6144, 44, 64)},
    "tiiuae/falcon-7b": {
        "model_type": "falcon",
        "vocab_size": 65024,
        "hidden_size": 4544,
        "num_hidden_layers": 32,
        "num_attention_heads": 71,
        "multi_query": True,
        "parallel_attn": True,
        "bias": False,
        "new_decoder_architecture": False,
    },
    "tiiuae/falcon-40b": {
        "model_type": "falcon",
        "vocab_size": 65024,
        "hidden_size": 8192,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_kv_heads": 8,
        "parallel_attn": True,
        "bias": False,
        "new_decoder_architecture": True,
    },
}
# Fine-tuned variants share the base's architecture.
_VARIANT_SUFFIXES = ("-instruct", "-chat-hf", "-chat", "-hf", "-it")


def known_architecture(name: str) -> tuple[str, dict[str, Any]] | None:
    """The built-in entry for a hub id, also for its -Instruct/-chat/-it variants (case-insensitive)."""
    table = {key.lower(): key for key in KNOWN_ARCHITECTURES}
    candidate = name.strip().lower()
    while True:
        if candidate in table:
            return table[candidate], KNOWN_ARCHITECTURES[table[candidate]]
        stripped = next((candidate[: -len(s)] for s in _VARIANT_SUFFIXES if candidate.endswith(s)), None)
        if stripped is None:
            return None
        candidate = stripped


# ---------------------------------------------------------------------------------------------------------------
# The architecture, counted on the meta device.


@dataclass(frozen=True)
class LinearLayer:
    name: str
    in_features: int
    out_features: int
    bias: bool
    layer: int | None  # decoder layer index, None outside the decoder stack

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass
class Architecture:
    name: str
    source: str  # "config" or "built-in table"
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    linears: list[LinearLayer]
    output_head: str | None
    tied_embeddings: bool
    embedding_params: int  # input embeddings (and any other nn.Embedding)
    total_params: int
    module_params: dict[str, int] = field(default_factory=dict)  # leaf module name -> parameters (modules_to_save)
    embeddings: list[LinearLayer] = field(
        default_factory=list
    )  # nn.Embedding as (num_embeddings -> dim): LoRA-able too
    layer_params: int = 0  # parameters of one decoder layer

    @property
    def head_params(self) -> int:
        head = next((lin for lin in self.linears if lin.name == self.output_head), None)
        return (
            0 if head is None or self.tied_embeddings else head.weight_params + (head.out_features if head.bias else 0)
        )

    def quantisable(self) -> list[LinearLayer]:
        """Linears bitsandbytes replaces: all but the output head (transformers keeps it in 16 bit)."""
        return [lin for lin in self.linears if lin.name != self.output_head]

    @property
    def gated_mlp(self) -> bool:
        leaves = {lin.leaf for lin in self.linears if lin.layer == 0}
        return bool(leaves & {"gate_proj", "gate_up_proj", "w1", "w3", "gate"})


def _linear_shape(module: Any) -> tuple[int, int, bool] | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    return None


def architecture_from_config(config: Any, name: str, source: str) -> Architecture:
    """Count every parameter of the architecture on the meta device: no memory, no weights."""
    try:
        model = models.meta_model(config, trust_remote_code=getattr(config, "_trust_remote_code", False))
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(
            f"model {name!r}: cannot build a causal LM from its config ({str(exc).splitlines()[0][:200]})"
        ) from None
    return architecture_from_model(model, config, name, source)


def architecture_from_model(model: Any, config: Any, name: str, source: str) -> Architecture:
    """The layer shapes and parameter counts of a model (normally on the meta device)."""
    import torch

    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    linears, embeddings, embedding_params, module_params = [], [], 0, {}
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        if module_name and leaf not in module_params:
            module_params[leaf] = sum(p.numel() for p in module.parameters())
        shape = _linear_shape(module)
        if shape is not None:
            found = re.search(r"\.(\d+)\.", module_name)
            linears.append(LinearLayer(module_name, *shape, layer=int(found.group(1)) if found else None))
        elif isinstance(module, torch.nn.Embedding):
            embedding_params += module.weight.numel()
            embeddings.append(LinearLayer(module_name, module.num_embeddings, module.embedding_dim, False, layer=None))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    layer_modules = [
        m for m in model.modules() if type(m).__name__ in set(getattr(model, "_no_split_modules", None) or ())
    ]
    return Architecture(
        name=name,
        source=source,
        model_type=getattr(text, "model_type", "unknown"),
        vocab_size=text.vocab_size,
        hidden_size=hidden,
        intermediate_size=_intermediate_size(text, linears, hidden),
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=_layer_value(text, "num_key_value_heads") or heads,
        head_dim=_layer_value(text, "head_dim") or hidden // heads,
        linears=linears,
        embeddings=embeddings,
        output_head=head_name,
        tied_embeddings=tied,
        embedding_params=embedding_params,
        total_params=sum(p.numel() for p in model.parameters()),
        module_params=module_params,
        layer_params=sum(p.numel() for p in layer_modules[0].parameters()) if layer_modules else 0,
    )


def _layer_value(config: Any, name: str) -> Any:
    """A config value that may differ between layers (Gemma 4's global-attention layers have their own head size and
    key-value heads, and transformers refuses a global read): the largest over the layers, for a conservative
    estimate."""
    try:
        return getattr(config, name, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        values = [getattr(layer, name, None) for layer in config.per_layer_config]
        return max((value for value in values if value is not None), default=None)


def _intermediate_size(config: Any, linears: list[LinearLayer], hidden: int) -> int:
    for attr in ("intermediate_size", "n_inner", "ffn_dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    widest = max((max(lin.in_features, lin.out_features) for lin in linears if lin.layer == 0), default=4 * hidden)
    return widest if widest != hidden else 4 * hidden


def load_architecture(recipe: Recipe, arch: str | None = None) -> Architecture:
    """The model's config (local folder, HF cache, then the hub), else the built-in table; `arch` forces the table."""
    from transformers import AutoConfig

    if arch is not None:
        return _from_table(arch)
    kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if not recipe.model_is_local and recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    location = recipe.model_location
    problem = ""
    for local_only in (True, False):
        try:
            config = AutoConfig.from_pretrained(location, local_files_only=local_only, **kwargs)
            return architecture_from_config(config, recipe.model.name_or_path, "config")
        except (OSError, ValueError) as exc:
            problem = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            if recipe.model_is_local:
                break
    if known_architecture(recipe.model.name_or_path) is not None:
        return _from_table(recipe.model.name_or_path)
    raise PlanError(
        f"model.name_or_path: cannot read the config of {recipe.model.name_or_path!r} ({problem}) and it is not in the "
        f"built-in table; download its config.json, or pass --arch with one of: {', '.join(KNOWN_ARCHITECTURES)}"
    )


def _from_table(name: str) -> Architecture:
    from transformers import AutoConfig

    found = known_architecture(name)
    if found is None:
        raise PlanError(f"--arch {name!r}: not in the built-in table; choose one of: {', '.join(KNOWN_ARCHITECTURES)}")
    key, spec = found
    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    return architecture_from_config(config, key, "built-in table")


# ---------------------------------------------------------------------------------------------------------------
# The settings the estimate depends on.

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Linears that read the same input, so a LoRA layer on any of them keeps that input alive once.
ATTENTION_INPUT = {
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "query_key_value",
    "c_attn",
    "Wqkv",
    "query",
    "key",
    "value",
}
ATTENTION_OUTPUT = {"o_proj", "out_proj", "dense", "c_proj"}
MLP_INPUT = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "w1", "w3", "dense_h_to_4h"}
MLP_OUTPUT = {"down_proj", "fc2", "w2", "dense_4h_to_h"}


@dataclass(frozen=True)
class Settings:
    batch_size: int
    seq_len: int
    gradient_accumulation: int
    quant_mode: str  # none | 4bit | 8bit
    double_quant: bool
    dtype_bytes: int  # compute dtype of the model
    r: int
    targets: str | tuple[str, ...]  # "all-linear" or leaf names
    lora_dropout: float
    dora: bool
    bias: str
    modules_to_save: tuple[str, ...]
    optimizer: str
    gradient_checkpointing: bool
    padding_free: bool  # the batch is one row of concatenated examples (data.packing true, or auto with batch > 1)
    attention: str  # sdpa | flash_attention_2 | eager
    gpus: int = 1
    strategy: Strategy = "ddp"
    device: Literal["cuda", "cpu"] = "cuda"

    @classmethod
    def from_recipe(cls, recipe: Recipe, gpus: int = 1, strategy: Strategy = "ddp", device: str = "cuda") -> Settings:
        # Planning is for GPUs: "auto" means bf16 there (every GPU in the table supports it); fp32 on the CPU.
        dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        if recipe.quantization.mode != "none" and recipe.quantization.compute_dtype != "auto":
            dtype = recipe.quantization.compute_dtype
        attention = recipe.model.attn_implementation
        targets = recipe.adapter.target_modules
        # What the trainer will really run per forward pass (speed.py may split a batch into one-example passes).
        speed = plan_speed(recipe, cuda=device == "cuda")
        return cls(
            batch_size=speed.micro_batch_size,
            seq_len=recipe.data.max_length,
            gradient_accumulation=speed.accumulation,
            quant_mode=recipe.quantization.mode,
            double_quant=recipe.quantization.double_quant,
            dtype_bytes=DTYPE_BYTES[dtype],
            r=recipe.adapter.r,
            targets=targets if isinstance(targets, str) else tuple(targets),
            lora_dropout=recipe.adapter.dropout,
            dora=recipe.adapter.type == "dora",
            bias=recipe.adapter.bias,
            modules_to_save=tuple(recipe.adapter.modules_to_save),
            optimizer=recipe.train.optimizer,
            gradient_checkpointing=recipe.train.gradient_checkpointing,
            padding_free=speed.padding_free,
            attention="sdpa" if attention == "auto" else attention,
            gpus=gpus,
            strategy=strategy,
            device="cuda" if device == "cuda" else "cpu",
        )

    @property
    def sharded(self) -> bool:
        return self.gpus > 1 and self.strategy in ("fsdp", "deepspeed")

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation * self.gpus


# ---------------------------------------------------------------------------------------------------------------
# The estimate.


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    note: str


@dataclass
class Estimate:
    architecture: Architecture
    settings: Settings
    components: list[Component]
    lora_parameters: int
    trainable_parameters: int
    logits_without_fused_head: int

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    def component(self, name: str) -> int:
        return next(c.bytes for c in self.components if c.name == name)


def _named(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of target modules: the full module name, or a dotted suffix of it."""
    return any(name == target or name.endswith("." + target) for target in targets)


def targeted_linears(arch: Architecture, settings: Settings) -> list[LinearLayer]:
    """The linears peft wraps: all but the output head for all-linear, else those the list names."""
    if settings.targets == "all-linear":
        return [lin for lin in arch.linears if lin.name != arch.output_head]
    return [lin for lin in arch.linears if _named(lin.name, settings.targets)]


def adapted_layers(arch: Architecture, settings: Settings) -> list[LinearLayer]:
    """Every layer that gets LoRA A and B: the targeted linears and any embedding the target list names."""
    named = [] if settings.targets == "all-linear" else [e for e in arch.embeddings if _named(e.name, settings.targets)]
    return targeted_linears(arch, settings) + named


def target_module_names(arch: Architecture, settings: Settings) -> list[str]:
    """The module names LoRA adapts, as a recipe's target_modules would list them (q_proj, qkv_proj, ...)."""
    return sorted({layer.leaf for layer in adapted_layers(arch, settings)})


def trainable_tensors(arch: Architecture, settings: Settings) -> list[tuple[int, int]]:
    """(elements, bytes per element) of each trainable tensor: LoRA A and B (+ DoRA magnitude), biases, saved
    modules."""
    tensors: list[tuple[int, int]] = []
    for lin in adapted_layers(arch, settings):
        tensors += [(settings.r * lin.in_features, 4), (settings.r * lin.out_features, 4)]
        if settings.dora:
            tensors.append((lin.out_features, 4))
    if settings.bias != "none":
        pool = arch.linears if settings.bias == "all" else targeted_linears(arch, settings)
        tensors += [(lin.out_features, _frozen_bytes(settings)) for lin in pool if lin.bias]
    for name in settings.modules_to_save:
        tensors.append((arch.module_params.get(name, 0), _frozen_bytes(settings)))
    return tensors


def _frozen_bytes(settings: Settings) -> int:
    """Bytes of a non-quantised parameter: peft's k-bit preparation upcasts them to fp32."""
    return 4 if settings.quant_mode != "none" else settings.dtype_bytes


def base_weight_bytes(arch: Architecture, settings: Settings) -> int:
    if settings.quant_mode == "none":
        return arch.total_params * settings.dtype_bytes
    quantised = arch.quantisable()
    quantised_params = sum(lin.weight_params for lin in quantised)
    rest = (arch.total_params - quantised_params) * _frozen_bytes(settings)
    if settings.quant_mode == "8bit":
        return rest + sum(lin.weight_params + 4 * lin.out_features for lin in quantised)
    return rest + sum(nf4_bytes(lin.weight_params, settings.double_quant) for lin in quantised)


def nf4_bytes(params: int, double_quant: bool) -> int:
    """Packed 4-bit weights plus bitsandbytes' quantisation state (absmax per 64 weights, the 16-value code)."""
    blocks = math.ceil(params / NF4_BLOCK)
    packed = math.ceil(params / 2) + 16 * 4
    if not double_quant:
        return packed + 4 * blocks
    # uint8 absmax per block, an fp32 absmax per 256 blocks, the 256-value code of the nested quantiser, its offset
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 4


def layer_activation_bytes(arch: Architecture, settings: Settings) -> int:
    """What autograd saves for one decoder layer (see the module docstring for the formula)."""
    tokens = settings.batch_size * settings.seq_len
    e, h, i = settings.dtype_bytes, arch.hidden_size, arch.intermediate_size
    heads, kv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    mask = _mask_elements(settings)
    targeted = [lin for lin in targeted_linears(arch, settings) if lin.layer == 0]
    leaves = {lin.leaf for lin in targeted}
    unknown = leaves - ATTENTION_INPUT - ATTENTION_OUTPUT - MLP_INPUT - MLP_OUTPUT
    norm_inputs = 2 * 4 * tokens * h
    normed = (
        e
        * tokens
        * h
        * ((bool(leaves & ATTENTION_INPUT) or bool(unknown)) + (bool(leaves & MLP_INPUT) or bool(unknown)))
    )
    # SDPA repeats k/v to all heads when it gets a mask; eager always does; flash-attention 2 never.
    repeated = kv < heads and (
        settings.attention == "eager" or (mask > 0 and settings.attention != "flash_attention_2")
    )
    kv_heads_kept = heads if repeated else kv
    attention = e * tokens * (heads * d + 2 * kv_heads_kept * d + heads * d) + 4 * tokens * heads
    if settings.attention == "eager":  # the fp32 softmax and its cast: one score per query-key pair that can attend
        pairs = tokens**2 if settings.padding_free else settings.batch_size * settings.seq_len**2
        attention += (4 + e) * heads * pairs
    mlp = e * tokens * i * (4 if arch.gated_mlp else 2)
    if not (leaves & MLP_OUTPUT or unknown):
        mlp -= e * tokens * i  # the product fed to down_proj is only kept for a LoRA layer on it
    lora = e * tokens * settings.r * len(targeted)
    dropout = sum((e + 1) * tokens * lin.in_features for lin in targeted) if settings.lora_dropout > 0 else 0
    return norm_inputs + normed + attention + e * mask + mlp + lora + dropout


def _mask_elements(settings: Settings) -> int:
    """Elements of the attention mask SDPA converts and keeps per layer (eager's mask is shared by all layers)."""
    if settings.attention in ("flash_attention_2", "eager") or settings.batch_size == 1:
        return 0
    if settings.padding_free:
        return (settings.batch_size * settings.seq_len) ** 2
    return settings.batch_size * settings.seq_len**2


def activation_bytes(arch: Architecture, settings: Settings) -> int:
    tokens = settings.batch_size * settings.seq_len
    e, h = settings.dtype_bytes, arch.hidden_size
    per_layer = layer_activation_bytes(arch, settings)
    # Outside the layers: the final norm's fp32 input, the copy of its output the fused head keeps, per-token stats.
    outside = 4 * tokens * h + e * tokens * h + 3 * 4 * tokens
    if settings.gradient_checkpointing:
        return arch.num_layers * e * tokens * h + per_layer + outside
    return arch.num_layers * per_layer + outside


def backward_working_bytes(arch: Architecture, settings: Settings) -> int:
    """Gradients of one layer's activations in flight, or the LM head's backward, whichever is larger."""
    tokens = settings.batch_size * settings.seq_len
    e, h, i = settings.dtype_bytes, arch.hidden_size, arch.intermediate_size
    layer = 2 * 4 * tokens * h + 3 * e * tokens * i
    return max(layer, lm_head_bytes(arch, settings))


def lm_head_bytes(arch: Architecture, settings: Settings) -> int:
    """TRL's chunked head: a tile buffer of min(T, 4096) x 32768 (whatever the vocabulary) in the compute dtype, fp32
    gradients of the hidden states, and on the CPU (no Triton) ~3 fp32 temporaries the width of the real vocabulary."""
    tokens = settings.batch_size * settings.seq_len
    rows = min(tokens, TRL_TOKEN_CHUNK)
    tile_bytes = rows * TRL_VOCAB_CHUNK * settings.dtype_bytes
    if settings.device == "cpu":
        tile_bytes += 3 * 4 * rows * min(arch.vocab_size, TRL_VOCAB_CHUNK)
    return tile_bytes + 4 * tokens * arch.hidden_size


def full_logits_bytes(arch: Architecture, settings: Settings) -> int:
    """What plain transformers would need: logits, their fp32 copy, log-softmax output and the gradient."""
    tokens = settings.batch_size * settings.seq_len
    e = settings.dtype_bytes
    return tokens * arch.vocab_size * (e + (4 if e != 4 else 0) + 4 + 4)


def estimate(arch: Architecture, settings: Settings) -> Estimate:
    """Peak memory per GPU of one training step, by component."""
    n = settings.gpus if settings.sharded else 1
    tensors = trainable_tensors(arch, settings)
    lora_params = sum(settings.r * (lin.in_features + lin.out_features) for lin in adapted_layers(arch, settings))
    trainable_bytes = sum(elements * size for elements, size in tensors)
    weights = base_weight_bytes(arch, settings)
    quant = {
        "none": f"{8 * settings.dtype_bytes}-bit",
        "4bit": "NF4" + (" + double quant" if settings.double_quant else ""),
        "8bit": "int8",
    }[settings.quant_mode]
    shard_note = f", sharded over {n} GPUs" if n > 1 else ""
    parts = [
        Component("base weights", weights // n, f"{arch.total_params:,} params, {quant}{shard_note}"),
        Component(
            "adapter weights",
            trainable_bytes // n,
            f"{sum(e for e, _ in tensors):,} trainable params (LoRA r={settings.r} on "
            f"{', '.join(target_module_names(arch, settings))}, fp32)",
        ),
        Component(
            "gradients",
            trainable_bytes // n * (2 if settings.gpus > 1 and not settings.sharded else 1),
            "trainable params only" + (" + DDP gradient buckets" if settings.gpus > 1 and not settings.sharded else ""),
        ),
        Component("optimizer state", optimizer_state_bytes(tensors, settings.optimizer) // n, settings.optimizer),
        Component(
            "activations",
            activation_bytes(arch, settings),
            f"batch {settings.batch_size} x {settings.seq_len} tokens, "
            + ("gradient checkpointing" if settings.gradient_checkpointing else "no checkpointing"),
        ),
        Component(
            "backward + LM head", backward_working_bytes(arch, settings), "activation gradients / fused LM head tiles"
        ),
    ]
    if settings.quant_mode != "none":
        widest = max((lin.weight_params for lin in arch.quantisable()), default=0)
        parts.append(
            Component("dequantisation", 2 * widest * settings.dtype_bytes, "largest quantised weight, dequantised")
        )
    if n > 1:
        layer_bytes = weights * arch.layer_params // max(arch.total_params, 1)
        parts.append(
            Component("all-gather buffers", 2 * layer_bytes, "two unsharded decoder layers (current + prefetch)")
        )
    if settings.device == "cuda":
        tensors_total = sum(c.bytes for c in parts)
        parts.append(
            Component(
                "framework overhead",
                CUDA_CONTEXT_BYTES + int(FRAGMENTATION * tensors_total),
                "CUDA context, kernels, allocator fragmentation",
            )
        )
    return Estimate(arch, settings, parts, lora_params, sum(e for e, _ in tensors), full_logits_bytes(arch, settings))


# ---------------------------------------------------------------------------------------------------------------
# Fitting: which recipe change makes it fit.


@dataclass(frozen=True)
class Change:
    kind: str  # changes of one kind replace each other (batch 2 after batch 4 means batch 2)
    description: str
    updates: tuple[tuple[str, Any], ...]  # Settings fields
    overrides: tuple[str, ...] = ()  # the recipe change, as --set values
    launch: str | None = None  # or a `sovtune launch` flag


def _ladder(settings: Settings) -> list[Change]:
    """Changes in order of least harm to what is learned; each is meant on top of the ones before it."""
    steps: list[Change] = []
    s = settings
    if not s.gradient_checkpointing:
        steps.append(
            Change(
                "checkpointing",
                "recompute activations in the backward pass",
                (("gradient_checkpointing", True),),
                ("train.gradient_checkpointing=true",),
            )
        )
    if s.quant_mode != "4bit":
        steps.append(
            Change(
                "quantization",
                "QLoRA: 4-bit NF4 base weights",
                (("quant_mode", "4bit"), ("double_quant", True)),
                ("quantization.mode=4bit",),
            )
        )
    if s.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        steps.append(
            Change(
                "optimizer",
                "8-bit paged AdamW",
                (("optimizer", "paged_adamw_8bit"),),
                ("train.optimizer=paged_adamw_8bit",),
            )
        )
    if s.gpus > 1 and not s.sharded:
        steps.append(
            Change(
                "sharding",
                "shard weights and optimizer state over the GPUs (FSDP)",
                (("strategy", "fsdp"),),
                launch="--strategy fsdp",
            )
        )
    if s.attention == "sdpa" and s.device == "cuda":
        steps.append(
            Change(
                "attention",
                "flash-attention 2: no per-layer attention mask (needs the flash-attn package)",
                (("attention", "flash_attention_2"),),
                ("model.attn_implementation=flash_attention_2",),
            )
        )
    batch, accumulation = s.batch_size, s.gradient_accumulation
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        steps.append(
            Change(
                "batch",
                f"micro-batch {batch} x {accumulation} accumulation (same effective batch)",
                (("batch_size", batch), ("gradient_accumulation", accumulation)),
                (f"train.batch_size={batch}", f"train.gradient_accumulation={accumulation}"),
            )
        )
    length = s.seq_len
    while length > 256:
        length = max(256, length // 2)
        steps.append(
            Change(
                "length",
                f"max_length {length}: longer examples get truncated (see sovtune check)",
                (("seq_len", length),),
                (f"data.max_length={length}",),
            )
        )
    return steps


def apply_changes(settings: Settings, changes: list[Change]) -> Settings:
    merged: dict[str, Any] = {}
    for change in changes:
        merged.update(dict(change.updates))
    return replace(settings, **merged)


def _latest_per_kind(changes: list[Change]) -> list[Change]:
    latest = {change.kind: change for change in changes}
    return [change for change in changes if latest[change.kind] is change]


@dataclass
class Fit:
    gpu: Gpu
    fits: bool
    headroom_bytes: int
    changes: list[Change]
    total_after_changes: int | None
    min_gpus_fsdp: int | None  # GPUs needed with FSDP when no recipe change is enough


def fit(est: Estimate, gpu: Gpu) -> Fit:
    """Fits as is; else the shortest prefix of the ladder that fits, without the steps it turns out not to need."""
    headroom = gpu.memory_bytes - est.total_bytes
    if headroom >= 0:
        return Fit(gpu, True, headroom, [], None, None)

    def total(changes: list[Change]) -> int:
        return estimate(est.architecture, apply_changes(est.settings, changes)).total_bytes

    ladder = _ladder(est.settings)
    for end in range(1, len(ladder) + 1):
        chosen = _latest_per_kind(ladder[:end])
        if total(chosen) <= gpu.memory_bytes:
            for change in list(chosen[:-1]):
                trial = [c for c in chosen if c is not change]
                if total(trial) <= gpu.memory_bytes:
                    chosen = trial
            return Fit(gpu, False, headroom, chosen, total(chosen), None)
    return _sharded_fit(est, gpu, ladder)


def _sharded_fit(est: Estimate, gpu: Gpu, ladder: list[Change]) -> Fit:
    """No recipe change is enough on one GPU: the fewest GPUs that fit with FSDP and every change but shorter data."""
    changes = _latest_per_kind([c for c in ladder if c.kind not in ("length", "sharding")])
    if est.settings.quant_mode == "4bit" or any(c.kind == "quantization" for c in changes):
        # FSDP shards only float tensors: the packed 4-bit weights must be stored as bf16 (sovtune launch checks it).
        changes.append(
            Change(
                "storage",
                "4-bit weights stored as bf16 so FSDP can shard them",
                (),
                ("quantization.storage_dtype=bfloat16", "model.dtype=bfloat16"),
            )
        )
    settings = apply_changes(est.settings, changes)
    for gpus in (2, 4, 8, 16, 32, 64):
        total = estimate(est.architecture, replace(settings, gpus=gpus, strategy="fsdp")).total_bytes
        if total <= gpu.memory_bytes:
            return Fit(gpu, False, gpu.memory_bytes - est.total_bytes, changes, total, gpus)
    return Fit(gpu, False, gpu.memory_bytes - est.total_bytes, [], None, None)


# ---------------------------------------------------------------------------------------------------------------
# Entry point and output.


@dataclass
class Plan:
    estimate: Estimate
    fits: list[Fit]

    def to_json(self) -> dict[str, Any]:
        est, arch, s = self.estimate, self.estimate.architecture, self.estimate.settings
        return {
            "model": arch.name,
            "architecture_source": arch.source,
            "parameters": {
                "total": arch.total_params,
                "lora": est.lora_parameters,
                "trainable": est.trainable_parameters,
                "target_modules": target_module_names(arch, s),
                "layers": arch.num_layers,
                "hidden_size": arch.hidden_size,
                "vocab_size": arch.vocab_size,
            },
            "settings": {
                "batch_size": s.batch_size,
                "max_length": s.seq_len,
                "gradient_accumulation": s.gradient_accumulation,
                "gpus": s.gpus,
                "strategy": s.strategy,
                "effective_batch": s.effective_batch,
                "quantization": s.quant_mode,
                "gradient_checkpointing": s.gradient_checkpointing,
                "optimizer": s.optimizer,
                "attention": s.attention,
                "dtype_bytes": s.dtype_bytes,
            },
            "components": [{"name": c.name, "bytes": c.bytes, "note": c.note} for c in est.components],
            "total_bytes": est.total_bytes,
            "logits_without_fused_head_bytes": est.logits_without_fused_head,
            "gpus": [
                {
                    "gpu": f.gpu.name,
                    "capacity_bytes": f.gpu.memory_bytes,
                    "fits": f.fits,
                    "headroom_bytes": f.headroom_bytes,
                    "suggestions": [
                        {"change": c.description, "set": list(c.overrides), "launch": c.launch} for c in f.changes
                    ],
                    "total_after_suggestions_bytes": f.total_after_changes,
                    "min_gpus_with_fsdp": f.min_gpus_fsdp,
                }
                for f in self.fits
            ],
        }


def plan(
    recipe: Recipe,
    gpus: tuple[str, ...] | list[str] = (),
    num_gpus: int = 1,
    strategy: Strategy = "ddp",
    arch: str | None = None,
) -> Plan:
    """Estimate the recipe's per-GPU memory and check it against each GPU."""
    if num_gpus < 1:
        raise PlanError(f"--gpus {num_gpus}: needs at least 1 GPU")
    chosen = [parse_gpu(g) for g in (gpus or DEFAULT_GPUS)]
    architecture = load_architecture(recipe, arch)
    est = estimate(architecture, Settings.from_recipe(recipe, num_gpus, strategy))
    return Plan(est, [fit(est, gpu) for gpu in chosen])


def gib_text(value: int) -> str:
    return f"{value / GiB:.2f} GiB"


def strategy_name(value: str) -> Strategy:
    """`sovtune launch` strategies as the planner sees them (ZeRO-2 shards like DDP keeps weights: treated as ddp)."""
    choices = {"ddp": "ddp", "fsdp": "fsdp", "deepspeed": "deepspeed", "deepspeed-zero2": "ddp"}
    if value not in choices:
        raise PlanError(f"--strategy {value!r}: choose one of {', '.join(choices)}")
    return choices[value]  # type: ignore[return-value]
