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
    from sovtune.safety import redact_secrets

    try:
        return func()
    except SovtuneError as exc:
        _close_progress_bars()
        # markup=False: a message may quote user text with [brackets]; secrets never reach the terminal.
        err_console.print("[bold red]error:[/] ", end="", highlight=False)
        err_console.print(redact_secrets(str(exc)), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/] without saving; if the run had saved a checkpoint, continue it with --resume")
        raise typer.Exit(130) from None


def _close_progress_bars() -> None:
    """A failure during training leaves the trainer's tqdm bar open: end it so the error starts on its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="With --resume: continue although the recipe or the data changed since the run started.")
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Refuse every network connection but loopback and sovereignty.allowed_endpoints (as sovereignty.offline: true).",
    ),
]


def _load(recipe: Path, overrides: list[str] | None, offline: bool = False) -> Any:
    from sovtune.recipe import load_recipe

    return _go_offline(load_recipe(recipe, overrides or []), offline)


def _go_offline(loaded: Any, flag: bool) -> Any:
    """Install the network guard (flag or recipe) before the command imports anything that could connect."""
    if flag or loaded.sovereignty.offline:
        from sovtune.offline import enable_for

        enable_for(loaded)
    return loaded


@app.command()
def check(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    offline: OfflineOpt = False,
) -> None:
    """Validate the recipe and the data without training or downloading weights."""

    def body() -> None:
        from sovtune.audit import audited

        with audited("check") as event:
            loaded = event["recipe"] = _load(recipe, overrides, offline)
            from sovtune import preflight

            report = preflight.check(loaded)
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
    resume: ResumeOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    force: ForceOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Train the adapter into the run directory."""

    def body() -> None:
        from sovtune.audit import audited

        with audited("train") as event:
            loaded = event["recipe"] = _load(recipe, overrides, offline)
            event["destination"] = str(loaded.run_dir)
            from sovtune.safety import resume_command
            from sovtune.training import is_main_process
            from sovtune.training import train as run_training

            result = run_training(
                loaded, resume=resume, overwrite=overwrite, console=console, force=force,
                resume_command=resume_command(loaded, "train", overrides or []),
            )
        if is_main_process():
            console.print(f"adapter written to [bold]{result.adapter_dir}[/]")

    guarded(body)


@app.command()
def run(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    resume: ResumeOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    force: ForceOpt = False,
    offline: OfflineOpt = False,
) -> None:
    """Train, evaluate against the base model and (if the recipe says so) publish."""

    def body() -> None:
        loaded = _load(recipe, overrides, offline)  # each stage records its own audit event
        from sovtune.pipeline import run as run_pipeline
        from sovtune.safety import resume_command

        result = run_pipeline(
            loaded, resume=resume, overwrite=overwrite, console=console, force=force,
            resume_command=resume_command(loaded, "run", overrides or []),
        )
        console.print(f"run finished: [bold]{result.run_dir}[/]")

    guarded(body)


