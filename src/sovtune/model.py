"""Tokenizer, base model and adapter: the only place with a `BitsAndBytesConfig` and a peft config."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import stat
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sovtune.config import Recipe
from sovtune.core.rundir import RunDir
from sovtune.core.runtime import device, local_rank, sharded_training
from sovtune.core.tensorfiles import check_safetensors_in
from sovtune.data import stop_token_ids, template_budget  # stop_token_ids re-exported: generation stops there
from sovtune.errors import SovtuneError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_TEMPLATE_BYTES = 1 << 20  # chat templates are a few KB; the largest published ones are under 100 KB
# Names tried, in order, for a pad token distinct from EOS before adding a new one (which means resizing).
PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<unk>")


class ModelError(SovtuneError):
    """The base model, tokenizer or adapter cannot be loaded or does not fit the recipe."""


def loading_errors() -> tuple[type[Exception], ...]:
    """What transformers, tokenizers and peft raise for a model, tokenizer or adapter folder whose files they cannot
    read: besides OSError/ValueError, a config value of the wrong type (a list where a name belongs) surfaces as a
    strict-dataclass validation error, TypeError, AttributeError, KeyError or IndexError deep inside them. Caught only
    around their loading calls, where the folder is the input."""
    from huggingface_hub.errors import StrictDataclassError

    return (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, StrictDataclassError)


def resolve_dtype(name: str) -> torch.dtype:
    """auto: bf16 on GPUs that support it, else fp16 on GPUs; fp32 on the CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_device_support(recipe: Recipe) -> None:
    """Combinations that depend on the machine, checked before anything heavy happens."""
    import torch

    cuda = torch.cuda.is_available()
    for field, name in (
        ("model.dtype", recipe.model.dtype),
        ("quantization.compute_dtype", recipe.quantization.compute_dtype),
    ):
        if name == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
            raise ModelError(f"{field}: bfloat16 is not supported by this GPU; use float16 or auto")
        if name == "float16" and not cuda and recipe.quantization.mode == "none":
            raise ModelError(f"{field}: float16 training on the CPU is not supported; use float32 or auto")
    if recipe.model.attn_implementation == "flash_attention_2" and not (cuda and _flash_attn_installed()):
        raise ModelError("model.attn_implementation: flash_attention_2 needs CUDA and the flash-attn package; use auto")
    if recipe.train.optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit") and not cuda:
        raise ModelError(f"train.optimizer: {recipe.train.optimizer} needs CUDA; use adamw_torch on the CPU")


def _flash_attn_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def attn_implementation(recipe: Recipe) -> str:
    import torch

    choice = recipe.model.attn_implementation
    if choice != "auto":
        return choice
    return "flash_attention_2" if torch.cuda.is_available() and _flash_attn_installed() else "sdpa"


_WARNED_REMOTE_CODE: set[str] = set()


def _hub_kwargs(recipe: Recipe) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if not recipe.model_is_local and recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    if recipe.model.trust_remote_code and recipe.model.name_or_path not in _WARNED_REMOTE_CODE:
        _WARNED_REMOTE_CODE.add(recipe.model.name_or_path)  # once per model, not once per loaded file
        log.warning("trust_remote_code is on: code shipped with %s will run", recipe.model.name_or_path)
    return kwargs


def _loading_error(what: str, recipe: Recipe, exc: Exception) -> ModelError:
    first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
    where = recipe.model_location
    hint = "check model.name_or_path and model.revision"
    if "trust_remote_code" in str(exc):
        hint = "the model ships its own code: set model.trust_remote_code: true only if you have reviewed it"
    if "offline" in first.lower() or "couldn't connect" in first.lower() or "LocalEntryNotFound" in type(exc).__name__:
        hint = "the model is not in the local cache and the hub is unreachable or offline; use a local path"
    return ModelError(f"model.name_or_path: cannot load the {what} of {where!r} ({first}); {hint}")


