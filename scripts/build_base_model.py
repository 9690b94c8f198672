"""Build the small pretrained Llama base model shipped in data/base-model/, and the general-text sets.

Everything is made offline from text already on this machine: the Python standard library (PSF licence) and the
docstrings of the permissively licensed packages installed beside it (each one's licence is recorded). From it, a
byte-level BPE tokenizer, then a ~6M-parameter Llama pretrained with the transformers Trainer on packed 256-token
sequences. A seeded slice of documents is held out: it gives the held-out loss and data/general/eval.jsonl,
the English passages the evaluation uses to check that fine-tuning did not wreck general ability, and
data/general/train.jsonl, passages of the other held-out documents for replay during fine-tuning (disjoint from
eval.jsonl by document and by paragraph).

    python scripts/build_base_model.py --out data/base-model --general-out data/general --seed 0
    python scripts/build_base_model.py --general-only   # train.jsonl (and the README) for the shipped model
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import random
import re
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

BOS, EOS, PAD, IM_START, IM_END = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]
# ChatML. bos is rendered once, before the first message, so that rendering messages[:k] with a
# generation prompt is a string prefix of rendering messages[:k+1] (what prompt masking relies on).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Directories of test suites: mostly fixtures rather than prose. test_sqlite3 is kept for its SQL.
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "lib-dynload", "__pycache__"}
KEPT_TEST_DIR = ("test", "test_sqlite3")
TOPICS_FILE = "pydoc_data/topics.py"  # the language reference as prose; one document per topic
# Pre-tokenization: words, digit groups, punctuation runs and whitespace runs are separate pieces. Unlike
# GPT-2's " word" pieces, a word is then tokenized the same after a space as after a quote, so copying
# "Sales" from a question into WHERE name = 'Sales' is copying the same tokens; a tiny model can learn that.
PRETOKENIZE_PATTERN = r"\p{L}+|\p{N}{1,3}|[^\s\p{L}\p{N}]+|\s+"


@dataclass(frozen=True)
class Document:
    """One corpus unit: a source file, a text file, or one pydoc topic."""

    name: str
    text: str


# ---------------------------------------------------------------- corpus


def is_corpus_file(relative: Path) -> bool:
    """Python sources and prose files of the standard library, without test suites and build config."""
    if relative.suffix not in {".py", ".rst", ".txt"}:
        return False
    parts = relative.parts
    if parts[:2] == KEPT_TEST_DIR:
        return True
    return not (
        set(parts[:-1]) & SKIPPED_DIRS or parts[0].startswith("config-") or relative.name.startswith("_sysconfigdata")
    )


def looks_like_data(text: str) -> bool:
    """Codec tables and similar generated files: few letters, many escapes. They teach nothing."""
    letters = sum(ch.isalpha() for ch in text)
    return letters < 0.4 * len(text) or text.count("\\x") + text.count("0x") > len(text) / 200


def topic_documents(path: Path) -> list[Document]:
    """Split pydoc_data/topics.py into one prose document per language-reference topic."""
    topics = ast.literal_eval(path.read_text(encoding="utf-8").split("topics = ", 1)[1])
    return [Document(f"{TOPICS_FILE}::{key}", text) for key, text in sorted(topics.items())]


def collect_documents(stdlib: Path) -> list[Document]:
    """All corpus documents, in sorted path order so the corpus and its hash are reproducible."""
    documents = []
    for path in sorted(stdlib.rglob("*")):
        relative = path.relative_to(stdlib)
        if not path.is_file() or not is_corpus_file(relative):
            continue
        if relative.as_posix() == TOPICS_FILE:
            documents += topic_documents(path)
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a handful of test files are deliberately in other encodings
        if text.strip() and not looks_like_data(text):
            documents.append(Document(relative.as_posix(), text))
    return documents


# Licences whose terms let the text be used for training and the model be shipped. A distribution is used only if its
# licence metadata names at least one of these and none of REFUSED_LICENCE_WORDS (copyleft or unclear terms).
PERMISSIVE_LICENCE_WORDS = ("MIT", "BSD", "APACHE", "PSF", "PYTHON SOFTWARE FOUNDATION", "ISC", "0BSD", "ZLIB", "CC0")
REFUSED_LICENCE_WORDS = ("GPL", "MPL", "MOZILLA", "EUPL", "CC-BY-SA", "PROPRIETARY", "COMMERCIAL", "UNKNOWN")
# Vendored code carries its own licences, test suites are fixtures; neither is read.
SKIPPED_PACKAGE_DIRS = {
    "_vendor",
    "vendor",
    "vendored",
    "third_party",
    "_vendored",
    "tests",
    "test",
    "testing",
    "__pycache__",
}
EXCLUDED_DISTRIBUTIONS = {"sovtune"}  # the toolkit itself: its tests and docs describe the fine-tuning data


def distribution_licence(dist) -> str:
    """The licence a distribution declares: License-Expression, else the License field's first line, else
    classifiers."""
    meta = dist.metadata
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return expression
    field = (meta.get("License") or "").strip().splitlines()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return "; ".join(([field[0].strip()] if field and len(field[0]) < 80 else []) + classifiers)


def is_permissive(licence: str) -> bool:
    """True for licences such as MIT, BSD, Apache-2.0 and PSF; False for copyleft, unclear or missing ones."""
    upper = licence.upper()
    return any(w in upper for w in PERMISSIVE_LICENCE_WORDS) and not any(w in upper for w in REFUSED_LICENCE_WORDS)


def docstrings(source: str) -> list[str]:
    """The module, class and function docstrings of a Python source ("" where one has none; [] if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [ast.get_docstring(n) or "" for n in nodes]


def docstring_text(source: str) -> str:
    """The docstrings of a Python source with at least eight words, as blank-line-separated prose."""
    return "\n\n".join(d.strip() for d in docstrings(source) if len(d.split()) >= 8)


def collect_package_documents(max_chars_per_package: int, seed: int) -> tuple[list[Document], list[dict]]:
    """English prose from the permissively licensed Python packages installed here: their docstrings.

    The standard library alone is mostly code; its vocabulary has few everyday English words ("Which" and
    "employees" were 3 and 5 tokens). Docstrings of numpy, pandas, transformers, ... add prose. Each package gives at
    most max_chars_per_package characters from a seeded sample of its modules, so no single package dominates.
    Returns the documents (one per module) and, per distribution used, its name, version, licence and characters.
    """
    import importlib.metadata

    documents, sources = [], []
    dists = {d.metadata["Name"].lower(): d for d in importlib.metadata.distributions() if d.metadata["Name"]}
    for name in sorted(dists):
        dist = dists[name]
        licence = distribution_licence(dist)
        if name in EXCLUDED_DISTRIBUTIONS or not is_permissive(licence):
            continue
        files = sorted(
            str(f)
            for f in dist.files or []
            if str(f).endswith(".py") and not set(Path(str(f)).parts) & SKIPPED_PACKAGE_DIRS
        )
        random.Random(f"{seed}:{name}").shuffle(files)
        used = 0
        for relative in files:
            path = Path(dist.locate_file(relative))
            try:
                text = docstring_text(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
            if not text or looks_like_data(text):
                continue
            text = text[: max_chars_per_package - used]
            documents.append(Document(f"{name}/{relative}#docstrings", text))
            used += len(text)
            if used >= max_chars_per_package:
                break
        if used:
            sources.append(
                {"distribution": dist.metadata["Name"], "version": dist.version, "licence": licence, "characters": used}
            )
    return sorted(documents, key=lambda d: d.name), sources


def corpus_sha256(documents: list[Document]) -> str:
    """SHA-256 over name NUL text NUL for each document, in corpus order."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
    return digest.hexdigest()


def split_documents(documents: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Seeded hold-out of whole documents: (pretraining documents, held-out documents)."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(fraction * len(documents)))])
    train = [d for i, d in enumerate(documents) if i not in held]
    return train, [d for i, d in enumerate(documents) if i in held]


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(documents: list[Document], vocab_size: int, max_length: int):
    """Byte-level BPE trained on the pretraining documents, wrapped for transformers with ChatML."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, so no unk token
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator((doc.text for doc in documents), trainer=trainer)
    bos_id = backend.token_to_id(BOS)
    # Plain-text encodes start with <s>, as pretraining sequences did; chat text gets it from the template.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=max_length
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def check_tokenizer(tokenizer) -> None:
    """The properties the rest of sovtune relies on; a failure here is a bug in this script."""
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id, "plain encodes must start with <s>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id, "pad must differ from eos for loss masking"
    messages = [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "SELECT 1;"}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt), "chat template must be prefix-stable"
    assert full.count(BOS) == 1, "chat template must render bos once"


# ---------------------------------------------------------------- data


def pack(documents: list[Document], tokenizer, seq_len: int, seed: int) -> list[list[int]]:
    """Concatenate <s> doc </s> in seeded order and cut into seq_len blocks (remainder dropped)."""
    order = sorted(documents, key=lambda d: d.name)
    random.Random(seed).shuffle(order)
    # The backend encodes in parallel and does not warn about documents longer than model_max_length.
    encoded = tokenizer.backend_tokenizer.encode_batch([d.text for d in order])
    stream = [token for enc in encoded for token in enc.ids + [tokenizer.eos_token_id]]
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def add_copy_blocks(blocks: list[list[int]], fraction: float, seed: int) -> list[list[int]]:
    """Make a seeded share of blocks a corpus span followed by the same span again.

    Fine-tuning on text-to-SQL needs in-context copying (names and numbers from the question into the
    query), and repeated spans make copying pay. Measured so far: neither 25% of blocks over 2M tokens nor 10%
    over 7M tokens taught a model this small to copy random token sequences (the card's copy score).
    """
    rng = random.Random(seed)
    result = []
    for block in blocks:
        half = len(block) // 2
        result.append(block[:half] * 2 if rng.random() < fraction else block)
    return result


def lm_dataset(blocks: list[list[int]]):
    """A datasets.Dataset of causal-LM examples (labels = inputs; the model shifts them)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


# ---------------------------------------------------------------- general-text eval set


def prose_paragraphs(doc: Document) -> list[str]:
    """English paragraphs of a document: docstrings for Python sources, the text itself otherwise."""
    if doc.name.endswith(".py"):
        texts = docstrings(doc.text)
    else:
        texts = [doc.text]
    paragraphs = [p.strip() for text in texts for p in re.split(r"\n\s*\n", text)]
    return [" ".join(p.split()) for p in paragraphs if is_prose(p)]


def is_prose(paragraph: str) -> bool:
    """Mostly words and punctuation: no doctests, code blocks, tables or rules."""
    lines = paragraph.splitlines()
    if not paragraph or ">>>" in paragraph or sum(line.startswith("   ") for line in lines) > len(lines) / 2:
        return False
    wordy = sum(ch.isalpha() or ch in " ,.;:'()-" for ch in paragraph)
    return len(paragraph.split()) >= 8 and wordy >= 0.92 * len(paragraph)


def passages(paragraphs: list[str], count_tokens, min_tokens: int, max_tokens: int) -> list[str]:
    """Join consecutive paragraphs until a passage holds min_tokens; drop what would exceed max_tokens."""
    result, current = [], ""
    for paragraph in paragraphs:
        candidate = f"{current}\n\n{paragraph}" if current else paragraph
        if count_tokens(candidate) > max_tokens:
            current = paragraph if count_tokens(paragraph) <= max_tokens else ""
        else:
            current = candidate
        if current and count_tokens(current) >= min_tokens:
            result.append(current)
            current = ""
    return result


def general_eval_rows(held_out: list[Document], tokenizer, args) -> list[dict]:
    """Seeded sample of English passages taken only from held-out documents."""

    def count_tokens(text: str) -> int:
        return len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)

    rows = [
        {"text": text, "source": doc.name}
        for doc in held_out
        for text in passages(prose_paragraphs(doc), count_tokens, args.general_min_tokens, args.general_max_tokens)
    ]
    rows = random.Random(args.seed).sample(rows, min(args.general_passages, len(rows)))
    return sorted(rows, key=lambda r: (r["source"], r["text"]))


def general_train_rows(held_out: list[Document], eval_rows: list[dict], tokenizer, args) -> list[dict]:
    """Passages for general-text replay during fine-tuning (data/general/train.jsonl).

    Taken from the held-out documents that gave no passage to eval.jsonl, and without any passage that shares a
    paragraph with an evaluated one (sovtune's own rule, `sovtune.data.paragraphs`; it refuses to train on such
    text), so replaying them cannot hide forgetting on the evaluated passages.
    """
    from sovtune.data import paragraphs

    def count_tokens(text: str) -> int:
        return len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)

    evaluated_documents = {row["source"] for row in eval_rows}
    evaluated = set().union(*(paragraphs(row["text"]) for row in eval_rows))
    rows = {
        text: {"text": text, "source": doc.name}
        for doc in held_out
        if doc.name not in evaluated_documents
        for text in passages(prose_paragraphs(doc), count_tokens, args.general_min_tokens, args.general_max_tokens)
        if not paragraphs(text) & evaluated
    }
    return sorted(rows.values(), key=lambda r: (r["source"], r["text"]))


# ---------------------------------------------------------------- model and training


def build_model(tokenizer, args):
    """A freshly initialised Llama whose special-token ids match the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_length,
        tie_word_embeddings=True,  # halves the embedding bytes; the card budget is 25 MB
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def make_time_limit_callback(max_minutes: float):
    """A TrainerCallback that stops training once the wall-clock budget is spent."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        """Stop early on a slow or busy machine instead of running past the budget."""

        def __init__(self):
            self.start = time.monotonic()
            self.stopped_early = False

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.start > max_minutes * 60:
                control.should_training_stop = self.stopped_early = True

    return TimeLimit()


def pretrain(model, train_blocks, held_blocks, args, work_dir: Path) -> dict:
    """Run the Trainer for the token budget; return the facts the model card reports."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    batch_tokens = args.batch_size * args.seq_len
    training_args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=args.token_budget // batch_tokens,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.1,
        adam_beta2=0.95,  # the usual small-LM setting; steadier than 0.999 with short warmup
        max_grad_norm=1.0,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_drop_last=True,
    )
    time_limit = make_time_limit_callback(args.max_minutes)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=lm_dataset(train_blocks),
        eval_dataset=lm_dataset(held_blocks),
        data_collator=default_data_collator,
        callbacks=[time_limit],
    )
    start = time.monotonic()
    train_output = trainer.train()
    minutes = (time.monotonic() - start) / 60
    held_out_loss = trainer.evaluate()["eval_loss"]
    # Logged losses are means over 25-step windows; a run shorter than that only has the overall mean.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry] or [train_output.training_loss]
    return {
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.global_step * batch_tokens,
        "stopped_by_time_limit": time_limit.stopped_early,
        "train_minutes": round(minutes, 2),
        "final_train_loss": round(losses[-1], 4),
        "held_out_loss": round(held_out_loss, 4),
        "held_out_tokens": len(held_blocks) * args.seq_len,
        "loss_log": [round(x, 4) for x in losses],
    }


