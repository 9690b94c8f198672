"""A recipe's training inputs, as every stage needs them: its data section read relative to the recipe's folder,
split with train.seed, scanned under sovereignty.data_scan, and tokenised with the recipe's tokenizer."""

from __future__ import annotations

from typing import Any

from sovtune.config import Recipe
from sovtune.data import PreparedData, prepare_data, rows_sharing_text
from sovtune.errors import DataError


def prepare_recipe_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    check_replay_is_not_evaluated(recipe)
    return prepare_data(
        recipe.data,
        tokenizer,
        base_dir=recipe.base_dir,
        seed=recipe.train.seed,
        scan_policy=recipe.sovereignty.data_scan,
    )


def check_replay_is_not_evaluated(recipe: Recipe) -> None:
    """Training text must not contain the forgetting check's passages: the figure would measure memorisation of
    them, not what the adapter kept of general text. Every text source of data.train (general-text replay above
    all) is compared with eval.general, paragraph by paragraph."""
    general = recipe.eval.general
    text_sources = [source for source in recipe.data.train if source.format_in(recipe.data) == "text"]
    if general is None or not recipe.eval.enabled or not text_sources:
        return
    view = recipe.data.model_copy(update={"format": general.format, "columns": general.columns})
    shared = rows_sharing_text(text_sources, recipe.data, general, view, recipe.base_dir)
    if shared:
        more = f" (and {len(shared) - 1} more rows)" if len(shared) > 1 else ""
        raise DataError(
            f"{shared[0]}: shares a passage with eval.general ({general.path}){more}; training on the text the "
            "forgetting check scores would hide forgetting: remove those rows or replay other general text"
        )