def context_length(recipe: Recipe) -> int | None:
    """The base model's context (max_position_embeddings) from its config alone; None when the config does not say."""
    from transformers import AutoConfig

    check_model_files(recipe.model_location)
    try:
        config = AutoConfig.from_pretrained(recipe.model_location, **_hub_kwargs(recipe))
    except loading_errors() as exc:
        raise _loading_error("config", recipe, exc) from None
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) else None


# The JSON files of a model or adapter folder that transformers, peft and tokenizers read: each must be a JSON object
# (a list, a 5,000-digit number or nesting past the recursion limit crashes them inside).
MODEL_JSON_FILES = (
    "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "model.safetensors.index.json", "adapter_config.json", "preprocessor_config.json",
    "tokenizer.json",
)  # fmt: skip
# Architecture sizes beyond any causal LM (the largest have ~130 layers, hidden 25,600, vocabularies of ~260k): a
# config past them is damaged or hostile, and would make `check` build millions of modules or training allocate
# petabytes.
CONFIG_SIZE_LIMITS = {
    "num_hidden_layers": 1024, "n_layer": 1024, "num_layers": 1024, "hidden_size": 131_072, "n_embd": 131_072,
    "d_model": 131_072, "intermediate_size": 1_048_576, "n_inner": 1_048_576, "vocab_size": 4_194_304,
    "num_attention_heads": 4096, "n_head": 4096, "num_key_value_heads": 4096, "head_dim": 65_536,
    "num_local_experts": 4096, "num_experts": 4096, "moe_intermediate_size": 1_048_576,
}  # fmt: skip


def check_model_files(folder: str | Path) -> None:
    """The JSON files of a local model or adapter folder are objects, and the config's sizes are plausible; checked
    before transformers reads them, so a damaged folder is one line naming the file."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for name in MODEL_JSON_FILES:
        path = folder / name
        try:
            status = path.stat()
        except OSError:
            continue
        if stat.S_ISREG(status.st_mode):
            identity = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
            _check_json_file(str(path), name == "config.json", identity)


@functools.lru_cache(maxsize=256)
def _check_json_file(path: str, is_config: bool, identity: tuple[int, ...]) -> None:
    """One file's check, remembered while the file is unchanged (`identity`: device, inode, size, modification and
    change times): loading a model reads its folder several times in one command, and parsing a 262k-token
    tokenizer.json takes a second or more. A failed check is not remembered, so it fails each time."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON, 4,300+ digits
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0][:160]
        raise ModelError(f"{path}: not a readable JSON file ({reason}); the folder is damaged, replace it") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: a JSON {type(value).__name__}, not an object; the folder is damaged, replace it")
    if is_config:
        _check_config_sizes(value, Path(path))


def _check_config_sizes(config: dict[str, Any], path: Path) -> None:
    for section in [config, *(v for v in config.values() if isinstance(v, dict))]:  # text_config, ...
        for key, limit in CONFIG_SIZE_LIMITS.items():
            value = section.get(key)
            if isinstance(value, bool) or value is None:
                continue
            if not isinstance(value, int) or not 0 <= value <= limit:
                raise ModelError(
                    f"{path}: {key} = {str(value)[:40]} is not a plausible size (0 to {limit:,}); the config is "
                    "damaged or not a language model's, replace it"
                )


