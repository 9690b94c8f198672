"""Each real quirk of a family, with its real tokenizer (tests/families.py): Llama 3's double BOS and missing pad,
Qwen's pad = eos = <|endoftext|> with <|im_end|> ending turns, the SentencePiece word-start mark (Mistral, Phi-3),
Phi-3's <|end|> and fused projections, Gemma's template without a system role, Qwen3's think tags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import families
from helpers import invoke, write_recipe
from sovtune import model as models
from sovtune.config import Recipe, load_recipe, validate_recipe
from sovtune.data import (
    IGNORE_INDEX,
    Row,
    TemplateError,
    encode,
    generation_prompt,
    stop_token_ids,
    to_example,
    tokenize,
)
from sovtune.preflight import template_round_trip

SYSTEM = "Answer with one SQL statement."
QUESTION = "How many employees are there?"
ANSWER = "SELECT COUNT(*) FROM employees;"
CHAT = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
WITH_SYSTEM = [{"role": "system", "content": SYSTEM}, *CHAT]


def recipe_for(tmp_path: Path, **data: Any) -> Recipe:
    """A recipe whose model folder is never loaded: these tests hand the tokenizer in themselves."""
    return validate_recipe(
        {
            "model": {"name_or_path": str(tmp_path / "model")},
            "data": {"train": "train.jsonl", **data},
            "source_path": str(tmp_path / "recipe.yaml"),
        }
    )


def prepared(item: families.Family, recipe: Recipe | None = None) -> Any:
    """The family's tokenizer as sovtune loads it: the recipe's template (built-in) and a safe pad token."""
    tokenizer = families.load_tokenizer(item)
    if recipe is not None and recipe.data.chat_template:
        tokenizer.chat_template = models.read_chat_template(recipe)
    models.ensure_pad_token(tokenizer)
    return tokenizer


def trained(tokenizer: Any, recipe: Recipe, messages: list[dict[str, str]]) -> tuple[Any, Any, list[str]]:
    example = to_example(Row({"messages": messages}, "test:1"), recipe.data, tokenizer)
    tokens = tokenize(example, tokenizer, 4096)
    runs: list[list[int]] = [[]]
    for token, label in zip(tokens.input_ids, tokens.labels):
        if label != IGNORE_INDEX:
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    return example, tokens, [tokenizer.decode(run, skip_special_tokens=False) for run in runs if run]


# ---------------------------------------------------------------------------------------------------------------
# Llama 3


def test_llama3_template_and_tokenizer_both_add_begin_of_text_and_one_is_kept(tmp_path: Path) -> None:
    from sovtune.merge import held_out_batch

    recipe = recipe_for(tmp_path, chat_template="llama3")
    tokenizer = prepared(families.family("llama3"), recipe)
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    # The quirk, real: the template writes <|begin_of_text|> and the tokenizer adds one more by default.
    assert rendered.startswith("<|begin_of_text|>")
    assert tokenizer(rendered)["input_ids"][:2] == [bos, bos]
    # sovtune's training tokens, evaluation prompt and merge probes carry exactly one.
    example, tokens, _ = trained(tokenizer, recipe, CHAT)
    assert tokens.input_ids[0] == bos and tokens.input_ids.count(bos) == 1
    batch, source = held_out_batch(recipe, tokenizer, 2)  # no data here: the chat-rendered probe texts
    assert source.startswith("probe texts")
    for row in batch["input_ids"].tolist():
        assert row[0] == bos and row.count(bos) == 1


def test_llama3_has_no_pad_token_and_gets_a_reserved_one_not_eot(tmp_path: Path) -> None:
    recipe = recipe_for(tmp_path, chat_template="llama3")
    tokenizer = families.load_tokenizer(families.family("llama3"))
    tokenizer.chat_template = models.read_chat_template(recipe)
    assert tokenizer.pad_token is None
    size = len(tokenizer)
    assert models.ensure_pad_token(tokenizer) is False and len(tokenizer) == size
    assert tokenizer.pad_token == "<|reserved_special_token_0|>"
    eot, end_of_text = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert stop_token_ids(tokenizer) == [end_of_text, eot]
    assert tokenizer.pad_token_id not in (eot, end_of_text)


# ---------------------------------------------------------------------------------------------------------------
# Qwen


def test_qwen_pad_is_eos_is_endoftext_and_im_end_ends_turns(tmp_path: Path) -> None:
    recipe = recipe_for(tmp_path)
    tokenizer = families.load_tokenizer(families.family("qwen2.5"))
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == endoftext  # as the vocabulary ships it
    models.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id not in (endoftext, im_end)
    assert stop_token_ids(tokenizer) == [endoftext, im_end]
    _, tokens, runs = trained(tokenizer, recipe, WITH_SYSTEM)
    assert runs == [f"{ANSWER}<|im_end|>"]  # the turn ends with <|im_end|>; <|endoftext|> is never trained
    assert endoftext not in tokens.input_ids
    # The template's default system prompt ("You are a helpful assistant") is context when a row has none.
    example, _, runs = trained(tokenizer, recipe, CHAT)
    assert "You are a helpful assistant" in example.text and runs == [f"{ANSWER}<|im_end|>"]


# ---------------------------------------------------------------------------------------------------------------
# SentencePiece word-start mark (Mistral, Llama 2, Phi-3)


def test_mistral_answer_after_inst_has_no_stray_word_start_mark(tmp_path: Path) -> None:
    recipe = recipe_for(tmp_path, chat_template="mistral")
    tokenizer = prepared(families.family("mistral"), recipe)
    example, tokens, runs = trained(tokenizer, recipe, CHAT)
    assert "[/INST]" + ANSWER in example.text  # the template glues the answer to [/INST]
    # The quirk, real: tokenised on its own the answer starts with SentencePiece's word-start mark "▁" ...
    alone = tokenizer.convert_ids_to_tokens(tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    assert alone[0].startswith("▁")
    # ... which the text does not have there: the trained tokens are the whole text's, so the model learns to answer
    # "SELECT ...", not " SELECT ...".
    first = next(token for token, label in zip(tokens.input_ids, tokens.labels) if label != IGNORE_INDEX)
    assert not tokenizer.convert_ids_to_tokens(first).startswith("▁")
    assert tokens.exact and tokens.input_ids == tokenizer(example.text, add_special_tokens=False)["input_ids"]
    assert runs == [f"{ANSWER}</s>"]


def test_phi3_round_trip_with_a_word_start_mark_after_every_special_token(tmp_path: Path) -> None:
    """Phi-3's tokenizer puts "▁" at the start of every piece between special tokens; segments tokenised apart got
    one at each prompt/answer boundary, so no row re-tokenised as its text (check showed 0/N)."""
    recipe = recipe_for(tmp_path, system_message="merge")
    tokenizer = prepared(families.family("phi3"))
    items = [trained(tokenizer, recipe, CHAT)[1] for _ in range(3)]
    assert template_round_trip(items, tokenizer).detail.startswith("3/3 rows")
    assert trained(tokenizer, recipe, CHAT)[2] == [f"{ANSWER}<|end|>"]


# ---------------------------------------------------------------------------------------------------------------
# Phi-3


def test_phi3_end_token_ends_turns_and_pad_leaves_endoftext(tmp_path: Path) -> None:
    tokenizer = families.load_tokenizer(families.family("phi3"))
    endoftext, end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|end|>"])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == endoftext
    models.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<unk>"
    assert stop_token_ids(tokenizer) == [endoftext, end]


def test_phi35_template_ending_the_conversation_with_eos_is_handled(tmp_path: Path) -> None:
    """Phi-3.5's published template writes EOS after the last turn (not before a generation prompt): the
    conversation is not a prefix of the next one, and the trailing EOS is not an answer token."""
    template = (families.TEMPLATES / "phi3.5.jinja").read_text(encoding="utf-8")
    recipe = recipe_for(tmp_path, chat_template=template)
    tokenizer = prepared(families.family("phi3"), recipe)
    multi = [*WITH_SYSTEM, {"role": "user", "content": "And the names?"}, {"role": "assistant", "content": "SELECT 1;"}]
    example, tokens, runs = trained(tokenizer, recipe, multi)
    assert example.text.endswith("<|end|>\n<|endoftext|>")
    assert runs == [f"{ANSWER}<|end|>", "SELECT 1;<|end|>"] and tokens.exact


@pytest.fixture(scope="module")
def phi3_model() -> Path:
    return families.model_folder(families.family("phi3"))


def test_phi3_fused_qkv_and_gate_up_projections_are_adapted(tmp_path: Path, phi3_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = write_recipe(tmp_path, phi3_model, "phi3", data={"system_message": "merge"})
    recipe = load_recipe(path)
    adapted = models.attach_adapter(AutoModelForCausalLM.from_pretrained(phi3_model), recipe)
    wrapped = {name.rsplit(".", 1)[-1] for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    config = adapted.config
    head_dim = config.hidden_size // config.num_attention_heads
    qkv = next(module for name, module in adapted.named_modules() if name.endswith("qkv_proj"))
    # One LoRA pair spans the fused output: queries, keys and values together.
    expected = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    assert qkv.lora_B["default"].weight.shape[0] == expected
    # The unfused names a Llama recipe uses are refused in one line that names the fused ones.
    result = invoke("check", str(path), "--set", "adapter.target_modules=[q_proj,v_proj]")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "q_proj" in line and "qkv_proj" in line and "gate_up_proj" in line


# ---------------------------------------------------------------------------------------------------------------
# System messages: Gemma 2's template has no system role, Phi-3's drops it


@pytest.fixture(scope="module")
def gemma_model() -> Path:
    return families.model_folder(families.family("gemma4"))


def test_gemma_template_without_system_role_stops_in_one_line_naming_the_option(
    tmp_path: Path, gemma_model: Path
) -> None:
    """Gemma 2's published template raises on a system message (the Gemma 4 vocabulary stands in for Gemma 2's,
    which llama.cpp does not ship; the template alone decides)."""
    rows = [{"messages": WITH_SYSTEM}] * 8
    template = str(families.TEMPLATES / "gemma2.jinja")
    path = write_recipe(tmp_path, gemma_model, "gemma2", rows=rows, data={"chat_template": template})
    result = invoke("check", str(path))
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line
    assert "rejects system messages (System role not supported)" in line
    assert "set data.system_message: merge" in line


def test_merged_system_text_opens_the_first_user_turn_and_is_not_trained(tmp_path: Path) -> None:
    template = (families.TEMPLATES / "gemma2.jinja").read_text(encoding="utf-8")
    recipe = recipe_for(tmp_path, chat_template=template, system_message="merge")
    tokenizer = prepared(families.family("gemma4"), recipe)
    example, _, runs = trained(tokenizer, recipe, WITH_SYSTEM)
    assert f"<start_of_turn>user\n{SYSTEM}\n\n{QUESTION}<end_of_turn>" in example.text
    assert len(runs) == 1 and runs[0].startswith(ANSWER) and SYSTEM not in runs[0]
    # Generation starts from the same merged text.
    assert f"{SYSTEM}\n\n{QUESTION}" in generation_prompt(WITH_SYSTEM[:2], tokenizer, "merge")


def test_a_template_that_drops_system_messages_stops_instead_of_losing_them(tmp_path: Path) -> None:
    """Phi-3's GGUF template renders user and assistant turns only: a system message would vanish silently."""
    recipe = recipe_for(tmp_path)
    tokenizer = prepared(families.family("phi3"))
    with pytest.raises(TemplateError, match="drops system messages.*data.system_message: merge"):
        to_example(Row({"messages": WITH_SYSTEM}, "test:1"), recipe.data, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Qwen3 think tags


def test_qwen3_empty_think_block_is_prompt_and_multi_turn_is_located(tmp_path: Path) -> None:
    recipe = recipe_for(tmp_path)
    tokenizer = prepared(families.family("qwen3"))
    example, _, runs = trained(tokenizer, recipe, CHAT)
    # The template opens the last answer with an empty think block: context, not something to learn.
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" + ANSWER in example.text
    assert runs == [f"{ANSWER}<|im_end|>"]
    assert generation_prompt(CHAT[:1], tokenizer).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Earlier turns lose the block when a later question follows: the conversation is not prefix-stable, and both
    # answers are still found.
    multi = [*CHAT, {"role": "user", "content": "And the names?"}, {"role": "assistant", "content": "SELECT 1;"}]
    example, _, runs = trained(tokenizer, recipe, multi)
    assert f"<|im_start|>assistant\n{ANSWER}<|im_end|>" in example.text
    assert runs == [f"{ANSWER}<|im_end|>", "SELECT 1;<|im_end|>"]


def test_qwen3_reasoning_in_an_answer_stops_with_one_line(tmp_path: Path) -> None:
    """The template moves <think>...</think> out of the answer text; such rows cannot be located (yet)."""
    recipe = recipe_for(tmp_path)
    tokenizer = prepared(families.family("qwen3"))
    reasoning = [CHAT[0], {"role": "assistant", "content": f"<think>\ncount rows\n</think>\n\n{ANSWER}"}]
    with pytest.raises(TemplateError, match="renders assistant turn 1 differently"):
        to_example(Row({"messages": reasoning}, "test:1"), recipe.data, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Any family: a boundary inside a token


def test_a_prompt_ending_inside_a_word_is_split_there_and_reported() -> None:
    """A template that ends its prompt in the middle of a word ("...SEL" + "ECT") cannot give the whole text's
    tokens; the two sides are tokenised apart and the row no longer counts as a clean round trip."""
    tokenizer = families.load_tokenizer(families.family("llama3"))
    text = "Query: SELECT 1;"
    whole = encode(text, [], tokenizer)
    split = encode(text, [text.index("ECT")], tokenizer)
    assert whole.exact and whole.ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not split.exact and split.ids != whole.ids
    assert tokenizer.decode(split.ids) == text
    # A space before the answer is no such boundary: " SELECT" stays one token, trained with the answer.
    spaced = encode(text, [text.index(" SELECT")], tokenizer)
    assert spaced.exact and spaced.ids == whole.ids
