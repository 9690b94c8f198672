"""`sovtune merge`: merged logits match the adapter's; QLoRA merges into the unquantised base; failures write
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import invoke, make_run
from sovtune import merge as merging

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _expected_weight(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """W + (alpha/r) * B @ A from the files on disk: what an exact merge of layer 0's q_proj must produce."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    lora_a, lora_b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    weight = load_file(base_dir / "model.safetensors")[Q_PROJ]
    return weight + (config["lora_alpha"] / config["r"]) * lora_b @ lora_a


def test_lora_merge_matches_adapter(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = make_run(make_recipe("lora"))
    out = tmp_path / "merged"
    result = merging.merge(recipe.run_dir, out)
    check = result.check
    assert check.passed and check.dtype == "float32" and check.source == "held-out examples"
    assert check.max_abs_diff < check.tolerance < check.adapter_effect  # the check could see a broken merge
    merged = load_file(out / "model.safetensors")
    assert not any("lora" in key for key in merged)
    torch.testing.assert_close(
        merged[Q_PROJ], _expected_weight(tiny_model_dir, recipe.run_dir / "adapter"), rtol=0, atol=1e-6
    )
    report = json.loads((out / merging.MERGE_REPORT).read_text())
    assert report["check"]["passed"] and report["adapter_files"]["adapter_model.safetensors"]
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    # The merged folder is a plain model: it loads without peft and gives the adapter's logits.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.to_dict().get("quantization_config") is None


def test_qlora_merges_into_unquantised_base(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes.functional as bnb

    recipe = make_run(make_recipe("qlora", quantization={"mode": "4bit"}))
    out = tmp_path / "merged-qlora"
    result = merging.merge(recipe.run_dir, out)
    assert result.check.passed and result.report["training_quantization"] == "4bit"
    assert "unquantised" in result.report["merged_into"]
    merged = load_file(out / "model.safetensors")[Q_PROJ]
    exact = _expected_weight(tiny_model_dir, recipe.run_dir / "adapter")
    torch.testing.assert_close(merged, exact, rtol=0, atol=1e-6)
    # Had the delta gone into the 4-bit weights, the result would carry the NF4 rounding error, which is far larger.
    original = load_file(tiny_model_dir / "model.safetensors")[Q_PROJ]
    packed, state = bnb.quantize_4bit(original, quant_type="nf4")
    rounding = (bnb.dequantize_4bit(packed, state) - original).abs().max()
    assert rounding > 1e-3 and (merged - exact).abs().max() < rounding / 100


def test_broken_merge_is_refused_and_nothing_written(make_recipe, tmp_path: Path, monkeypatch) -> None:
    """A merge that drops the adapter (the 'base model silently runs' failure) must not pass the check."""
    from peft.tuners.tuners_utils import BaseTuner

    recipe = make_run(make_recipe("broken"))
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, **kwargs: self.unload())
    out = tmp_path / "merged-broken"
    with pytest.raises(merging.MergeError, match="does not reproduce the adapter.*nothing was written"):
        merging.merge(recipe.run_dir, out)
    assert not out.exists() and not list(tmp_path.glob(".merged-broken*"))


def test_refuses_existing_out_and_missing_adapter(make_recipe, tmp_path: Path) -> None:
    recipe = make_run(make_recipe("exists"))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(merging.MergeError, match="not empty.*--overwrite"):
        merging.merge(recipe.run_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(merging.MergeError, match="no trained adapter"):
        (tmp_path / "empty-run").mkdir()
        (tmp_path / "empty-run" / "recipe.yaml").write_text((recipe.run_dir / "recipe.yaml").read_text())
        merging.merge(tmp_path / "empty-run", tmp_path / "out2")


def test_merge_cli(make_recipe, tmp_path: Path) -> None:
    recipe = make_run(make_recipe("cli"))
    out = tmp_path / "merged-cli"
    result = invoke("merge", str(recipe.run_dir), str(out))
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and (out / "model.safetensors").is_file()
    again = invoke("merge", str(recipe.run_dir), str(out))
    assert again.exit_code == 2 and "--overwrite" in again.output
    from sovtune.audit import log_path

    events = [json.loads(line) for line in log_path().read_text().splitlines() if f'"{out}"' in line]
    assert [(e["event"], e["outcome"]) for e in events][-2:] == [("merge", "ok"), ("merge", "failed")]
    assert events[-2]["details"]["check"]["passed"] is True