def load_tokenizer(recipe: Recipe) -> Any:
    """The tokenizer with the recipe's chat template and a pad token that is not EOS."""
    from transformers import AutoTokenizer

    if recipe.model_is_local:
        check_model_files(recipe.model_location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(recipe.model_location, **_hub_kwargs(recipe))
    except loading_errors() as exc:
        raise _loading_error("tokenizer", recipe, exc) from None
    if recipe.data.chat_template:
        tokenizer.chat_template = read_chat_template(recipe)
    with template_budget(recipe.data):  # finding the turn terminator renders the template
        ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def builtin_templates() -> list[str]:
    """Names of the chat templates shipped with sovtune (src/sovtune/templates/*.jinja)."""
    folder = resources.files("sovtune").joinpath("templates")
    return sorted(entry.name.removesuffix(".jinja") for entry in folder.iterdir() if entry.name.endswith(".jinja"))


def read_chat_template(recipe: Recipe) -> str:
    """data.chat_template as Jinja: inline, a built-in name (llama3, mistral, ...) or a file beside the recipe."""
    value = recipe.data.chat_template or ""
    if "{" in value:
        return value
    if value in builtin_templates():
        return resources.files("sovtune").joinpath("templates", f"{value}.jinja").read_text(encoding="utf-8")
    path = recipe.resolve(value)
    if not os.path.isfile(path):
        raise ModelError(
            f"data.chat_template: {value!r} is neither a built-in template ({', '.join(builtin_templates())}), "
            f"a Jinja template nor an existing file ({path})"
        )
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ModelError(
                f"data.chat_template: {path} is {path.stat().st_size:,} bytes, not a chat template (a few KB); "
                "point data.chat_template at the template file"
            )
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(
            f"data.chat_template: {path} is not UTF-8 text (byte {exc.start}); save the template as UTF-8"
        ) from None
    except OSError as exc:
        raise ModelError(f"data.chat_template: cannot read {path} ({exc.strerror or exc}); check the path") from None


def ensure_pad_token(tokenizer: Any) -> bool:
    """Give the tokenizer a pad token that neither ends a turn nor is EOS; True if a new token was added (embeddings
    must grow).

    pad == eos (Qwen, Phi-3, DeepSeek ship it so) or pad == the turn terminator is a classic way to train a model that
    never stops: anything that masks padding by id masks the stop labels too. An existing token is preferred (the
    vocabulary stays the base's, so the adapter loads on the unmodified base with plain peft): one named like a pad,
    then the unknown token, then any other special token the chat template does not use. Only a vocabulary with none
    of these gets a new <|pad|>.
    """
    stops = set(stop_token_ids(tokenizer))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stops:
        return False
    added = dict(sorted(tokenizer.get_added_vocab().items(), key=lambda item: item[1]))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {index for index, token in decoder.items() if token.special}
    named_pad = [token for token in added if "pad" in token.lower()]
    unknown = [tokenizer.unk_token] if tokenizer.unk_token else []
    template = _template_text(tokenizer)
    spare = [token for token, index in added.items() if index in special and token not in template]
    vocab = tokenizer.get_vocab()
    for candidate in (*PAD_CANDIDATES, *named_pad, *unknown, *spare):
        index = vocab.get(candidate)
        # Only special or added tokens: a plain vocabulary entry spelt "<unk>" is text that can occur.
        if index is None or index in stops or index == tokenizer.bos_token_id:
            continue
        if index in special or candidate in added:
            tokenizer.pad_token = candidate
            return False
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def _template_text(tokenizer: Any) -> str:
    return tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """dtype of the quantised matmuls: the recipe's, or the model dtype when auto."""
    name = recipe.quantization.compute_dtype
    return resolve_dtype(recipe.model.dtype if name == "auto" else name)


def quantization_config(recipe: Recipe, compute_dtype: torch.dtype) -> Any:
    """The only BitsAndBytesConfig in sovtune."""
    import torch

    quant = recipe.quantization
    if quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, quant.storage_dtype),
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"


