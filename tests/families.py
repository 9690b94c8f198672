"""The model families sovtune is tested on, defined once: tests/test_families.py runs the grid over them and
scripts/gen_families_doc.py writes docs/model-families.md from them.

Each family is its real vocabulary (llama.cpp's ggml-vocab-*.gguf, fetched by scripts/fetch_test_tokenizers.py into a
cache outside the repository), its real chat template (from the GGUF where it carries one, else the template the
family publishes: a sovtune built-in or a file in tests/chat_templates/, each saying where it comes from) and a tiny
random model of its transformers architecture (hidden size 16, one layer), so the whole grid runs on a CPU.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TEMPLATES = TESTS / "chat_templates"
FETCH = "python scripts/fetch_test_tokenizers.py"

# Every tiny model: one decoder layer, hidden size 16 (two heads of 8): the embeddings of a real vocabulary dominate.
TINY = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 512}
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEOX_MODULES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class Family:
    id: str  # the test id: tests/test_families.py::...[id]
    name: str
    model_type: str  # transformers config model_type of the tiny model
    architecture: str  # the transformers class it builds
    config: dict[str, Any]  # the tiny model's config beyond TINY
    vocab: str  # ggml-vocab-<vocab>.gguf
    template: str  # "gguf" (the vocabulary file's), "builtin:<name>" (data.chat_template) or "file:<name>"
    template_source: str  # where the template text comes from
    terminator: str  # the token that ends an assistant turn
    target_modules: tuple[str, ...]  # what all-linear adapts
    quirks: tuple[str, ...]  # what sovtune handles for this family, in words
    hub_id: str = ""  # a real model of the family in the planner's offline table (sovtune plan without its config)
    system_message: str = "keep"  # the data.system_message the family's template needs
    vocab_size: int | None = None  # embedding rows of the real model, where it pads the vocabulary
    tokenizer_settings: dict[str, Any] = field(default_factory=dict)  # what the family's tokenizer.json sets and
    # the GGUF leaves out

    @property
    def test_id(self) -> str:
        """How to run this family's tests (every test of the grid carries the id)."""
        return f"pytest tests/test_families.py -k {self.id}"


