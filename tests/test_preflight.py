"""`sovtune check`: a readable table and JSON for a good recipe; exit 2 and one line for what would ruin a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from helpers import CORPUS, build_tiny_model, build_tokenizer, invoke, qa_rows, write_recipe

# The tiny model (helpers.build_tiny_model): hidden 32, MLP 64, 2 layers, 4 query / 2 key-value heads of width 8,
# 400 tokens, untied.
HIDDEN, MLP, KV, VOCAB, LAYERS = 32, 64, 16, 400, 2
PER_LAYER = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * MLP + 2 * HIDDEN  # q,o + k,v + gate,up,down + norms
PARAMETERS = 2 * VOCAB * HIDDEN + LAYERS * PER_LAYER + HIDDEN


def lora_parameters(r: int) -> int:
    """LoRA A (r x in) + B (out x r) on every linear layer of the blocks."""
    shapes = [
        (HIDDEN, HIDDEN),
        (HIDDEN, KV),
        (HIDDEN, KV),
        (HIDDEN, HIDDEN),
        (HIDDEN, MLP),
        (HIDDEN, MLP),
        (MLP, HIDDEN),
    ]
    return LAYERS * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)


def one_line_error(result: Any) -> str:
    """The single `error: ...` line of a failed command (exit 2, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0][len("error: ") :]


@pytest.fixture(scope="module")
def good_recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return write_recipe(tmp_path_factory.mktemp("check"), tiny_model_dir, "good")


def test_check_prints_a_table_and_exits_0(good_recipe: Path) -> None:
    result = invoke("check", str(good_recipe))
    assert result.exit_code == 0, result.output
    for expected in (
        "good: train data",
        "good: eval data",
        "rows read",
        "token length p50/p90/p99/max",
        "supervised-token share",
        "pad != eos",
        "chat template round trip",
        "target modules",
    ):
        assert expected in result.stdout, expected
    assert "FAIL" not in result.stdout
    assert f"{PARAMETERS:,} parameters, adapter trains {lora_parameters(4):,}" in result.stdout
    assert not (good_recipe.parent / "runs").exists()  # check writes nothing