def check_weight_files(recipe: Recipe) -> None:
    """Safetensors only, unless the recipe opts in (`model.allow_pickle_weights`): a pickle can run any code.

    `use_safetensors=True` alone does not hold: transformers loads whatever file config.json names in
    `transformers_weights`, and every shard a safetensors index names, .bin shards included (through torch.load).
    So the files transformers will pick are checked first, in its order: `transformers_weights`, model.safetensors,
    then the index, each shard of which must be a .safetensors file inside the model folder. Local folders and hub
    repositories (whose config and index transformers fetches anyway) alike.
    """
    if recipe.model.allow_pickle_weights:
        return
    local = recipe.model_is_local
    folder = Path(recipe.model_location)
    if local and not folder.is_dir():
        return
    config = _model_json(recipe, "config.json")
    explicit = config.get("transformers_weights")
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit.endswith((".safetensors", ".safetensors.index.json")):
            raise _pickle_refused(recipe, f"has a config.json naming {str(explicit)[:80]!r} as its weights file")
        if not explicit.endswith(".index.json"):
            return
        index_name = explicit
    elif local and (folder / SAFE_WEIGHTS).is_file():
        return
    else:
        index_name = SAFE_WEIGHTS_INDEX
    index = _model_json(recipe, index_name)
    if index:
        _check_shards(recipe, index_name, index)
    elif local:
        names = [path.name for path in folder.iterdir() if path.is_file()]
        pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES) and "training_args" not in name)
        if pickles and not any(name.endswith(".safetensors") for name in names):
            raise _pickle_refused(recipe, f"has only pickle weights ({', '.join(pickles[:3])})")


def _check_shards(recipe: Recipe, index_name: str, index: dict[str, Any]) -> None:
    weight_map = index.get("weight_map")
    where = f"{recipe.model_location}/{index_name}"
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ModelError(f"model.name_or_path: {where} has no weight_map of file names; it is not a valid index")
    for shard in sorted(set(weight_map.values())):
        parts = PurePosixPath(shard).parts
        if not shard.endswith(".safetensors") or shard.startswith("/") or ".." in parts or "\\" in shard:
            raise _pickle_refused(
                recipe, f"has a {index_name} naming the shard {shard[:80]!r}, not a .safetensors file in the folder"
            )


def _pickle_refused(recipe: Recipe, what: str) -> ModelError:
    return ModelError(
        f"model.name_or_path: {recipe.model_location} {what}; pickle weights can run arbitrary code when loaded: "
        "convert them to safetensors, or set model.allow_pickle_weights: true if you trust where they came from"
    )


def _model_json(recipe: Recipe, name: str) -> dict[str, Any]:
    """A JSON file of the base model (local folder, or fetched as from_pretrained would); {} when there is none."""
    from transformers.utils.hub import cached_file

    revision = None if recipe.model_is_local else recipe.model.revision
    try:
        path = cached_file(
            recipe.model_location,
            name,
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            _raise_exceptions_for_gated_repo=False,
        )
    except OSError:  # unreachable or unknown: from_pretrained says so in its own words
        return {}
    if path is None:
        return {}
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(
            f"model.name_or_path: {recipe.model_location}/{name} is not valid JSON ({str(exc)[:120]}); "
            "the model files are damaged, fetch them again"
        ) from None
    if not isinstance(value, dict):
        raise ModelError(f"model.name_or_path: {recipe.model_location}/{name} is not a JSON object; fetch it again")
    return value


def check_local_weights(recipe: Recipe) -> None:
    """The safetensors headers of a local base model, checked before anything loads the weights."""
    if recipe.model_is_local:
        check_safetensors_in(recipe.model_location)


def load_base_model(recipe: Recipe, tokenizer: Any | None = None, quantize: bool = True) -> Any:
    """The base causal LM: pinned revision, safetensors only unless allowed, the recipe's dtype and kernel."""
    import torch
    from transformers import AutoModelForCausalLM

    check_weight_files(recipe)  # train, eval, merge and chat all refuse pickle-only weights
    check_local_weights(recipe)  # a damaged safetensors file is one line, not a crash inside the loader

    dtype = resolve_dtype(recipe.model.dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attn_implementation(recipe),
        "use_safetensors": None if recipe.model.allow_pickle_weights else True,
        **_hub_kwargs(recipe),
    }
    if quantize and recipe.quantization.mode != "none":
        kwargs["quantization_config"] = quantization_config(recipe, compute_dtype(recipe))
        if torch.cuda.is_available() and not sharded_training():  # FSDP places (and shards) the weights itself
            kwargs["device_map"] = {"": local_rank()}
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(recipe.model_location, **kwargs)
    except (*loading_errors(), SafetensorError) as exc:  # SafetensorError: a damaged file in the hub cache
        raise _loading_error("weights", recipe, exc) from None
    if tokenizer is not None:
        match_tokenizer(model, tokenizer)
    keep_unpackable_4bit_layers_unpacked(model)
    return model


