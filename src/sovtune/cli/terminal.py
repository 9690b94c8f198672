"""The two consoles every command writes to: results on stdout, the one-line error on stderr."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=False)
err_console = Console(stderr=True)
