"""The `sovtune` command line (Typer): arguments, options and help for every command.

Each command hands its arguments to its body in cli/commands.py, imported only when a command runs: `sovtune --help`
loads Typer and this file, never the stages below (pydantic, numpy, torch, ...). The stages log through `logging`;
cli/render.py draws their lines and results.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Callable, Optional

import typer

from sovtune import __version__
from sovtune.cli.terminal import console, err_console, quiet_libraries
from sovtune.core.secrets import redact_secrets
from sovtune.errors import SovtuneError

# Bounds of numeric flags, as the recipe's (config/schema.py, not imported here so --help stays fast): a flag past
# them is a typo, not a plan.
MAX_NEW_TOKENS = 131_072  # eval.generation.max_new_tokens
MAX_GPUS = 1024  # processes of one job

app = typer.Typer(
    name="sovtune",
    help="Sovereign fine-tuning: LoRA/QLoRA adapters on your data and hardware, with evidence of the gain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
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


def bodies() -> ModuleType:
    """The command bodies (cli/commands.py), imported when the first command runs, never for --help."""
    quiet_libraries()  # before the bodies import the libraries
    from sovtune.cli import commands

    commands.log_to_console()
    return commands


def guarded(func: Callable[[], Any], paths: tuple[Path | str | None, ...] = ()) -> Any:
    """Run a command body; a SovtuneError becomes one red line and its exit code, never a traceback. `paths` are the
    command's path arguments, checked first: one no file system takes (a 300-byte name) is such an error too."""
    try:
        if any(path is not None for path in paths):
            bodies().usable_paths(paths)
        return func()
    except SovtuneError as exc:
        _close_progress_bars()
        # markup=False: a message may quote user text with [brackets]; secrets never reach the terminal.
        err_console.print("[bold red]error:[/] ", end="", highlight=False)
        err_console.print(redact_secrets(str(exc)), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print(
            "[bold red]interrupted[/] without saving; if the run had saved a checkpoint, continue it with --resume"
        )
        raise typer.Exit(130) from None


def _close_progress_bars() -> None:
    """A failure during training leaves the trainer's tqdm bar open: end it so the error starts on its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="With --resume: continue although the recipe or the data changed since the run started."
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Refuse every network connection but loopback and sovereignty.allowed_hosts "
        "(as sovereignty.offline: true).",
    ),
]
AllowHostOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--allow-host",
        help="In offline mode (--offline, the run's recipe, or HF_HUB_OFFLINE=1), also allow this host, e.g. "
        "hub.internal.example (repeatable; loopback is always allowed).",
    ),
]


@app.command()
def check(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    offline: OfflineOpt = False,
) -> None:
    """Validate the recipe and the data without training or downloading weights."""
    guarded(lambda: bodies().check(recipe, overrides, as_json, offline), (recipe,))


def _training_command(name: str, summary: str) -> None:
    """`train` and `run` take the same arguments; only what they do after training differs."""

    def command(
        recipe: RecipeArg,
        overrides: SetOpt = None,
        resume: ResumeOpt = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
        force: ForceOpt = False,
        offline: OfflineOpt = False,
    ) -> None:
        guarded(lambda: getattr(bodies(), name)(recipe, overrides, resume, overwrite, force, offline), (recipe,))

    command.__doc__ = summary
    app.command(name)(command)


_training_command("train", "Train the adapter into the run directory.")
_training_command("run", "Train, evaluate against the base model and (if the recipe says so) publish.")


@app.command()
def doctor(
    run_root: Annotated[
        Path, typer.Option("--runs", help="Where run directories go (for the free-disk check).")
    ] = Path("runs"),
    endpoint: Annotated[
        Optional[str],
        typer.Option("--endpoint", help="Hub to probe (whoami with the token); default $HF_ENDPOINT, else none."),
    ] = None,
    offline: OfflineOpt = False,
    allow_host: AllowHostOpt = None,
) -> None:
    """One table of what matters for training here: Python, torch/CUDA, GPUs, bf16, bitsandbytes, disk, hub."""
    if not guarded(lambda: bodies().doctor(run_root, endpoint, offline, allow_host or []), (run_root,)):
        raise typer.Exit(1)


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Recipe file to write, e.g. recipes/mine.yaml.", show_default=False)],
    model: Annotated[str, typer.Option("--model", help="Base model: hub id or local folder.")] = "data/base-model",
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub commit sha to pin (hub ids).")] = None,
    data_path: Annotated[str, typer.Option("--data", help="Training data file or folder.")] = "data/sql/train.jsonl",
    data_format: Annotated[
        str, typer.Option("--format", help="messages | instruction | prompt_completion | text.")
    ] = "messages",
    eval_path: Annotated[
        Optional[str], typer.Option("--eval", help="Held-out data file (default: a seeded 10% of --data).")
    ] = None,
    metrics: Annotated[
        Optional[list[str]],
        typer.Option(
            "--metric",
            help="Metric that matters on the held-out data, e.g. exact_match, rouge_l, chrf, sql_execution "
            "(repeatable; loss, perplexity and token accuracy are always computed).",
        ),
    ] = None,
    database: Annotated[
        Optional[str], typer.Option("--database", help="SQLite file for --metric sql_execution.")
    ] = None,
    general: Annotated[
        Optional[str],
        typer.Option(
            "--general",
            help="General text (JSONL with a text column) for the forgetting check; default data/general/eval.jsonl "
            "when it exists. A train.jsonl beside it is offered for replay.",
        ),
    ] = None,
    no_general: Annotated[bool, typer.Option("--no-general", help="Write no forgetting check.")] = False,
    gpu: Annotated[
        str, typer.Option("--gpu", help="cpu | rtx4090-24gb | l4-24gb | a100-40gb | a100-80gb | h100-80gb.")
    ] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented starter recipe (validated before it is written)."""
    answers = dict(
        model=model, revision=revision, data=data_path, data_format=data_format, eval=eval_path,
        metrics=metrics or [], database=database, general=general, no_general=no_general, gpu=gpu,
    )  # fmt: skip
    guarded(lambda: bodies().init(path, answers, overwrite), (path, model, data_path, eval_path, database, general))


RunDirArg = Annotated[Path, typer.Argument(help="Run directory (runs/<name>).", show_default=False)]
# A run folder (or bundle, or pulled repository) is data: what its recorded recipe may run or unpickle, the command
# line decides. Without these flags such a setting is refused with one line naming the flag.
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let the run's recipe (model.trust_remote_code) run code shipped with the model or tokenizer; "
        "only for code you have reviewed.",
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle-weights",
        help="Let the run's recipe (model.allow_pickle_weights) or adapter load .bin/.pt pickle weights, "
        "which can run arbitrary code.",
    ),
]
NoVerifyOpt = Annotated[
    bool,
    typer.Option(
        "--no-verify", help="Load the run although its files no longer match manifest.json (default: refuse)."
    ),
]