GRID: tuple[Family, ...] = (
    Family(
        id="llama3",
        hub_id="meta-llama/Llama-3.1-8B",
        name="Llama 3.x",
        model_type="llama",
        architecture="LlamaForCausalLM",
        config={"intermediate_size": 32, "num_key_value_heads": 1},
        vocab="llama-bpe",
        template="builtin:llama3",
        template_source="built-in `llama3` (Meta-Llama-3-8B-Instruct)",
        terminator="<|eot_id|>",
        target_modules=LLAMA_MODULES,
        quirks=(
            "template and tokenizer both add <|begin_of_text|>: one BOS",
            "no pad token: <|reserved_special_token_0|>, never <|eot_id|>",
            "<|eot_id|> ends turns, EOS is <|end_of_text|>",
        ),
        tokenizer_settings={"add_bos_token": True},  # Meta's tokenizer.json adds <|begin_of_text|>
    ),
    Family(
        id="llama2",
        hub_id="meta-llama/Llama-2-7b-hf",
        name="Llama 2",
        model_type="llama",
        architecture="LlamaForCausalLM",
        config={"intermediate_size": 32, "num_key_value_heads": 2},
        vocab="llama-spm",
        template="builtin:llama2",
        template_source="built-in `llama2` (Llama-2-7b-chat-hf)",
        terminator="</s>",
        target_modules=LLAMA_MODULES,
        quirks=(
            "SentencePiece: answers tokenised in context, no stray word-start mark",
            "BOS before every [INST]: the template's, none added",
            "no pad token: <unk>",
        ),
    ),
    Family(
        id="mistral",
        hub_id="mistralai/Mistral-7B-v0.1",
        name="Mistral",
        model_type="mistral",
        architecture="MistralForCausalLM",
        config={"intermediate_size": 32, "num_key_value_heads": 1, "sliding_window": None},
        vocab="llama-spm",
        template="builtin:mistral",
        template_source="built-in `mistral` (Mistral-7B-Instruct-v0.2)",
        terminator="</s>",
        target_modules=LLAMA_MODULES,
        quirks=(
            "answer glued to [/INST]: tokenised in context, no stray word-start mark",
            "no system role: data.system_message: merge",
        ),
        system_message="merge",
    ),
    Family(
        id="qwen2.5",
        hub_id="Qwen/Qwen2.5-7B",
        name="Qwen2.5",
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        config={"intermediate_size": 32, "num_key_value_heads": 1, "tie_word_embeddings": True},
        vocab="qwen2",
        template="gguf",
        template_source="the GGUF's (ChatML with a default system prompt)",
        terminator="<|im_end|>",
        target_modules=LLAMA_MODULES,
        quirks=(
            "pad = eos = <|endoftext|>: pad moved to a spare token",
            "<|im_end|> ends turns",
            "default system prompt stays out of the loss",
        ),
    ),
    Family(
        id="qwen3",
        hub_id="Qwen/Qwen3-8B",
        name="Qwen3",
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        config={"intermediate_size": 32, "num_key_value_heads": 1, "head_dim": 8, "tie_word_embeddings": True},
        vocab="qwen2",
        template="file:qwen3.jinja",
        template_source="published (Qwen/Qwen3-0.6B, via llama.cpp)",
        terminator="<|im_end|>",
        target_modules=LLAMA_MODULES,
        quirks=(
            "empty <think></think> block of the last turn is prompt, not answer",
            "earlier turns lose the think block: spans located, not prefix-matched",
            "pad = eos = <|endoftext|>: pad moved to a spare token",
        ),
    ),
    Family(
        id="phi3",
        hub_id="microsoft/Phi-3-mini-4k-instruct",
        name="Phi-3",
        model_type="phi3",
        architecture="Phi3ForCausalLM",
        config={"intermediate_size": 32, "num_key_value_heads": 2},
        vocab="phi-3",
        template="gguf",
        template_source="the GGUF's (Phi-3-mini)",
        terminator="<|end|>",
        target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        quirks=(
            "fused qkv_proj and gate_up_proj",
            "<|end|> ends turns; pad = eos = <|endoftext|>: pad <unk>",
            "word-start mark after each special token: tokens of the whole text (round trip 100%)",
            "template drops system messages: data.system_message: merge",
        ),
        system_message="merge",
    ),
    Family(
        id="gemma4",
        hub_id="google/gemma-4-31B-it",
        name="Gemma 4",
        model_type="gemma4_text",
        architecture="Gemma4ForCausalLM",
        config={  # a sliding and a global layer with its own head size, as in Gemma 4 (per-layer config values)
            "num_hidden_layers": 2,
            "intermediate_size": 32,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "global_head_dim": 16,
            "hidden_size_per_layer_input": 0,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        vocab="gemma-4",
        template="gguf",
        template_source="the GGUF's (Gemma 4)",
        terminator="<turn|>",
        target_modules=LLAMA_MODULES,
        quirks=(
            "thought channel only in the generation prompt: spans located, not prefix-matched",
            "assistant role rendered as 'model'",
            "262k vocabulary",
        ),
    ),
    Family(
        id="gpt-neox",
        hub_id="EleutherAI/pythia-1b",
        name="GPT-NeoX / Pythia",
        model_type="gpt_neox",
        architecture="GPTNeoXForCausalLM",
        config={"intermediate_size": 64},
        vocab="gpt-neox",
        template="builtin:plain",
        template_source="built-in `plain` (the family publishes none)",
        terminator="<|endoftext|>",
        target_modules=NEOX_MODULES,
        quirks=("no pad token: <|padding|>", "BOS = EOS, not added to text", "vocabulary padded to 50432"),
        vocab_size=50432,
    ),
    Family(
        id="falcon",
        hub_id="tiiuae/falcon-7b",
        name="Falcon",
        model_type="falcon",
        architecture="FalconForCausalLM",
        config={"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True, "bias": False},
        vocab="falcon",
        template="file:falcon.jinja",
        template_source="published (falcon-7b-instruct), from memory",
        terminator="<|endoftext|>",
        target_modules=NEOX_MODULES,
        quirks=(
            "template has no turn terminator: EOS appended to each answer",
            "no pad token: a spare special token",
            "'Falcon:' generation prompt without its space",
        ),
    ),
    Family(
        id="starcoder2",
        hub_id="bigcode/starcoder2-3b",
        name="StarCoder2",
        model_type="starcoder2",
        architecture="Starcoder2ForCausalLM",
        config={"intermediate_size": 64, "num_key_value_heads": 1},
        vocab="starcoder",
        template="builtin:starcoder2",
        template_source="built-in `starcoder2` (starcoder2-15b-instruct-v0.1)",
        terminator="<|endoftext|>",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
        quirks=(
            "template always ends with the response header",
            "no system role: data.system_message: merge",
            "no pad token: <fim_pad>",
        ),
        system_message="merge",
    ),
    Family(
        id="deepseek",
        hub_id="deepseek-ai/deepseek-llm-7b-base",
        name="DeepSeek LLM",
        model_type="llama",
        architecture="LlamaForCausalLM",
        config={"intermediate_size": 32, "num_key_value_heads": 2},
        vocab="deepseek-llm",
        template="builtin:deepseek",
        template_source="built-in `deepseek` (deepseek-llm-7b-chat)",
        terminator="<｜end▁of▁sentence｜>",
        target_modules=LLAMA_MODULES,
        quirks=(
            "'Assistant:' generation prompt, 'Assistant: ' in history",
            "pad = eos: pad moved to a spare token",
            "full-width special tokens",
        ),
    ),
)


def family(family_id: str) -> Family:
    return next(f for f in GRID if f.id == family_id)


# ---------------------------------------------------------------------------------------------------------------
# The vocabularies


def _fetch_script() -> Any:
    spec = importlib.util.spec_from_file_location("fetch_test_tokenizers", REPO / "scripts/fetch_test_tokenizers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vocab_file(vocab: str) -> Path:
    """The GGUF of a vocabulary; skips the test, saying what to run, when the cache does not have it."""
    folder = _fetch_script().vocab_folder()
    path = folder / f"ggml-vocab-{vocab}.gguf"
    if not path.is_file():
        pytest.skip(f"real tokenizer vocabularies are not in {folder}: run {FETCH}")
    return path


def _gguf_tokens(path: Path) -> tuple[str, list[str], list[int], dict[str, Any]]:
    """(tokenizer model, tokens, token types, the special-token ids and flags) as llama.cpp wrote them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def strings(key: str) -> list[str]:
        item = fields[key]
        return [bytes(item.parts[i]).decode("utf-8") for i in item.data]

    def number(key: str) -> Any:
        item = fields.get(key)
        return None if item is None else item.parts[item.data[0]][0].item()

    settings = {name: number(f"tokenizer.ggml.{name}") for name in ("bos_token_id", "eos_token_id", "add_bos_token")}
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    return strings("tokenizer.ggml.model")[0], strings("tokenizer.ggml.tokens"), types, settings


CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def _repair_byte_level(tokenizer: Any, tokens: list[str], types: list[int]) -> Any:
    """transformers 5's GGUF conversion of byte-level vocabularies respells control tokens outside the byte alphabet
    (DeepSeek's full-width <｜begin▁of▁sentence｜>), so they lose their ids and get appended as new tokens, and it
    adds a <|endoftext|> that the vocabulary lacks (Llama 3). Put every control token back at its llama.cpp id, as
    the family's own tokenizer.json has it, and keep only the added tokens the file declares."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    spelled = {index: token for token, index in vocab.items()}
    added = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind == CONTROL and spelled.get(index, token) != token:
            del vocab[spelled[index]]  # a merge never builds a control token: nothing else refers to its spelling
            vocab[token] = index
        if kind == CONTROL or (kind == USER_DEFINED and vocab.get(token) == index):
            added.append(
                {"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": kind == CONTROL}
            )  # fmt: skip
    data["added_tokens"] = added
    return Tokenizer.from_str(json.dumps(data))


def tokenizer_folder(vocab: str, settings: dict[str, Any] | None = None) -> Path:
    """The vocabulary as a transformers tokenizer folder, converted once per transformers version and kept in the
    cache beside the GGUF files (never in the repository)."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    source = vocab_file(vocab)
    name = "-".join([vocab, *(f"{key}={value}" for key, value in sorted((settings or {}).items()))])
    target = source.parent.parent / f"converted-transformers-{transformers.__version__}" / name
    if (target / "tokenizer.json").is_file():
        return target
    converted = PreTrainedTokenizerFast.from_pretrained(str(source.parent), gguf_file=source.name)
    kind, tokens, types, ids = _gguf_tokens(source)
    if kind == "gpt2":
        converted = PreTrainedTokenizerFast(
            tokenizer_object=_repair_byte_level(converted, tokens, types),
            bos_token=tokens[ids["bos_token_id"]] if ids["bos_token_id"] is not None else None,
            eos_token=tokens[ids["eos_token_id"]] if ids["eos_token_id"] is not None else None,
            pad_token=converted.pad_token,
            unk_token=converted.unk_token if converted.unk_token in tokens else None,
            add_bos_token=bool(ids["add_bos_token"]),
            add_eos_token=False,
            chat_template=converted.chat_template,
        )
    for name, value in (settings or {}).items():
        setattr(converted, name, value)
    if len(converted) > len(tokens):  # fewer is fine: llama.cpp pads some vocabularies with unused [PAD] entries
        raise AssertionError(f"{source.name}: {len(converted)} tokens after conversion, the file has {len(tokens)}")
    staged = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    converted.save_pretrained(str(staged))
    if target.exists():  # converted meanwhile by another test process
        shutil.rmtree(staged)
    else:
        staged.replace(target)
    return target


@functools.lru_cache(maxsize=None)
def _loaded(vocab: str, settings: tuple[tuple[str, Any], ...]) -> tuple[Any, str | None]:
    """A loaded tokenizer and its pad token as shipped (loading a 262k vocabulary takes seconds: every test module of
    the session shares it; the grid's eleven vocabularies hold well under a gigabyte)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(vocab, dict(settings))))
    return tokenizer, tokenizer.pad_token


def load_tokenizer(item: Family) -> Any:
    """The family's tokenizer with its chat template as the family ships it (none for built-in templates: the
    recipe names those, as a user's would), and its pad token as shipped. Calls for one family share one object, put
    back to that state each time."""
    tokenizer, pad = _loaded(item.vocab, tuple(sorted(item.tokenizer_settings.items())))
    tokenizer.pad_token = pad
    tokenizer.chat_template = None
    if item.template.startswith("file:"):
        tokenizer.chat_template = (TEMPLATES / item.template.removeprefix("file:")).read_text(encoding="utf-8")
    elif item.template == "gguf":
        tokenizer.chat_template = _gguf_template(item.vocab, tuple(sorted(item.tokenizer_settings.items())))
    return tokenizer


@functools.lru_cache(maxsize=None)
def _gguf_template(vocab: str, settings: tuple[tuple[str, Any], ...]) -> str:
    return (tokenizer_folder(vocab, dict(settings)) / "chat_template.jinja").read_text(encoding="utf-8")


def tiny_config(item: Family, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        item.model_type,
        **{**TINY, **item.config},
        vocab_size=item.vocab_size or len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(item: Family, folder: Path, seed: int = 0) -> Path:
    """A tiny random model of the family, saved with its tokenizer like a hub checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(item)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(item, tokenizer))
    assert type(model).__name__ == item.architecture, type(model).__name__
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def model_folder(item: Family, seed: int = 0) -> Path:
    """The family's tiny model (`build_model`), built once per machine and library versions and kept in the cache
    beside the vocabularies, for tests that only read it: a 262k vocabulary makes a 50 MB folder that took seconds
    to build, write and delete in every test session. A folder whose files changed since it was built (their sizes
    and modification times, recorded beside it) is built again."""
    import torch
    import transformers

    spec = json.dumps([repr(item), TINY, seed, torch.__version__, transformers.__version__], sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    target = _fetch_script().vocab_folder().parent / "tiny-models" / f"{item.id}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test processes running side by side (pytest-xdist) build it once
        if _unchanged(target):
            return target
        staged = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(staged, ignore_errors=True)
        build_model(item, staged, seed)
        shutil.rmtree(target, ignore_errors=True)  # changed since it was built
        staged.replace(target)
        _state_file(target).write_text(json.dumps(_file_states(target)), encoding="utf-8")
    return target


def _state_file(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.built.json")


def _file_states(folder: Path) -> dict[str, list[int]]:
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in sorted(folder.iterdir())}


def _unchanged(folder: Path) -> bool:
    try:
        return json.loads(_state_file(folder).read_text(encoding="utf-8")) == _file_states(folder)
    except (OSError, ValueError):
        return False


def chat_template_option(item: Family) -> dict[str, Any]:
    """The data section a recipe for this family needs beyond the defaults."""
    data: dict[str, Any] = {"system_message": item.system_message}
    if item.template.startswith("builtin:"):
        data["chat_template"] = item.template.removeprefix("builtin:")
    return data
