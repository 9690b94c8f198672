"""The two consoles every command writes to: results on stdout, the one-line error on stderr, and what the libraries
below may print there.

On a terminal the consoles take its width. Anywhere else (a pipe, a log file, CI) there is no width to fit: tables
and lines are written whole instead of being cut to rich's default of 80 columns ("5.6…").
"""

from __future__ import annotations

import os
import sys
import warnings

from rich.console import Console, ConsoleDimensions

NOT_A_TERMINAL_WIDTH = 1000

# Library warnings a user of sovtune cannot act on (they concern the libraries' own calls), by message.
UNACTIONABLE_WARNINGS = (
    # peft reads model.is_gradient_checkpointing, which transformers 5 renamed: once per model load.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


class OutputConsole(Console):
    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(NOT_A_TERMINAL_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = OutputConsole(stderr=False)
err_console = OutputConsole(stderr=True)


def quiet_libraries() -> None:
    """Before a command loads the libraries: no warnings the user cannot act on, and, when stderr is not a terminal,
    no library progress bars (their carriage-return redraws flood a log; sovtune prints a progress line per logging
    interval instead). The switches are the libraries' own (environment variables read at import; the functions
    for a library already imported)."""
    for category, message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub, and transformers through it
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars as disable_dataset_bars

        disable_dataset_bars()
