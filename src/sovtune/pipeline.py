"""The Python API the CLI is thin over: `train` and `run` a recipe, `verify` a run directory or bundle.

`run` is data -> model -> train -> evaluate -> publish, each stage reading what the last one wrote to the run
directory and each recording its own audit event.
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sovtune import model as models
from sovtune import offline, preflight, training
from sovtune.audit import audited
from sovtune.config import Recipe, RunOptIns, load_run_recipe
from sovtune.core.rundir import RunDir
from sovtune.core.runtime import is_main_process
from sovtune.errors import SovtuneError
from sovtune.evaluation import HeldOut, evaluate
from sovtune.inputs import prepare_recipe_data
from sovtune.publish.bundle import verify_bundle
from sovtune.publish.hub import (
    PullResult,
    PushResult,
    checked_repo_id,
    push_settings,
    resolve_endpoint,
    run_hub_settings,
    run_sovereignty,
)
from sovtune.publish.hub import pull as pull_from_hub
from sovtune.publish.hub import push as push_to_hub
from sovtune.publish.publication import is_published_folder, sign_run, verify_published
from sovtune.run.lock import RunLock
from sovtune.run.signals import resume_command
from sovtune.run.verify import VerifyFailed, VerifyResult, verify_run_dir

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    stages: dict[str, Any] = field(default_factory=dict)


def train(
    recipe: Recipe, resume: bool = False, overwrite: bool = False, force: bool = False, overrides: Sequence[str] = ()
) -> training.TrainResult:
    """Train the recipe's adapter into its run directory (`sovtune train`); `overrides` are the --set options a
    stopped run repeats in the command that resumes it."""
    with audited("train", recipe, destination=str(recipe.run_dir)):
        return training.train(recipe, resume, overwrite, force, resume_command(recipe, "train", overrides))


def run(
    recipe: Recipe, resume: bool = False, overwrite: bool = False, force: bool = False, overrides: Sequence[str] = ()
) -> RunResult:
    """The whole job for one recipe: check, train, evaluate against the base, publish when the recipe says so."""
    training.check_run_dir(recipe, resume, overwrite)  # refused before the lock file is made
    # One writer for the whole job (train's own lock nests inside): a second run cannot slip in before eval.
    with RunLock(recipe.run_dir, enabled=is_main_process()):
        return _run(recipe, resume, overwrite, force, resume_command(recipe, "run", overrides))


def _run(recipe: Recipe, resume: bool, overwrite: bool, force: bool, resume_line: str) -> RunResult:
    result = RunResult(run_dir=recipe.run_dir)
    if is_main_process():  # broken eval or publish settings fail now, not after training
        tokenizer = models.load_tokenizer(recipe)
        for warning in preflight.before_training(recipe, tokenizer, prepare_recipe_data(recipe, tokenizer)):
            log.warning("%s", warning)
    with audited("train", recipe, destination=str(result.run_dir)):
        result.stages["train"] = training.train(recipe, resume, overwrite, force, resume_line)
    if recipe.eval.enabled and is_main_process():
        # Raises GateFailed (exit 3) after writing the report, so a failing adapter is never published.
        with audited("eval", recipe, destination=str(result.run_dir)):
            result.stages["evaluate"] = evaluate(
                recipe,
                run_dir=result.run_dir,
                adapter_dir=result.stages["train"].adapter_dir,
                held_out=HeldOut.from_run(result.run_dir),
                overwrite=True,  # the run writes its own report: one left by an earlier run of it is stale
            )
    if recipe.hub.push and is_main_process():
        # Reached only when every gate passed (evaluate raises GateFailed otherwise).
        result.stages["push"] = push(result.run_dir, recipe=recipe)
    return result


def push(
    run_dir: str | Path,
    repo: str | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    public: bool | None = None,
    sign_key: Path | None = None,
    include_examples: bool | None = None,
    offline_flag: bool = False,
    allow_hosts: Sequence[str] = (),
    recipe: Recipe | None = None,
    use_run_hub: bool = False,
) -> PushResult:
    """Publish a run (`sovtune push`, and the end of `sovtune run` with `recipe`): flags first, then the recipe's
    hub section. Without `recipe`, the run's recorded hub section is used only with `use_run_hub` (a received run
    folder must not choose where the token goes); otherwise repository and endpoint come from the flags and
    $HF_ENDPOINT.

    Offline mode (the flag, the recipe's `sovereignty.offline`, or HF_HUB_OFFLINE & co. in the environment) holds
    for the whole push: only loopback, `sovereignty.allowed_hosts` and `allow_hosts` may be contacted.
    """
    run_dir = Path(run_dir)
    with audited("push", recipe, run_dir=run_dir, recorded=recipe is None) as event:
        if recipe is None:
            event["recipe"] = recorded_recipe(run_dir)
        sovereignty = recipe.sovereignty if recipe is not None else run_sovereignty(run_dir)
        reason = offline.reason_for(offline_flag, sovereignty.offline)
        going_offline = reason is not None
        with offline.session(going_offline, [*sovereignty.allowed_hosts, *allow_hosts], reason):
            hub, folder = (recipe.hub, recipe.base_dir) if recipe is not None else (None, None)
            flags = {"public": public, "sign_key": sign_key, "include_examples": include_examples}
            flags["use_run_hub"] = use_run_hub
            if recipe is None:
                event["details"]["hub_settings"] = "the run's recipe (--use-run-hub)" if use_run_hub else "flags"
            settings = push_settings(run_dir, repo, endpoint, revision, hub=hub, base_dir=folder, **flags)
            event["destination"] = f"{settings.endpoint}/{settings.repo_id}"
            event["details"].update(endpoint=settings.endpoint, revision=settings.revision or "main")
            event["details"]["offline"] = going_offline
            result = push_to_hub(run_dir, **vars(settings))
            event["destination"] = f"{result.endpoint}/{result.repo_id}@{result.commit}"
            event["details"].update(
                change="published" if result.changed else "no change",
                commit=result.commit,
                uploaded=len(result.uploaded),
                deleted=result.deleted,
                files=len(result.files),
                private=result.private,
                visibility_changed=result.visibility_changed,
                signed=result.signed,
            )
    return result


def pull(
    repo: str,
    endpoint: str | None = None,
    revision: str | None = None,
    out: Path | None = None,
    trust: Path | None = None,
    offline_flag: bool = False,
    allow_hosts: Sequence[str] = (),
) -> PullResult:
    """Download and verify a publication (`sovtune pull`); offline mode (the flag or the hub environment switches)
    holds for the whole pull, with loopback and `allow_hosts` reachable."""
    destination = Path(out) if out is not None else Path(repo.split("/")[-1] or repo)
    with audited("pull", destination=os.path.abspath(destination), details={"source": repo}) as event:
        reason = offline.reason_for(offline_flag)
        going_offline = reason is not None
        with offline.session(going_offline, allow_hosts, reason):
            endpoint = resolve_endpoint(endpoint)
            event["details"].update(endpoint=endpoint, source=f"{endpoint}/{repo}", offline=going_offline)
            result = pull_from_hub(repo, endpoint=endpoint, revision=revision, out=destination, trust=trust)
            event["destination"] = os.path.abspath(result.out_dir)
            event["details"].update(
                source=f"{result.endpoint}/{result.repo_id}@{result.commit}", signature=result.signature
            )
    return result


def sign(
    run_dir: str | Path,
    key: Path,
    repo: str | None = None,
    revision: str | None = None,
    include_examples: bool | None = None,
) -> Path:
    """`sovtune sign`: sign what a push of the run publishes (the card names the repository: --repo, else the
    recipe's hub.repo); the signature is RUN_DIR/model.sig, which `sovtune push` publishes with the files."""
    run_dir = Path(run_dir)
    with audited("sign", recorded_recipe(run_dir), run_dir=run_dir, recorded=True) as event:
        hub = run_hub_settings(run_dir)
        repo_id = checked_repo_id(repo or hub.repo, "--repo" if repo else "hub.repo")
        branch = revision or hub.revision or "main"
        examples = hub.include_examples if include_examples is None else include_examples
        published = sign_run(run_dir, key, repo_id, branch, examples)
        event["destination"] = os.path.abspath(RunDir(run_dir) / RunDir.SIGNATURE)
        event["details"].update(repo=repo_id, revision=branch, files=len(published.paths))
    log.info(
        f"signed the {len(published.paths)} files a push of {run_dir} to {repo_id} ({branch}) publishes: "
        f"{RunDir(run_dir) / RunDir.SIGNATURE}; `sovtune push` publishes it with them"
    )
    return RunDir(run_dir) / RunDir.SIGNATURE


def recorded_recipe(run_dir: Path) -> Recipe | None:
    """The recipe a run saved, for the audit record (its hash, data hashes and audit-log setting); None if
    unreadable. Read for the record only, so its opt-in settings are let through: nothing it names is run."""
    try:
        recorded = RunOptIns(trust_remote_code=True, allow_pickle_weights=True, allow_user_metrics=True)
        return load_run_recipe(run_dir, opt_ins=recorded) if (RunDir(run_dir) / RunDir.RECIPE).is_file() else None
    except SovtuneError:
        return None


def verify(target: str | Path, strict: bool = False, trust: Path | None = None) -> VerifyResult:
    """Recompute every hash of a run directory, an exported bundle or a published (pulled) folder; `VerifyFailed`
    lists what differs, changed and missing files apart.

    Files outside the run (data, a local base model) are checked where they exist; `strict` also fails when absent.
    A published folder holds a subset of the run by design: recorded files that were not published are listed, not
    failed; `trust` also checks its signature.
    """
    target = Path(target)
    if target.is_file() and tarfile.is_tarfile(target):
        result = verify_bundle(target)
    elif target.is_dir() and is_published_folder(target):
        result = verify_published(target, trust)
    elif target.is_dir():
        result = verify_run_dir(target, strict)
    else:
        raise VerifyFailed(f"{target}: neither a run directory nor a bundle (.tar); give RUN_DIR or BUNDLE")
    if trust is not None and result.signature is None:
        raise VerifyFailed(f"{target}: --trust checks the signature of a pulled folder; {target} is not one")
    if not result.ok:
        raise VerifyFailed(result.describe())
    return result