# bitsandbytes (0.49+) repacks a 4-bit layer's weights for its AVX512-BF16 CPU kernel the first time the layer runs
# in eval mode (functional.py, _convert_weight_packed_for_cpu), which needs the output features to divide by 32 and
# the input features by the quantisation block size (64). On such CPUs a model with, say, a 688-wide MLP trains and
# then crashes in evaluation; those layers keep the unpacked 4-bit path, the one training uses.
BNB_CPU_PACK_BLOCK = 32
BNB_DEFAULT_BLOCKSIZE = 64


def keep_unpackable_4bit_layers_unpacked(model: Any) -> int:
    """Turn bitsandbytes' CPU repacking off for 4-bit layers it cannot repack; returns how many were turned off."""
    changed = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", None) or BNB_DEFAULT_BLOCKSIZE
        if module.out_features % BNB_CPU_PACK_BLOCK or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def meta_model(config: Any, trust_remote_code: bool = False) -> Any:
    """The causal LM of a config on the meta device: every module and shape, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config on the meta device leaves tied embeddings as two tensors
    return model


def match_tokenizer(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings when the tokenizer gained tokens, and align the special-token ids."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def lora_config(recipe: Recipe) -> Any:
    """The only peft config in sovtune."""
    from peft import LoraConfig

    adapter = recipe.adapter
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        modules_to_save=adapter.modules_to_save or None,
        bias=adapter.bias,
        use_dora=adapter.type == "dora",
        use_rslora=adapter.type == "rslora",
    )


def attach_adapter(model: Any, recipe: Recipe) -> Any:
    """Wrap the base in a fresh peft adapter (k-bit preparation first for QLoRA)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    # Under FSDP the fp32 upcast of k-bit preparation would mix dtypes with the float-stored 4-bit weights.
    if recipe.quantization.mode != "none" and not sharded_training():
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    check_target_modules(model, recipe)
    # Sharded strategies need the adapter in the model's dtype (ZeRO-3 flattens parameters of one dtype).
    return get_peft_model(model, lora_config(recipe), autocast_adapter_dtype=not sharded_training())


def linear_module_names(model: Any) -> set[str]:
    """Leaf names of linear layers (incl. bitsandbytes ones), the vocabulary `target_modules` uses."""
    import torch

    names = set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, torch.nn.Linear) or cls in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return names


def check_target_modules(model: Any, recipe: Recipe) -> None:
    targets = recipe.adapter.target_modules
    available = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    if targets != "all-linear":
        missing = sorted(set(targets) - available)
        if missing:
            linear = sorted(linear_module_names(model) - {"lm_head"})
            raise ModelError(
                f"adapter.target_modules: {missing} not found in {type(model).__name__}; "
                f"linear layers here: {linear} (or use all-linear)"
            )
    missing_saved = sorted(set(recipe.adapter.modules_to_save) - available)
    if missing_saved:
        raise ModelError(f"adapter.modules_to_save: {missing_saved} not found in {type(model).__name__}")


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
MAX_ADAPTER_RANK = 4096  # adapter.r's bound in the recipe schema; peft allocates r-wide matrices before loading