@app.command()
def doctor(
    run_root: Annotated[Path, typer.Option("--runs", help="Where run directories go (for the free-disk check).")] = Path("runs"),
) -> None:
    """One table of what matters for training here: Python, torch/CUDA, GPUs, bf16, bitsandbytes, disk, hub."""
    from sovtune import doctor as checks

    rows = checks.diagnose(run_root)
    checks.render(rows, console)
    if not checks.healthy(rows):
        raise typer.Exit(1)


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Recipe file to write, e.g. recipes/mine.yaml.", show_default=False)],
    model: Annotated[str, typer.Option("--model", help="Base model: hub id or local folder.")] = "data/base-model",
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub commit sha to pin (hub ids).")] = None,
    data_path: Annotated[str, typer.Option("--data", help="Training data file or folder.")] = "data/sql/train.jsonl",
    data_format: Annotated[str, typer.Option("--format", help="messages | instruction | prompt_completion | text.")] = "messages",
    gpu: Annotated[str, typer.Option("--gpu", help="cpu | rtx4090-24gb | l4-24gb | a100-40gb | a100-80gb | h100-80gb.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented starter recipe (validated before it is written)."""

    def body() -> None:
        import os

        from sovtune.starter import starter_recipe, write_starter

        def relative(value: str) -> str:  # recipe paths are relative to the recipe's folder
            if not Path(value).exists():
                return value
            rel = os.path.relpath(Path(value).resolve(), path.resolve().parent)
            return rel if rel.startswith(".") else f"./{rel}"

        text = starter_recipe(path, relative(model), relative(data_path), data_format, gpu, revision)
        write_starter(path, text, overwrite)
        console.print(f"wrote [bold]{path}[/]; next: sovtune check {path}")

    guarded(body)


RunDirArg = Annotated[Path, typer.Argument(help="Run directory (runs/<name>).", show_default=False)]


@app.command()
def generate(
    run_dir: RunDirArg,
    prompt: Annotated[str, typer.Option("--prompt", help="The user message (or raw prompt for text formats).")],
    base: Annotated[bool, typer.Option("--base", help="Also show the base model's answer.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
) -> None:
    """Generate one answer with the trained adapter (greedy)."""

    def body() -> None:
        from sovtune.generate import complete, load_run, render_prompt

        loaded = load_run(run_dir)
        text = render_prompt(loaded, [{"role": "user", "content": prompt}])
        console.print(f"[bold]adapter:[/] {complete(loaded, text, max_new_tokens)}", highlight=False)
        if base:
            console.print(f"[bold]base:[/]    {complete(loaded, text, max_new_tokens, use_adapter=False)}", highlight=False)

    guarded(body)


@app.command()
def chat(
    run_dir: RunDirArg,
    base: Annotated[bool, typer.Option("--base", help="Show the base model's answer beside the adapter's.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 256,
) -> None:
    """Interactive chat with the adapter, using the chat template it was trained with. Empty line or Ctrl-D ends."""

    def body() -> None:
        from sovtune.generate import complete, load_run, render_prompt

        loaded = load_run(run_dir)
        history: list[dict[str, str]] = []
        console.print("chat with the adapter; an empty line or Ctrl-D ends")
        for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: console.input("[bold]you:[/] "), ""):
            line = line.strip()
            if not line:
                break
            history.append({"role": "user", "content": line})
            text = render_prompt(loaded, history)
            answer = complete(loaded, text, max_new_tokens)
            console.print(f"[bold]adapter:[/] {answer}", highlight=False)
            if base:
                console.print(f"[bold]base:[/]    {complete(loaded, text, max_new_tokens, use_adapter=False)}", highlight=False)
            history.append({"role": "assistant", "content": answer})

    guarded(body)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory; the report is written here.", show_default=False)],
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="Adapter folder (default RUN_DIR/adapter).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model hub id or folder (default: the recipe's).")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe (default RUN_DIR/recipe.yaml).")] = None,
    overrides: SetOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """Evaluate base vs adapter on the held-out data: report.json/md/png in RUN_DIR; exit 3 if a gate fails."""

    def body() -> None:
        from sovtune.audit import audited

        with audited("eval", destination=str(run_dir)) as event:
            from sovtune.evaluation import evaluate, recipe_for_run

            loaded = event["recipe"] = _go_offline(recipe_for_run(run_dir, recipe, base, overrides or []), offline)
            evaluate(loaded, run_dir=run_dir, adapter_dir=adapter, console=console)
        console.print(f"report written to [bold]{run_dir / 'report.md'}[/]")

    guarded(body)


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more evaluated run directories.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for compare.json/.md/.png.")] = Path("runs/compare"),
) -> None:
    """Put several runs side by side against their common base model (table and chart)."""

    def body() -> None:
        from sovtune.report import compare as compare_runs

        compare_runs(run_dirs, out, console=console)
        console.print(f"comparison written to [bold]{out / 'compare.md'}[/]")

    guarded(body)


EndpointOpt = Annotated[
    Optional[str],
    typer.Option("--endpoint", help="Hub URL, e.g. https://hub.internal.example; default: the recipe's hub.endpoint, then $HF_ENDPOINT."),
]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Branch (push; created when missing) or revision (pull).")]


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with adapter/ and manifest.json.", show_default=False)],
    repo: Annotated[Optional[str], typer.Option("--repo", help="Repository ORG/NAME; default: the recipe's hub.repo.")] = None,
    endpoint: EndpointOpt = None,
    revision: RevisionOpt = None,
    public: Annotated[bool, typer.Option("--public", help="Create the repository public (default: private).")] = False,
) -> None:
    """Publish the adapter, tokenizer, chat template, report, manifest and model card in one commit (token: $HF_TOKEN or `hf auth login`)."""

    def body() -> None:
        from sovtune.audit import audited
        from sovtune.hub import push_run

        with audited("push", _run_recipe(run_dir), destination=repo) as event:
            result = push_run(run_dir, repo_id=repo, endpoint=endpoint, revision=revision, public=public, log=_plain)
            event["destination"] = f"{result.endpoint}/{result.repo_id}@{result.commit}"
            event["details"].update(private=result.private, files=len(result.files))
        console.print(f"[bold]{result.endpoint}/{result.repo_id}[/] @ {result.commit}", highlight=False)

    guarded(body)


@app.command()
def pull(
    repo: Annotated[str, typer.Argument(help="Repository ORG/NAME.", show_default=False)],
    revision: RevisionOpt = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub URL; default: $HF_ENDPOINT.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="New folder for the download; default: ./NAME.")] = None,
) -> None:
    """Download a published adapter and check every file against its manifest (mismatch: exit 2, nothing written)."""

    def body() -> None:
        from sovtune.audit import audited
        from sovtune.hub import pull as pull_adapter

        with audited("pull", destination=str(out) if out else None, details={"source": repo}) as event:
            result = pull_adapter(repo, endpoint=endpoint, revision=revision, out=out, log=_plain)
            event["destination"] = str(result.out_dir)
            event["details"]["source"] = f"{result.endpoint}/{result.repo_id}@{result.commit}"
        console.print(f"adapter verified in [bold]{result.out_dir}[/]", highlight=False)

    guarded(body)


