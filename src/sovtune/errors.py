"""User-facing failures: one clear line and a fixed exit code. A bug keeps its traceback."""

from __future__ import annotations


class SovtuneError(Exception):
    """Bad input (recipe, data, flags, hub reply): the CLI prints one line and exits with 2."""

    exit_code = 2


class RecipeError(SovtuneError):
    """The recipe cannot be loaded or validated."""


class DataError(SovtuneError):
    """A dataset cannot be read or would silently ruin a run."""


class GateFailed(SovtuneError):
    """An evaluation gate failed: the adapter should not ship. Exit code 3 so pipelines can tell it apart."""

    exit_code = 3