def copy_score(model, tokenizer, seed: int, span: int = 64, rows: int = 8) -> dict:
    """Loss on random tokens, then on the same tokens repeated: a model that copies in context scores far
    lower on the repeat. This is the ability the SQL fine-tune needs, so the card reports it."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    first_id = len(SPECIAL_TOKENS)  # random ordinary tokens only
    tokens = torch.randint(first_id, len(tokenizer), (rows, span), generator=generator)
    ids = torch.cat([torch.full((rows, 1), tokenizer.bos_token_id), tokens, tokens], dim=1)
    model.eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    token_loss = -log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    return {
        "random_span_loss": round(token_loss[:, :span].mean().item(), 3),
        "repeated_span_loss": round(token_loss[:, span:].mean().item(), 3),
    }


# ---------------------------------------------------------------- outputs


def save_model(model, tokenizer, out: Path) -> None:
    """Weights (fp32 safetensors), config, generation config and tokenizer files."""
    from transformers import GenerationConfig

    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    model.config.use_cache = True  # the Trainer switches the KV cache off; generation wants it back
    # Stop on </s> (plain text) and on <|im_end|> (end of a chat turn).
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, im_end_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rebuild_command(args) -> str:
    """The command line that reproduces this build, with every option that differs from the defaults."""
    defaults = vars(parse_args([]))
    changed = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if v != defaults[k] and k not in {"out", "general_out", "seed"}
    ]
    return " ".join(
        [
            "python scripts/build_base_model.py",
            f"--out {args.out}",
            f"--general-out {args.general_out}",
            f"--seed {args.seed}",
        ]
        + changed
    )


def versions() -> dict:
    """Library versions: the corpus depends on the Python version, the weights on torch and transformers."""
    import tokenizers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def copy_verdict(score: dict) -> str:
    """What the copy score (table below) says, in words: the card must not claim an ability the model lacks."""
    gain = score["random_span_loss"] - score["repeated_span_loss"]
    if gain >= 1.0:
        return f"The model copies: a repeated span costs {gain:.2f} nats/token less than its first occurrence."
    return (
        "**It did not learn to copy arbitrary token sequences** "
        f"(loss on a repeated random span {score['repeated_span_loss']} "
        f"nats/token, the first time {score['random_span_loss']}); what fine-tuning on it achieves is measured in "
        'docs/benchmarks.md, "Quickstart timing and results".'
    )


def model_card(info: dict) -> str:
    """README.md for data/base-model: YAML header for the Hub, then the facts in build_info.json."""
    a, c, t = info["architecture"], info["corpus"], info["training"]
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tiny, sovtune, test-model]
---

# sovtune tiny base model

A {a["parameters"] / 1e6:.2f}M-parameter Llama pretrained from scratch, offline, on the Python standard library
and the docstrings of the permissively licensed Python packages installed beside it. \
It exists so that sovtune's quickstart and tests can fine-tune and evaluate a real
*pretrained* causal LM on a laptop CPU in minutes, with nothing downloaded. It is not useful for anything else.

## Architecture

`LlamaForCausalLM`: {a["num_hidden_layers"]} layers, hidden {a["hidden_size"]}, \
{a["num_attention_heads"]} attention heads
({a["num_key_value_heads"]} key/value heads), MLP {a["intermediate_size"]}, vocabulary {a["vocab_size"]}, context
{a["max_position_embeddings"]}, tied input/output embeddings. \
Linear layers `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`.
{a["parameters"]:,} parameters, stored as {a["dtype"]} safetensors.

## Tokenizer and chat format

Byte-level BPE ({a["vocab_size"]} tokens) trained on the same pretraining documents. Text is first split into
words, groups of up to three digits, punctuation runs and whitespace runs, so a word is the same tokens after a
space as after a quote (copying `Sales` into `'Sales'` copies tokens). Special tokens: bos `<s>`,
eos `</s>`, pad `<pad>` (distinct from eos), and `<|im_start|>`, `<|im_end|>` for ChatML. Plain-text encodes start
with `<s>`. The chat template renders `<s>` once, then `<|im_start|>role\\ncontent<|im_end|>\\n` per message; it is
prefix-stable, so prompt tokens can be masked by rendering the prompt with `add_generation_prompt=True`.
Tokenize rendered chat text with `add_special_tokens=False` (the template already holds `<s>`).
Generation stops at `</s>` or `<|im_end|>`. `model_max_length` is {a["max_position_embeddings"]}.

## Training data

Python {info["versions"]["python"]} standard library (PSF licence): `.py`, `.rst` and `.txt` files, without test
suites (except `test/test_sqlite3`, kept for its SQL) or generated codec tables, and the language-reference topics
of `pydoc_data/topics.py` as one prose document each; and the docstrings (module, class and function; at least
eight words each) of every installed Python distribution whose licence metadata is permissive (MIT, BSD, Apache,
PSF, ISC, ...; copyleft, unclear or missing licences are skipped, as are vendored code and test suites), at most
{info["package_chars"]:,} characters per distribution from a seeded sample of its modules:

{package_table(c["packages"])}

{c["documents"]} documents, SHA-256 `{c["sha256"]}` (over name NUL text NUL per document, in sorted order).
{c["held_out_documents"]} documents (seeded) are held out from pretraining: they give the held-out loss and the
general-text set in `data/general/`. The sovtune SQL dataset (`data/sql/`) is not in the corpus.
Pretraining documents: {c["train_documents"]}, {c["train_tokens"]:,} tokens, packed as `<s> document </s>` into
{t["seq_len"]}-token blocks. {t["copy_fraction"]:.0%} of the blocks (seeded) are a {t["seq_len"] // 2}-token span \
followed by the
same span again, meant to teach copying from the context, which fine-tuning tasks such as text-to-SQL rely on.
{copy_verdict(t["copy_score"])}

## Training

transformers `Trainer` on CPU ({t["threads"]} torch threads), seed {t["seed"]}: {t["steps"]} steps of \
{t["batch_size"]} x {t["seq_len"]}-token
packed sequences = **{t["tokens_seen"]:,} tokens seen**, AdamW lr {t["lr"]} (cosine, {t["warmup_steps"]} warmup steps),
weight decay 0.1, {t["train_minutes"]} minutes.

| | loss (nats/token) |
|---|---|
| uniform guess, ln(vocab) | {math.log(a["vocab_size"]):.2f} |
| final train loss (last 25 steps) | {t["final_train_loss"]} |
| held-out loss ({t["held_out_tokens"]:,} tokens) | {t["held_out_loss"]} |
| random tokens, first time | {t["copy_score"]["random_span_loss"]} |
| the same random tokens repeated (in-context copying) | {t["copy_score"]["repeated_span_loss"]} |

## Rebuild

```bash
{info["command"]}
```

Versions: {", ".join(f"{k} {v}" for k, v in info["versions"].items())}. The corpus depends on the Python version;
the weights depend on the torch build and thread count, and differ if training hit the `--max-minutes` limit.

## Licence

The weights are released under Apache-2.0, the licence of sovtune. The training text keeps its own licences, listed
above; all of them allow this use.
"""


