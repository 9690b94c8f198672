"""Licence gate: the base model's licence (card YAML `license:`, else config) against `sovereignty.allowed_licenses`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovtune.config import Recipe
from sovtune.errors import SovtuneError


class LicenceRefused(SovtuneError):
    """The base model's licence is not on the recipe's allow-list, or cannot be determined."""


@dataclass
class LicenceCheck:
    licences: list[str]  # what the model declares (several = dual licensing; any allowed one suffices)
    source: str  # "model card", "config.json", "recipe (model.license)" or "unknown"
    allowed: list[str]
    passed: bool

    def summary(self) -> dict[str, Any]:
        return {"licences": self.licences, "source": self.source, "allowed": self.allowed, "passed": self.passed}

    def describe(self) -> str:
        found = ", ".join(self.licences) or "unknown"
        if not self.allowed:
            return f"licence: {found} (from {self.source}); no allow-list in the recipe"
        return f"licence: {found} (from {self.source}) is allowed"


def _normalise(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [str(item).strip().lower() for item in values if item is not None and str(item).strip()]


def licences_in_card(card_data: dict[str, Any]) -> list[str]:
    """`license: other` names the real licence in `license_name` (e.g. Llama, Qwen cards)."""
    licences = _normalise(card_data.get("license"))
    if "other" in licences and card_data.get("license_name"):
        licences = [name for name in licences if name != "other"] + _normalise(card_data.get("license_name"))
    return licences


def _model_file(recipe: Recipe, filename: str) -> Path | None:
    """A file of the base model without downloading weights: the local folder, or one small file from the hub."""
    if recipe.model_is_local:
        path = Path(recipe.model_location) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(recipe.model.name_or_path, filename, revision=recipe.model.revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None  # no such file, or offline and not cached: the model declares nothing we can see
    except (HfHubHTTPError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LicenceRefused(
            f"{recipe.model.name_or_path}: cannot read {filename} from the hub to find its licence ({first}); "
            "check model.name_or_path and model.revision, or state the licence with model.license"
        ) from None


def declared_licences(recipe: Recipe) -> tuple[list[str], str]:
    """The licence the model itself declares: card YAML first, then config.json; ([], "unknown") if neither."""
    from huggingface_hub import ModelCard

    card_path = _model_file(recipe, "README.md")
    if card_path is not None:
        try:
            card = ModelCard.load(card_path)
        except (ValueError, OSError):
            card = None  # a card without valid YAML declares nothing; config.json may still
        if card is not None:
            found = licences_in_card(card.data.to_dict())
            if found:
                return found, "model card"
    config_path = _model_file(recipe, "config.json")
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        found = licences_in_card(config) if isinstance(config, dict) else []
        if found:
            return found, "config.json"
    return [], "unknown"


def check_licence(recipe: Recipe) -> LicenceCheck:
    """Compare the declared licence with the allow-list; `LicenceRefused` says what was found and how to proceed."""
    allowed = recipe.sovereignty.allowed_licenses
    try:
        declared, source = declared_licences(recipe)
    except LicenceRefused:
        if allowed:
            raise
        declared, source = [], "unknown (lookup failed)"  # without an allow-list the licence is only recorded
    stated = _normalise(recipe.model.license)
    if declared and stated and not set(stated) & set(declared):
        raise LicenceRefused(
            f"model.license is {recipe.model.license!r} but the base model's {source} declares {', '.join(declared)}; "
            "remove model.license (the model's own declaration counts) or check you have the right model"
        )
    licences, source = (
        (declared, source) if declared else (stated, "recipe (model.license)") if stated else ([], "unknown")
    )
    if not allowed:
        return LicenceCheck(licences, source, allowed, passed=True)
    where = recipe.model.name_or_path
    if not licences:
        raise LicenceRefused(
            f"{where}: the licence cannot be determined (no `license:` in its card or config) and "
            f"sovereignty.allowed_licenses is set; state it with model.license after checking the model's terms"
        )
    if not set(licences) & set(allowed):
        raise LicenceRefused(
            f"{where}: licence {', '.join(licences)} (from {source}) is not in sovereignty.allowed_licenses "
            f"{allowed}; choose another base model or, after legal review, add the licence to the list"
        )
    return LicenceCheck(licences, source, allowed, passed=True)