def test_check_json_is_parseable_and_complete(good_recipe: Path) -> None:
    result = invoke("check", str(good_recipe), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"] == "good" and report["ok"] is True
    train, evaluation = report["data"]["train"], report["data"]["eval"]
    assert (train["rows"], evaluation["rows"]) == (18, 6)  # qa_rows() = 24 rows, eval_fraction 0.25
    assert train["kept"] == 18 and train["dropped"] == {}
    assert 0 < train["supervised_tokens"] < train["total_tokens"]
    assert train["supervised_token_fraction"] == pytest.approx(train["supervised_tokens"] / train["total_tokens"])
    assert train["eos_supervised_fraction"] == 1.0 and train["truncation_rate"] == 0.0
    arch = report["architecture"]
    assert arch["architecture"] == "LlamaForCausalLM"
    assert arch["parameters"] == PARAMETERS
    assert arch["trainable_parameters"] == lora_parameters(4)
    assert arch["targeted_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    checks = {check["check"]: check for check in report["checks"]}
    for name in (
        "supervised tokens",
        "truncation",
        "EOS supervised",
        "pad != eos",
        "chat template round trip",
        "target modules",
    ):
        assert checks[name]["ok"] is True, checks[name]
    assert checks["pad != eos"]["detail"] == "pad='<pad>' (3), eos='</s>' (2), turns end with <|im_end|>"
    assert checks["EOS supervised"]["detail"] == "100.0% of rows train a stop token (</s>, <|im_end|>)"


def test_set_overrides_reach_the_check(good_recipe: Path) -> None:
    result = invoke(
        "check", str(good_recipe), "--json", "--set", "adapter.r=2", "--set", "adapter.target_modules=[q_proj]"
    )
    assert result.exit_code == 0, result.output
    arch = json.loads(result.stdout)["architecture"]
    assert arch["targeted_modules"] == ["q_proj"]
    assert arch["trainable_parameters"] == LAYERS * 2 * (HIDDEN + HIDDEN)


def test_tied_embeddings_are_counted_once() -> None:
    """The shipped base ties lm_head to the embeddings: the count must equal the tensors in its weight file."""
    from safetensors import safe_open

    from sovtune.config import load_recipe
    from sovtune.model import load_tokenizer
    from sovtune.preflight import architecture_summary

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "quickstart.yaml")
    with safe_open(str(Path(recipe.model_location) / "model.safetensors"), framework="pt") as weights:
        stored = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    arch = architecture_summary(recipe, load_tokenizer(recipe))
    assert arch["parameters"] == stored


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with attention and MLP biases and tied embeddings: every case of the count has something to
    add."""

    path = tmp_path_factory.mktemp("biased-llama")
    return build_tiny_model(path, build_tokenizer(path), attention_bias=True, mlp_bias=True, tie_word_embeddings=True)


@pytest.mark.parametrize("adapter", [
    {"r": 4},
    {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 2, "target_modules": ["self_attn.o_proj", "embed_tokens"]},
    {"r": 4, "type": "dora"},
    {"r": 4, "bias": "all"},
    {"r": 4, "bias": "lora_only", "target_modules": ["k_proj", "down_proj"]},
    {"r": 4, "modules_to_save": ["lm_head"]},
    {"r": 4, "modules_to_save": ["embed_tokens", "lm_head"], "type": "rslora"},
])  # fmt: skip
@pytest.mark.parametrize("biased", [False, True])
def test_adapter_size_without_peft_equals_peft(
    adapter: dict[str, Any], biased: bool, tmp_path: Path, tiny_model_dir: Path, biased_model_dir: Path
) -> None:
    """`sovtune check` counts the adapter from layer shapes (peft's import costs seconds): it must agree with peft."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sovtune import model as models
    from sovtune.config import load_recipe
    from sovtune.preflight import adapter_size

    model_dir = biased_model_dir if biased else tiny_model_dir
    recipe = load_recipe(write_recipe(tmp_path, model_dir, "count", qa_rows(), adapter=adapter))
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(base.config)
    meta.tie_weights()
    counted, targeted = adapter_size(meta, recipe)
    adapted = get_peft_model(base, models.lora_config(recipe))
    assert counted == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert targeted == sorted(
        {name.rsplit(".", 2)[-2] for name, _ in adapted.named_modules() if name.endswith("lora_A")}
    )


# ---------------------------------------------------------------------------------------------------------------
# What would silently ruin a run: exit 2, one line


def test_no_supervised_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The user turn alone fills max_length, so no assistant token survives truncation.
    rows = [
        {"messages": [{"role": "user", "content": " ".join(CORPUS[:4])}, {"role": "assistant", "content": "A."}]}
    ] * 4
    recipe = write_recipe(tmp_path, tiny_model_dir, "unsupervised", rows=rows, data={"max_length": 16})
    assert one_line_error(invoke("check", str(recipe))) == (
        f"{tmp_path / 'unsupervised-train.jsonl'}: no usable training rows "
        "(3 no supervised tokens left after truncation to max_length); check data.format, data.columns, max_length"
    )


def test_every_row_truncated(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": "Q?", "completion": " ".join(CORPUS[:4])}] * 4
    recipe = write_recipe(
        tmp_path, tiny_model_dir, "truncated", rows=rows, data={"format": "prompt_completion", "max_length": 12}
    )
    assert one_line_error(invoke("check", str(recipe))) == (
        f"{tmp_path / 'truncated-train.jsonl'}: every row is longer than data.max_length=12 and was truncated; "
        "raise data.max_length"
    )


def test_target_modules_missing(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(
        tmp_path, tiny_model_dir, "targets", adapter={"target_modules": ["q_proj", "query_key_value"]}
    )
    assert one_line_error(invoke("check", str(recipe))) == (
        "check failed: target modules: ['query_key_value'] not in LlamaForCausalLM; linear layers: "
        "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    )


def test_missing_data_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "missing", data={"train": "./data/nope.jsonl"})
    assert one_line_error(invoke("check", str(recipe))) == (
        f"./data/nope.jsonl: data file not found (looked at {tmp_path / 'data' / 'nope.jsonl'}); "
        "check data.train / data.eval paths"
    )


def test_corrupt_data_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "rows.parquet").write_bytes(b"PAR1 this is not a parquet file")
    recipe = write_recipe(tmp_path, tiny_model_dir, "corrupt", data={"train": "rows.parquet"})
    message = one_line_error(invoke("check", str(recipe)))
    assert message.startswith(f"{tmp_path / 'rows.parquet'}: cannot read parquet (")


def test_malformed_rows(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, "malformed", rows=[*qa_rows(4), {"text": "wrong format"}])
    assert one_line_error(invoke("check", str(recipe))) == (
        f"{tmp_path / 'malformed-train.jsonl'}:5: missing column 'messages' (row has ['text']); "
        "map it with data.columns; fix the rows or set data.on_bad_rows: skip"
    )


def test_unloadable_model(tmp_path: Path) -> None:
    (tmp_path / "not-a-model").mkdir()
    recipe = write_recipe(tmp_path, tmp_path / "not-a-model", "nomodel")
    message = one_line_error(invoke("check", str(recipe)))
    assert message.startswith(f"model.name_or_path: cannot load the tokenizer of '{tmp_path / 'not-a-model'}'")