def package_table(packages: list[dict]) -> str:
    """Markdown table of the distributions whose docstrings are in the corpus."""
    if not packages:
        return "(none: built with --package-chars 0)"
    rows = [f"| {p['distribution']} | {p['version']} | {p['licence']} | {p['characters']:,} |" for p in packages]
    return "\n".join(["| distribution | version | licence (as declared) | characters |", "|---|---|---|---|", *rows])


def general_readme(rows: list[dict], path: Path, info: dict, train_rows: list[dict], train_path: Path) -> str:
    """README.md for data/general."""
    train_tokens = info["general"].get("train_tokens", 0)
    return f"""# general: held-out English passages for the forgetting check, and others for replay

`eval.jsonl`: {len(rows)} lines `{{"text": ..., "source": ...}}`, each \
{info["general"]["min_tokens"]}-{info["general"]["max_tokens"]} tokens of
English prose (docstrings and documentation paragraphs) from the Python \
{info["versions"]["python"]} standard library and the
docstrings of permissively licensed Python packages (the base model's corpus; its card lists them).
They come only from the {info["corpus"]["held_out_documents"]} documents that `scripts/build_base_model.py` \
held out of the base
model's pretraining, so a base-vs-adapter perplexity on them measures general-text retention, not memorisation.

Built by `{info["command"]}` (seeded sample of all passages; paragraphs that look like code,
doctests or tables are dropped).

SHA-256 of `eval.jsonl`: `{sha256_file(path)}`

`train.jsonl`: {len(train_rows)} passages ({train_tokens:,} tokens) made the same way, for general-text replay while
fine-tuning (`data.train: [..., {{general: true, weight: 0.2}}]` with `eval.general.train`, see
docs/data-mixtures.md). They come from the {len({r["source"] for r in train_rows})} held-out documents that gave no
passage to `eval.jsonl`, and none shares a paragraph with an evaluated passage, so replaying them cannot hide
forgetting (`tests/test_shipped_data.py` checks both). Built by
`python scripts/build_base_model.py --general-only` (the held-out documents named in data/base-model/build_info.json,
read from this machine's standard library and packages; every passage from them that qualifies).

SHA-256 of `train.jsonl`: `{sha256_file(train_path)}`

Licence: each passage keeps the licence of its source: {general_licences(rows + train_rows, info)}.
"""


