"""A run directory as `sovtune train` leaves it, built in seconds: base + adapter with random (non-zero) LoRA B
weights saved the way training saves them, plus the manifest's start and train sections. No optimisation steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sovtune.config import Recipe


def make_run(recipe_path: Path, seed: int = 0, scale: float = 0.3) -> Recipe:
    import torch

    from sovtune import model as models
    from sovtune.config import load_recipe
    from sovtune.core.files import atomic_write_json as write_json_atomic
    from sovtune.inputs import prepare_recipe_data as prepare_data
    from sovtune.licence import check_licence
    from sovtune.run import manifest
    from sovtune.training import save_adapter

    torch.set_num_threads(1)
    recipe = load_recipe(recipe_path)
    tokenizer = models.load_tokenizer(recipe)
    data = prepare_data(recipe, tokenizer)
    base = models.load_base_model(recipe, tokenizer)
    adapted = models.attach_adapter(base, recipe)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:  # freshly initialised B is zero: the adapter would change nothing
            parameter.data = torch.randn(parameter.shape, generator=generator) * scale
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "data_stats.json", data.stats)
    write_json_atomic(run_dir / "heldout.json", {"origins": [example.origin for example in data.eval_examples]})
    licence = check_licence(recipe).summary()
    manifest.start(recipe, run_dir, tokenizer, data_stats=data.stats, licence=licence)
    save_adapter(adapted, tokenizer, run_dir)
    metrics: dict[str, Any] = {"train_loss": 1.25, "global_step": 0}
    write_json_atomic(run_dir / "train_metrics.json", metrics)
    manifest.record_train(run_dir, recipe, metrics)
    return recipe