def check_adapter_files(adapter_dir: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """The adapter folder is input (a run folder, bundle or pulled repository may come from anywhere): a LoRA
    config as sovtune writes it, and weights in safetensors (peft falls back to unpickling adapter_model.bin when
    there is none). `allow_pickle`: the command line's --allow-pickle-weights. Returns the config."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / RunDir.ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelError(f"{adapter_dir}: no adapter_config.json; train first (sovtune train) or give --adapter")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{config_path}: not a valid adapter config ({str(exc)[:120]}); restore it") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ModelError(
            f"{config_path}: peft_type {str(found)[:40]!r}; sovtune loads LoRA adapters (lora, dora, rslora) only"
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= MAX_ADAPTER_RANK:
        raise ModelError(
            f"{config_path}: r {str(rank)[:40]!r} is not a LoRA rank sovtune trains (1..{MAX_ADAPTER_RANK}); "
            "the adapter was not saved by a training run"
        )
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        if not (adapter_dir / ADAPTER_PICKLE).is_file():
            raise ModelError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; the adapter was not saved completely")
        if not allow_pickle:
            raise ModelError(
                f"{adapter_dir / ADAPTER_PICKLE}: pickle weights and no {ADAPTER_WEIGHTS}; a pickle can run arbitrary "
                "code when loaded: convert it to safetensors, or pass --allow-pickle-weights if you trust where it "
                "came from"
            )
    return config


def load_adapter(model: Any, adapter_dir: str | Path, trainable: bool = False, allow_pickle: bool = False) -> Any:
    """A saved adapter on top of a base model, with plain peft, once its files passed `check_adapter_files`."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    check_adapter_files(adapter_dir, allow_pickle)
    check_model_files(adapter_dir)
    check_safetensors_in(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        log.warning("loading the pickle weights %s (--allow-pickle-weights)", adapter_dir / ADAPTER_PICKLE)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except pickle.UnpicklingError:  # --allow-pickle-weights: torch's weights-only unpickler still refuses code
        raise ModelError(
            f"{adapter_dir}: the pickle weights hold more than tensors (torch's weights-only unpickler refused them); "
            "they were not written by a training run: do not use this adapter"
        ) from None
    except Exception as exc:  # peft and safetensors raise many types on a malformed adapter (from anywhere)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise ModelError(
            f"{adapter_dir}: the adapter cannot be loaded onto {model.config.name_or_path or 'the base model'} "
            f"({first}); it is damaged or was trained on another base"
        ) from None


def count_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_adapter_tokenizer(recipe: Recipe, adapter_dir: Path) -> Any:
    """The tokenizer the adapter was trained with (saved next to it), else the recipe's.

    Using the saved one avoids a chat template or added pad token that differs between training and evaluation.
    trust_remote_code is passed explicitly: left unset, transformers asks on stdin whether to run a tokenizer's
    `auto_map` code, and a piped "y" (sovtune chat reads stdin) would answer it.
    """
    adapter_dir = Path(adapter_dir)
    check_model_files(adapter_dir)
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(recipe)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=recipe.model.trust_remote_code)
    except Exception as exc:  # transformers raises many types on malformed files (a list for an object: AttributeError)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        hint = ""
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            hint = (
                "; it asks to run code shipped with it (auto_map), which needs model.trust_remote_code: true in the "
                "recipe and --trust-remote-code on the command line"
            )
        raise ModelError(
            f"{adapter_dir}: the tokenizer saved with the adapter cannot be loaded ({first}){hint}"
        ) from None
    if getattr(tokenizer, "chat_template", None) is None and recipe.data.chat_template:
        tokenizer.chat_template = read_chat_template(recipe)
    with template_budget(recipe.data):  # finding the turn terminator renders the template
        ensure_pad_token(tokenizer)
    return tokenizer


def load_adapted_model(recipe: Recipe, tokenizer: Any, adapter_dir: Path, allow_pickle_adapter: bool = False) -> Any:
    """Base + saved adapter in eval mode, on this process's device: what evaluation, generate and chat run."""
    check_adapter_files(adapter_dir, allow_pickle_adapter)  # before the base is loaded: refusals come in seconds
    base = load_base_model(recipe, tokenizer)
    # Quantised weights are placed by their device map when loaded (and bitsandbytes models refuse `.to`).
    if getattr(base, "hf_device_map", None) is None and not getattr(base, "is_quantized", False):
        base.to(device())
    peft_model = load_adapter(base, adapter_dir, allow_pickle=allow_pickle_adapter)
    peft_model.eval()
    return peft_model