def _plain(line: str) -> None:
    """Progress lines from hub.py: printed as they are (no rich markup in URLs or repo names)."""
    console.print(line, markup=False, highlight=False)


@app.command()
def verify(
    target: Annotated[Path, typer.Argument(help="Run directory or bundle (.tar) from `sovtune export`.", show_default=False)],
    strict: Annotated[
        bool, typer.Option("--strict", help="Also fail when files outside the run (data, local base model) are absent.")
    ] = False,
) -> None:
    """Recompute every SHA-256 the manifest records; exit 2 listing any file that changed or is missing."""

    def body() -> None:
        from sovtune.audit import audited
        from sovtune.provenance import verify as verify_hashes

        with audited("verify", _run_recipe(target), destination=str(target)):
            result = verify_hashes(target, strict=strict)
        console.print(result.describe(), highlight=False)

    guarded(body)


@app.command()
def export(
    run_dir: RunDirArg,
    bundle: Annotated[Path, typer.Argument(help="Bundle file to write, e.g. adapter.tar (.tar.gz compresses).", show_default=False)],
) -> None:
    """Pack adapter, manifest, card, report and a SHA256SUMS file into one tar for air-gapped transfer."""

    def body() -> None:
        from sovtune.audit import audited
        from sovtune.bundle import export as export_bundle
        from sovtune.provenance import sha256_file

        with audited("export", _run_recipe(run_dir), destination=str(bundle)) as event:
            written = export_bundle(run_dir, bundle)
            event["details"]["bundle_sha256"] = sha256_file(written)
        console.print(f"bundle written to [bold]{written}[/]; check it anywhere with: sovtune verify {written}", highlight=False)

    guarded(body)


@app.command()
def merge(
    run_dir: RunDirArg,
    out: Annotated[Path, typer.Argument(help="New folder for the merged model.", show_default=False)],
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (bf16 on CUDA with support, else fp32 on the CPU) | float32 | bfloat16 | float16.")
    ] = "auto",
    examples: Annotated[int, typer.Option("--examples", min=1, help="Held-out examples for the logits check.")] = 4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT folder.")] = False,
) -> None:
    """Merge the adapter into its base (a QLoRA base is reloaded unquantised); written only if the logits match."""

    def body() -> None:
        from sovtune.audit import audited
        from sovtune.merge import merge as merge_adapter

        with audited("merge", _run_recipe(run_dir), destination=str(out)) as event:
            result = merge_adapter(run_dir, out, dtype=dtype, examples=examples, overwrite=overwrite)
            event["details"]["check"] = result.report["check"]
        console.print(result.check.describe(), highlight=False)
        console.print(f"merged model written to [bold]{result.out_dir}[/]", highlight=False)

    guarded(body)


def _run_recipe(run_dir: Path) -> Any:
    """The recipe a run saved, for the audit record (its hash, data hashes and audit-log setting); None if unreadable."""
    from sovtune.recipe import load_recipe

    path = run_dir / "recipe.yaml"
    try:
        return load_recipe(path) if path.is_file() else None
    except SovtuneError:
        return None


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    gpu: Annotated[
        Optional[list[str]],
        typer.Option("--gpu", help="GPU to check (repeatable): h100-80gb, a100-40gb, a100-80gb, l4-24gb, rtx4090-24gb, ... or 32gb."),
    ] = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs per job (FSDP/ZeRO-3 shard the weights over them).")] = 1,
    strategy: Annotated[str, typer.Option("--strategy", help="ddp | fsdp | deepspeed (ZeRO-3), as for sovtune launch.")] = "ddp",
    arch: Annotated[Optional[str], typer.Option("--arch", help="Use the built-in config of this hub id instead of reading one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
) -> None:
    """Estimate per-GPU memory from the model config alone, say whether it fits, and what to change if not."""

    def body() -> None:
        from sovtune import plan as planner

        result = planner.plan(_load(recipe, overrides), gpu or (), gpus, planner.strategy_name(strategy), arch)
        if as_json:
            sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        else:
            planner.render(result, console)

    guarded(body)


@app.command()
def launch(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Processes (GPUs) on this node.")] = 1,
    strategy: Annotated[
        str, typer.Option("--strategy", help="ddp | fsdp (FSDP2; fsdp-qlora for 4-bit) | deepspeed (ZeRO-3) | deepspeed-zero2.")
    ] = "ddp",
    config_file: Annotated[
        Optional[Path], typer.Option("--config-file", help="Your own accelerate config instead of configs/accelerate/.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the accelerate command without running it.")] = False,
) -> None:
    """Train on several GPUs: print and run `accelerate launch --config_file ... -m sovtune train RECIPE`."""

    def body() -> None:
        from sovtune.launch import launch as run_launch

        loaded = _load(recipe, overrides)  # bad recipes fail here, before any process starts
        run_launch(recipe, loaded, gpus, strategy, overrides or [], config_file, resume, overwrite, dry_run, console)

    guarded(body)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