def general_licences(rows: list[dict], info: dict) -> str:
    """The licences of the sources the general-text passages come from."""
    by_name = {p["distribution"].lower(): p["licence"] for p in info["corpus"]["packages"]}
    licences = {
        by_name[r["source"].split("/", 1)[0]]
        if r["source"].endswith("#docstrings")
        else "PSF-2.0 (Python standard library)"
        for r in rows
    }
    return "; ".join(sorted(licences))


def build_info(args, model, documents, package_sources, train_docs, held_docs, train_blocks, training) -> dict:
    """The machine-readable facts behind the model card."""
    config = model.config
    return {
        "architecture": {
            "model_type": config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
            **{
                k: getattr(config, k)
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "max_position_embeddings",
                    "tie_word_embeddings",
                )
            },
        },
        "corpus": {
            "source": "Python standard library (PSF licence): .py/.rst/.txt files and pydoc_data topics; "
            "docstrings of the permissively licensed Python packages installed (see packages)",
            "packages": package_sources,
            "sha256": corpus_sha256(documents),
            "documents": len(documents),
            "train_documents": len(train_docs),
            "held_out_documents": len(held_docs),
            "train_tokens": len(train_blocks) * args.seq_len,
            "held_out_names": [d.name for d in held_docs],
        },
        "training": {
            "seed": args.seed,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "token_budget": args.token_budget,
            "threads": args.threads,
            "copy_fraction": args.copy_fraction,
            **training,
        },
        "package_chars": args.package_chars,
        "general": {
            "passages": args.general_passages,
            "min_tokens": args.general_min_tokens,
            "max_tokens": args.general_max_tokens,
        },
        "versions": versions(),
        "command": rebuild_command(args),
    }


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the shipped model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/base-model"), help="model output directory")
    parser.add_argument(
        "--general-out", type=Path, default=Path("data/general"), help="general-text eval set directory"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the hold-out, packing, init and data order")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=60.0,
        help="safety cap: stop pretraining after this many minutes even if the token budget is not spent",
    )
    parser.add_argument(
        "--package-chars",
        type=int,
        default=1_500_000,
        help="docstring characters taken at most from each permissively licensed installed package "
        "(0: standard library only)",
    )
    parser.add_argument("--token-budget", type=int, default=7_000_000, help="pretraining tokens (sets the step count)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--vocab-size", type=int, default=6144, help="BPE vocabulary size, special tokens included")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512, help="context length and tokenizer model_max_length")
    parser.add_argument("--seq-len", type=int, default=256, help="packed pretraining sequence length")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per step; small, because updates matter more than batch size at this budget",
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument(
        "--copy-fraction", type=float, default=0.1, help="share of pretraining blocks that repeat a span"
    )
    parser.add_argument(
        "--held-out-fraction", type=float, default=0.05, help="share of documents kept out of pretraining"
    )
    parser.add_argument(
        "--held-out-blocks", type=int, default=200, help="cap on held-out sequences scored for the loss"
    )
    parser.add_argument("--general-passages", type=int, default=150, help="passages in data/general/eval.jsonl")
    parser.add_argument("--general-min-tokens", type=int, default=100)
    parser.add_argument("--general-max-tokens", type=int, default=300)
    parser.add_argument(
        "--general-only",
        action="store_true",
        help="only write --general-out/train.jsonl (and README) for the model already in --out; trains nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Corpus -> tokenizer -> pretraining -> model files, card and general-text set."""
    import tempfile

    import torch

    args = parse_args(argv)
    if args.general_only:
        general_only(args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    documents = collect_documents(Path(sysconfig.get_paths()["stdlib"]))
    package_documents, package_sources = (
        collect_package_documents(args.package_chars, args.seed) if args.package_chars else ([], [])
    )
    documents += package_documents
    train_docs, held_docs = split_documents(documents, args.held_out_fraction, args.seed)
    tokenizer = train_tokenizer(train_docs, args.vocab_size, args.max_length)
    check_tokenizer(tokenizer)
    train_blocks = add_copy_blocks(pack(train_docs, tokenizer, args.seq_len, args.seed), args.copy_fraction, args.seed)
    held_blocks = pack(held_docs, tokenizer, args.seq_len, args.seed)[: args.held_out_blocks]
    print(
        f"corpus: {len(documents)} documents, {len(train_blocks)} train blocks, {len(held_blocks)} held-out blocks",
        flush=True,
    )
    model = build_model(tokenizer, args)
    with tempfile.TemporaryDirectory() as work_dir:
        training = pretrain(model, train_blocks, held_blocks, args, Path(work_dir))
    training["copy_score"] = copy_score(model, tokenizer, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, args.out)
    general_rows = general_eval_rows(held_docs, tokenizer, args)
    write_jsonl(general_rows, args.general_out / "eval.jsonl")
    info = build_info(args, model, documents, package_sources, train_docs, held_docs, train_blocks, training)
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (args.out / "README.md").write_text(model_card(info), encoding="utf-8")
    write_general_train(held_docs, general_rows, tokenizer, args, info)
    print(json.dumps({k: v for k, v in training.items() if k != "loss_log"}, indent=2))


def write_general_train(held_docs: list[Document], eval_rows: list[dict], tokenizer, args, info: dict) -> None:
    """data/general/train.jsonl and the folder's README."""
    train_rows = general_train_rows(held_docs, eval_rows, tokenizer, args)
    info["general"]["train_tokens"] = sum(
        len(tokenizer.backend_tokenizer.encode(row["text"], add_special_tokens=False).ids) for row in train_rows
    )
    train_path, eval_path = args.general_out / "train.jsonl", args.general_out / "eval.jsonl"
    write_jsonl(train_rows, train_path)
    readme = general_readme(eval_rows, eval_path, info, train_rows, train_path)
    (args.general_out / "README.md").write_text(readme, encoding="utf-8")
    print(f"{train_path}: {len(train_rows)} passages, {info['general']['train_tokens']:,} tokens")


def general_only(args) -> None:
    """train.jsonl for the shipped model: its held-out documents (by name, from build_info.json) read from this
    machine, without the documents and paragraphs of the existing eval.jsonl. No model is trained."""
    from transformers import AutoTokenizer

    info = json.loads((args.out / "build_info.json").read_text(encoding="utf-8"))
    names = set(info["corpus"]["held_out_names"])
    documents = collect_documents(Path(sysconfig.get_paths()["stdlib"]))
    if info["package_chars"]:
        documents += collect_package_documents(info["package_chars"], info["training"]["seed"])[0]
    held_docs = [doc for doc in documents if doc.name in names]
    print(f"{len(held_docs)} of the {len(names)} held-out documents found on this machine", flush=True)
    eval_path = args.general_out / "eval.jsonl"
    eval_rows = [json.loads(line) for line in eval_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    write_general_train(held_docs, eval_rows, tokenizer, args, info)


if __name__ == "__main__":
    sys.exit(main())