@app.command()
def generate(
    run_dir: RunDirArg,
    prompt: Annotated[str, typer.Option("--prompt", help="The user message (or raw prompt for text formats).")],
    base: Annotated[bool, typer.Option("--base", help="Also show the base model's answer.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, max=MAX_NEW_TOKENS)] = 128,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle_weights: AllowPickleOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Generate one answer with the trained adapter (greedy)."""
    guarded(
        lambda: bodies().generate(
            run_dir,
            prompt,
            base,
            max_new_tokens,
            bodies().opt_ins(trust_remote_code, allow_pickle_weights),
            not no_verify,
        ),
        (run_dir,),
    )


@app.command()
def chat(
    run_dir: RunDirArg,
    base: Annotated[bool, typer.Option("--base", help="Show the base model's answer beside the adapter's.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, max=MAX_NEW_TOKENS)] = 256,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle_weights: AllowPickleOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Interactive chat with the adapter, using the chat template it was trained with. Empty line or Ctrl-D ends."""
    guarded(
        lambda: bodies().chat(
            run_dir, base, max_new_tokens, bodies().opt_ins(trust_remote_code, allow_pickle_weights), not no_verify
        ),
        (run_dir,),
    )


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory to evaluate.", show_default=False)],
    adapter: Annotated[
        Optional[Path], typer.Option("--adapter", help="Adapter folder (default RUN_DIR/adapter).")
    ] = None,
    base: Annotated[
        Optional[str], typer.Option("--base", help="Base model hub id or folder (default: the recipe's).")
    ] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe (default RUN_DIR/recipe.yaml).")] = None,
    overrides: SetOpt = None,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Folder for the report (default RUN_DIR); the run's own report stays as it is."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a report already in RUN_DIR (or in --out).")
    ] = False,
    offline: OfflineOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle_weights: AllowPickleOpt = False,
    allow_user_metrics: Annotated[
        bool,
        typer.Option(
            "--allow-user-metrics",
            help="Let the run's recipe (eval.datasets[].user_metrics) import and run its Python metric files.",
        ),
    ] = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Evaluate base vs adapter on the held-out data: report.json/md/png and eval_predictions.jsonl in RUN_DIR (or
    --out); an existing report is kept unless --overwrite. Exit 3 if a gate fails."""
    guarded(
        lambda: bodies().evaluate_run(
            run_dir,
            adapter,
            base,
            recipe,
            overrides,
            out,
            overwrite,
            offline,
            bodies().opt_ins(trust_remote_code, allow_pickle_weights, allow_user_metrics),
            not no_verify,
        ),
        (run_dir, adapter, recipe, out),
    )


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more evaluated run directories.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for compare.json/.md/.png.")] = Path("runs/compare"),
) -> None:
    """Put several runs side by side against their common base model (table and chart)."""
    guarded(lambda: bodies().compare(run_dirs, out), (*run_dirs, out))


EndpointOpt = Annotated[
    Optional[str],
    typer.Option(
        "--endpoint",
        help="Hub URL, e.g. https://hub.internal.example; default: $HF_ENDPOINT (push --use-run-hub: the run's "
        "hub.endpoint first).",
    ),
]
RevisionOpt = Annotated[
    Optional[str], typer.Option("--revision", help="Branch (push; created when missing) or revision (pull).")
]


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with adapter/ and manifest.json.", show_default=False)],
    repo: Annotated[
        Optional[str],
        typer.Option("--repo", help="Repository ORG/NAME (with --use-run-hub, default: the run's hub.repo)."),
    ] = None,
    endpoint: EndpointOpt = None,
    revision: RevisionOpt = None,
    public: Annotated[
        Optional[bool],
        typer.Option(
            "--public/--private",
            help="Make the repository public or private (also an existing one). Default: a new repository is "
            "private (--use-run-hub: hub.private), an existing one keeps its visibility.",
            show_default=False,
        ),
    ] = None,
    sign_key: Annotated[
        Optional[Path],
        typer.Option("--sign-key", help="PEM private key: sign the published files (--use-run-hub: hub.signing_key)."),
    ] = None,
    include_examples: Annotated[
        Optional[bool],
        typer.Option(
            "--include-examples/--no-examples",
            help="Publish report.json's example generations (held-out prompts); default: off (--use-run-hub: "
            "hub.include_examples).",
            show_default=False,
        ),
    ] = None,
    offline: OfflineOpt = False,
    allow_host: AllowHostOpt = None,
    use_run_hub: Annotated[
        bool,
        typer.Option(
            "--use-run-hub",
            help="Take the hub settings (repo, endpoint, revision, private, signing_key, include_examples) from the "
            "run's recorded recipe.yaml, where flags do not set them. Without it a run folder decides nothing about "
            "where it is pushed.",
        ),
    ] = False,
) -> None:
    """Make the repository hold exactly the run's adapter, tokenizer, report, manifest, card and publish manifest.

    One commit; none when nothing changed. Token: $HF_TOKEN or `hf auth login`.
    """
    guarded(
        lambda: bodies().push(
            run_dir,
            repo,
            endpoint,
            revision,
            public,
            sign_key,
            include_examples,
            offline,
            allow_host or [],
            use_run_hub,
        ),
        (run_dir, sign_key),
    )


TrustOpt = Annotated[
    Optional[Path],
    typer.Option("--trust", help="PEM public key: require a signature (model.sig) by its private key."),
]


@app.command()
def pull(
    repo: Annotated[str, typer.Argument(help="Repository ORG/NAME.", show_default=False)],
    revision: RevisionOpt = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub URL; default: $HF_ENDPOINT.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="New folder for the download; default: ./NAME.")] = None,
    trust: TrustOpt = None,
    offline: OfflineOpt = False,
    allow_host: AllowHostOpt = None,
) -> None:
    """Download exactly the files the publish manifest lists and check each one (mismatch: exit 2, nothing written)."""
    guarded(lambda: bodies().pull(repo, revision, endpoint, out, trust, offline, allow_host or []), (out, trust))


@app.command()
def sign(
    run_dir: RunDirArg,
    key: Annotated[Path, typer.Option("--key", help="PEM private key (ECDSA P-256; see README).", show_default=False)],
    repo: Annotated[
        Optional[str],
        typer.Option("--repo", help="Repository the run will be pushed to (the card names it); default: hub.repo."),
    ] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch it will be pushed to.")] = None,
    include_examples: Annotated[
        Optional[bool],
        typer.Option("--include-examples/--no-examples", help="As for push.", show_default=False),
    ] = None,
) -> None:
    """Sign the files a push of RUN_DIR publishes (OpenSSF model signing, offline) into RUN_DIR/model.sig.

    `sovtune push` publishes the signature with the files.
    """
    guarded(lambda: bodies().sign(run_dir, key, repo, revision, include_examples), (run_dir, key))


@app.command()
def verify(
    target: Annotated[
        Path,
        typer.Argument(
            help="Run directory, bundle (.tar) from `sovtune export`, or pulled folder.", show_default=False
        ),
    ],
    strict: Annotated[
        bool, typer.Option("--strict", help="Also fail when files outside the run (data, local base model) are absent.")
    ] = False,
    trust: TrustOpt = None,
) -> None:
    """Recompute every SHA-256 recorded for a run, bundle or pulled folder; exit 2 naming changed or missing files."""
    guarded(lambda: bodies().verify(target, strict, trust), (target, trust))


@app.command()
def export(
    run_dir: RunDirArg,
    bundle: Annotated[
        Path, typer.Argument(help="Bundle file to write, e.g. adapter.tar (.tar.gz compresses).", show_default=False)
    ],
) -> None:
    """Pack adapter, manifest, card, report and a SHA256SUMS file into one tar for air-gapped transfer."""
    guarded(lambda: bodies().export(run_dir, bundle), (run_dir, bundle))


@app.command()
def merge(
    run_dir: RunDirArg,
    out: Annotated[Path, typer.Argument(help="New folder for the merged model.", show_default=False)],
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="auto (bf16 on CUDA with support, else fp32 on the CPU) | float32 | bfloat16 | float16."
        ),
    ] = "auto",
    examples: Annotated[int, typer.Option("--examples", min=1, help="Held-out examples for the logits check.")] = 4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT folder.")] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle_weights: AllowPickleOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Merge the adapter into its base (a QLoRA base is reloaded unquantised); written only if the logits match."""
    guarded(
        lambda: bodies().merge(
            run_dir,
            out,
            dtype,
            examples,
            overwrite,
            bodies().opt_ins(trust_remote_code, allow_pickle_weights),
            not no_verify,
        ),
        (run_dir, out),
    )


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    gpu: Annotated[
        Optional[list[str]],
        typer.Option(
            "--gpu",
            help="GPU to check (repeatable): h100-80gb, a100-40gb, a100-80gb, l4-24gb, rtx4090-24gb, ... or 32gb.",
        ),
    ] = None,
    gpus: Annotated[
        int, typer.Option("--gpus", min=1, max=MAX_GPUS, help="GPUs per job (FSDP/ZeRO-3 shard the weights over them).")
    ] = 1,
    strategy: Annotated[
        str, typer.Option("--strategy", help="ddp | fsdp | deepspeed (ZeRO-3), as for sovtune launch.")
    ] = "ddp",
    arch: Annotated[
        Optional[str], typer.Option("--arch", help="Use the built-in config of this hub id instead of reading one.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
) -> None:
    """Estimate per-GPU memory from the model config alone, say whether it fits, and what to change if not."""
    guarded(lambda: bodies().plan(recipe, overrides, gpu, gpus, strategy, arch, as_json), (recipe,))


@app.command()
def launch(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, max=MAX_GPUS, help="Processes (GPUs) on this node.")] = 1,
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy", help="ddp | fsdp (FSDP2; fsdp-qlora for 4-bit) | deepspeed (ZeRO-3) | deepspeed-zero2."
        ),
    ] = "ddp",
    config_file: Annotated[
        Optional[Path], typer.Option("--config-file", help="Your own accelerate config instead of configs/accelerate/.")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the accelerate command without running it.")
    ] = False,
) -> None:
    """Train on several GPUs: print and run `accelerate launch --config_file ... -m sovtune train RECIPE`."""
    guarded(
        lambda: bodies().launch(recipe, overrides, gpus, strategy, config_file, resume, overwrite, dry_run),
        (recipe, config_file),
    )


def _usage_error_class(name: str) -> type[Exception]:
    """Click's exception classes, from the public `typer.BadParameter` (Typer >= 0.20 vendors click as a private
    module, earlier Typers use click itself: its ancestors are the right classes either way)."""
    return next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == name)


UsageError = _usage_error_class("UsageError")
ClickException = _usage_error_class("ClickException")


def main() -> None:
    """The `sovtune` command. A usage error (an unknown option, a missing argument, a flag's value out of range) is
    bad input like any other: one line on stderr and exit code 2, where Typer would draw a box around it with the
    usage above. Help for a bare `sovtune` and every other exit stay Typer's."""
    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `sovtune`: the help, as Typer shows it
            exc.show()  # type: ignore[attr-defined]
        else:
            context = getattr(exc, "ctx", None)
            command = context.command_path if context is not None else "sovtune"
            err_console.print("[bold red]error:[/] ", end="", highlight=False)
            message = f"{command}: {exc.format_message()} (see '{command} --help')"  # type: ignore[attr-defined]
            err_console.print(message, markup=False, highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except ClickException as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", 1))
    except typer.Abort:
        err_console.print("[bold red]aborted[/]")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
