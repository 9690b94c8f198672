"""Recipes: the schema (pydantic, extra="forbid"), the loader (extends, --set, ${ENV}) and shared value checks."""

from sovtune.config.loader import OPT_IN_FLAGS, RunOptIns, load_recipe, load_run_recipe, validate_recipe
from sovtune.config.schema import (
    DEFAULT_MAX_ROW_BYTES,
    FORMAT_COLUMNS,
    GENERAL_DATASET,
    GENERATION_METRICS,
    LOSS_METRICS,
    LOWER_IS_BETTER,
    PATH_FIELD,
    SCHEMA_VERSION,
    AdapterSection,
    BootstrapSection,
    DataSection,
    DataSource,
    EvalDataset,
    EvalSection,
    Format,
    Gate,
    GeneralText,
    GenerationSection,
    HubSection,
    MetricName,
    ModelSection,
    OutputSection,
    QuantizationSection,
    Recipe,
    Section,
    SovereigntySection,
    TrainSection,
    TrainSource,
    UserMetric,
)
from sovtune.config.validators import (
    REPO_ID_HELP,
    check_endpoint,
    check_path_text,
    check_repo_id,
    endpoint_host,
    looks_like_local_path,
)

__all__ = [
    "DEFAULT_MAX_ROW_BYTES",
    "FORMAT_COLUMNS", "GENERAL_DATASET", "GENERATION_METRICS", "LOSS_METRICS", "LOWER_IS_BETTER", "OPT_IN_FLAGS",
    "PATH_FIELD", "REPO_ID_HELP", "SCHEMA_VERSION", "AdapterSection", "BootstrapSection", "DataSection", "DataSource",
    "EvalDataset", "EvalSection", "Format", "Gate", "GeneralText", "GenerationSection", "HubSection", "MetricName",
    "ModelSection", "OutputSection", "QuantizationSection", "Recipe", "RunOptIns", "Section", "SovereigntySection",
    "TrainSection", "TrainSource", "UserMetric", "check_endpoint", "check_path_text", "check_repo_id", "endpoint_host",
    "load_recipe", "load_run_recipe", "looks_like_local_path", "validate_recipe",
]  # fmt: skip
