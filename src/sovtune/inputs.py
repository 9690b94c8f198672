"""A recipe's training inputs, as every stage needs them: its data section read relative to the recipe's folder,
split with train.seed, scanned under sovereignty.data_scan, and tokenised with the recipe's tokenizer."""

from __future__ import annotations

from typing import Any

from sovtune.config import Recipe
from sovtune.data import PreparedData, prepare_data


def prepare_recipe_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    return prepare_data(
        recipe.data,
        tokenizer,
        base_dir=recipe.base_dir,
        seed=recipe.train.seed,
        scan_policy=recipe.sovereignty.data_scan,
    )
