"""The `sovtune` command line (Typer). Each command: load the recipe, make one API call, print the result.

Heavy imports (torch, transformers, trl) live inside the commands so `sovtune --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from sovtune import __version__
from sovtune.errors import SovtuneError

app = typer.Typer(
    name="sovtune",
    help="Sovereign fine-tuning: LoRA/QLoRA adapters on your data and hardware, with evidence of the gain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/).", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe field, e.g. --set train.learning_rate=1e-4 (repeatable)."),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"sovtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Recipe in, adapter and evidence out."""


def guarded(func: Callable[..., Any]) -> Any:
    """Run a command body; a SovtuneError becomes one red line and its exit code, never a traceback."""
    try:
        return func()
    except SovtuneError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _load(recipe: Path, overrides: list[str] | None) -> Any:
    from sovtune.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


@app.command()
def check(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate the recipe and the data without training or downloading weights."""

    def body() -> None:
        from sovtune import preflight

        report = preflight.check(_load(recipe, overrides))
        if as_json:
            sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
        else:
            preflight.render(report, console)
        preflight.raise_on_failures(report)

    guarded(body)


@app.command()
def train(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
) -> None:
    """Train the adapter into the run directory."""

    def body() -> None:
        from sovtune.train import train as run_training

        result = run_training(_load(recipe, overrides), resume=resume, overwrite=overwrite, console=console)
        console.print(f"adapter written to [bold]{result.adapter_dir}[/]")

    guarded(body)


@app.command()
def run(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
) -> None:
    """Train, evaluate against the base model and (if the recipe says so) publish."""

    def body() -> None:
        from sovtune.pipeline import run as run_pipeline

        result = run_pipeline(_load(recipe, overrides), resume=resume, overwrite=overwrite, console=console)
        console.print(f"run finished: [bold]{result.run_dir}[/]")

    guarded(body)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
