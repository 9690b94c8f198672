"""Publish a run's adapter to a hub you name, and pull one back verified against its manifest.

Every call gets its endpoint and token explicitly: huggingface_hub reads HF_ENDPOINT once, at import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sovtune import __version__
from sovtune.config import HubSection, check_endpoint, check_repo_id
from sovtune.core.hashing import RUN_ROOT, sha256_file
from sovtune.core.rundir import RunDir
from sovtune.errors import SovtuneError
from sovtune.publish.card import build_card
from sovtune.run.manifest import recorded_files
from sovtune.run.verify import run_file_kind, unrecorded_adapter_files

CARD = RunDir.CARD
MANIFEST = RunDir.MANIFEST
RUN_FILES = (RunDir.REPORT, MANIFEST)  # published next to the adapter files, at the repository root
# peft writes a placeholder card into the adapter folder; the repository's README.md is ours.
NOT_PUBLISHED = {"adapter/README.md"}
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
RETRY_ATTEMPTS = 4
RETRY_WAIT_S = 2.0  # doubled after each failed attempt
_TRUE = {"1", "ON", "YES", "TRUE"}

log = logging.getLogger(__name__)


class HubError(SovtuneError):
    """A push or pull failed: the hub refused, could not be reached, or the files do not match their manifest."""


@dataclass
class PushResult:
    repo_id: str
    endpoint: str
    revision: str
    commit: str
    url: str
    private: bool
    files: list[str] = field(default_factory=list)


@dataclass
class PullResult:
    repo_id: str
    endpoint: str
    revision: str
    commit: str
    out_dir: Path
    verified: list[str] = field(default_factory=list)


@dataclass
class _Target:
    """What the error messages need to name; `token` only so it can be scrubbed from them."""

    endpoint: str
    repo_id: str
    revision: str
    token: str | None
    action: str  # "push" | "pull"


# ---------------------------------------------------------------------------------------------------------------
# Settings: endpoint, token, repository


def resolve_endpoint(flag: str | None = None, recipe_endpoint: str | None = None) -> str:
    """The --endpoint flag, else the recipe's hub.endpoint, else $HF_ENDPOINT (read now, not at import)."""
    sources = (("--endpoint", flag), ("hub.endpoint", recipe_endpoint), ("HF_ENDPOINT", os.environ.get("HF_ENDPOINT")))
    for source, value in sources:
        if value:
            try:
                return check_endpoint(value)
            except ValueError as exc:
                raise HubError(f"{source}: {exc}") from None
    raise HubError(
        "no hub endpoint: pass --endpoint URL, set hub.endpoint in the recipe, or export HF_ENDPOINT "
        "(https://huggingface.co is the public hub; sovtune never picks it for you)"
    )


def resolve_token(endpoint: str, required: bool) -> str | None:
    """$HF_TOKEN, else the token saved by `hf auth login`."""
    from huggingface_hub import get_token

    token = get_token()
    if token is None and required:
        raise HubError(f"no token for {endpoint}: export HF_TOKEN=<a write token for that hub> or run `hf auth login`")
    return token


def check_push_settings(hub: HubSection) -> None:
    """For `sovtune check`: a recipe with hub.push must be able to publish after training (no network used)."""
    if hub.push:
        checked_repo_id(hub.repo, "hub.repo")
        resolve_token(resolve_endpoint(None, hub.endpoint), required=True)


def checked_repo_id(repo_id: str | None, source: str = "--repo") -> str:
    if not repo_id:
        raise HubError("no repository: pass --repo ORG/NAME or set hub.repo in the recipe")
    try:
        return check_repo_id(repo_id)
    except ValueError as exc:
        raise HubError(f"{source}: {exc}") from None


def _checked_branch(revision: str | None) -> str | None:
    try:
        return HubSection(revision=revision).revision
    except ValueError as exc:  # pydantic's ValidationError
        raise HubError(f"--revision: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def run_hub_settings(run_dir: Path) -> HubSection:
    """The hub section of the recipe the run recorded (defaults when it has none)."""
    run = RunDir(run_dir)
    path = run / RunDir.RECIPE
    if not path.exists():
        return HubSection()
    try:
        return HubSection.model_validate(run.recipe_data().get("hub") or {})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        where = ".".join(str(part) for part in first["loc"])
        raise HubError(f"{path}: hub.{where}: {first['msg'].removeprefix('Value error, ')}") from None


# ---------------------------------------------------------------------------------------------------------------
# What is published, and checking it against the manifest


def publish_files(run_dir: Path) -> dict[str, Path]:
    """Run-relative path -> file: the adapter folder's files (weights, config, tokenizer, chat template) and
    report.json / manifest.json. The adapter folder becomes the repository root so peft loads the repo as is."""
    run_dir = Path(run_dir)
    adapter = RunDir(run_dir).adapter_dir
    if not adapter.is_dir():
        raise HubError(f"{adapter}: no adapter folder; train first (`sovtune train RECIPE`) or give the run directory")
    files = {
        f"adapter/{path.relative_to(adapter).as_posix()}": path
        for path in sorted(adapter.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(adapter).parts)
    }
    files = {name: path for name, path in files.items() if name not in NOT_PUBLISHED}
    weights = [name for name in files if Path(name).name.startswith("adapter_model.")]
    missing = [
        name
        for name, ok in (
            ("adapter_config.json", "adapter/adapter_config.json" in files),
            ("adapter_model.safetensors", weights),
        )
        if not ok
    ]
    if missing:
        raise HubError(
            f"{adapter}: {', '.join(missing)} missing; the adapter was not saved completely, re-run training"
        )
    clashes = sorted(name for name in files if repo_path(name) in (CARD, *RUN_FILES))
    if clashes:
        raise HubError(
            f"{adapter}: {', '.join(clashes)} would overwrite the run's own file at the repository root; rename it"
        )
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            files[name] = run_dir / name
    # Never through a symbolic link: it could publish any file of this machine (export refuses them too).
    links = sorted(
        {name for name in files if run_file_kind(run_dir, name) != "file"}
        | set(unrecorded_adapter_files(run_dir, set(files))[1])
    )
    if links:
        raise HubError(f"{run_dir}: {', '.join(links)}: symbolic links are not published; replace them with the files")
    if MANIFEST not in files:
        raise HubError(
            f"{run_dir / MANIFEST}: missing; a published adapter carries its manifest so `sovtune pull` can verify it "
            "(runs written by `sovtune train` have one)"
        )
    return files


def repo_path(run_path: str) -> str:
    """Where a run file lives in the repository: adapter files at the root, run files beside them."""
    return run_path.removeprefix("adapter/")


def run_path(path_in_repo: str) -> str:
    """The inverse of `repo_path`."""
    return path_in_repo if path_in_repo in (CARD, *RUN_FILES) else f"adapter/{path_in_repo}"


def check_against_manifest(manifest: dict[str, Any], present: dict[str, Path], where: str) -> list[str]:
    """Compare files (run-relative path -> local file) with the manifest's SHA-256; HubError names every difference.

    Every adapter file the manifest records must be present and match; adapter files it does not record are refused
    too (something was added after training). Other recorded files that are present (report.json) must match.
    """
    expected = {path: digest for (root, path), digest in recorded_files(manifest).items() if root == RUN_ROOT}
    adapter_expected = sorted(path for path in expected if path.startswith("adapter/") and path not in NOT_PUBLISHED)
    if not adapter_expected:
        raise HubError(
            f"{where}: manifest.json records no adapter files (training did not finish?); nothing to verify against"
        )
    mismatched, missing, checked = [], [], []
    for path in adapter_expected + sorted(p for p in present if p in expected and not p.startswith("adapter/")):
        if path not in present:
            missing.append(path)
        elif sha256_file(present[path]) != expected[path]:
            mismatched.append(path)
        else:
            checked.append(path)
    unlisted = sorted(p for p in present if p.startswith("adapter/") and p not in expected and p not in NOT_PUBLISHED)
    problems = [
        f"{label}: {', '.join(paths)}"
        for label, paths in (("hash mismatch", mismatched), ("missing", missing), ("not in the manifest", unlisted))
        if paths
    ]
    if problems:
        raise HubError(f"{where}: files do not match manifest.json ({'; '.join(problems)})")
    return checked


# ---------------------------------------------------------------------------------------------------------------
# Push


def push_run(
    run_dir: Path,
    repo_id: str | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    public: bool = False,
    hub: HubSection | None = None,
) -> PushResult:
    """`sovtune push`: flags first, then the run's recipe (hub section), then $HF_ENDPOINT."""
    hub = hub if hub is not None else run_hub_settings(run_dir)
    return push(
        run_dir,
        checked_repo_id(repo_id or hub.repo, "--repo" if repo_id else "hub.repo"),
        endpoint=resolve_endpoint(endpoint, hub.endpoint),
        revision=revision or hub.revision,
        private=not public and hub.private,
    )


def push(
    run_dir: Path,
    repo_id: str,
    endpoint: str,
    revision: str | None = None,
    private: bool = True,
    token: str | None = None,
) -> PushResult:
    """Upload adapter, tokenizer, chat template, report, manifest and model card to `repo_id` in one commit.

    The repository is created private unless `private=False`; an existing public one is refused when private was
    asked for. The commit names the branch head it was built on, so a concurrent push fails (412) instead of
    silently interleaving.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    run_dir = Path(run_dir)
    repo_id, endpoint = checked_repo_id(repo_id), resolve_endpoint(endpoint)
    branch = _checked_branch(revision) or "main"
    files = publish_files(run_dir)
    manifest = RunDir(run_dir).manifest()
    check_against_manifest(manifest, files, str(run_dir))
    card_bytes = str(build_card(run_dir, repo_id, revision=branch)).encode("utf-8")
    token = token or resolve_token(endpoint, required=True)
    target = _Target(endpoint, repo_id, branch, token, "push")
    api = HfApi(endpoint=endpoint, token=token, library_name="sovtune", library_version=__version__)

    def operations() -> list[Any]:
        # A fresh list per attempt: the client marks operations as committed and refuses to reuse them.
        adds = [
            CommitOperationAdd(path_in_repo=repo_path(name), path_or_fileobj=str(path)) for name, path in files.items()
        ]
        return adds + [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card_bytes)]

    with _client_switches():
        _call("create the repository", target, lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        info = _call("read the repository", target, lambda: api.model_info(repo_id))
        if private and info.private is False:
            raise HubError(
                f"{repo_id} exists on {endpoint} and is public, but the push is private; make the repository private "
                "on the hub, or pass --public to publish there"
            )
        if branch != "main":
            _call("create the branch", target, lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
        head = _call("read the branch head", target, lambda: api.model_info(repo_id, revision=branch)).sha
        run_name = (manifest.get("run") or {}).get("name") or run_dir.name
        commit = _upload(
            target,
            lambda: api.create_commit(
                repo_id,
                operations=operations(),
                commit_message=f"sovtune: adapter from run {run_name}",
                commit_description="Adapter, tokenizer, chat template, report.json, manifest.json and model card.",
                revision=branch,
                parent_commit=head,
            ),
        )
    published = sorted([repo_path(name) for name in files] + [CARD])
    log.info(
        f"published {len(published)} files to {endpoint}/{repo_id} ({'private' if private else 'public'}) "
        f"on {branch} at {commit.oid}"
    )
    return PushResult(repo_id, endpoint, branch, commit.oid, commit.commit_url, private, published)


def _upload(target: _Target, commit: Callable[[], Any]) -> Any:
    """Commit through Xet when the hub has it; a hub without Xet answers its token endpoint with 404, and the client
    reports that as a misleading `ConnectionError ... 404`: then fall back to plain LFS, unless Xet was asked for."""
    from huggingface_hub import constants

    wanted = _xet_wanted()
    constants.HF_HUB_DISABLE_XET = wanted is False
    try:
        return _call("upload", target, commit, explain_xet=wanted is True)
    except _XetMissing:
        pass  # retried below, outside this handler, so later errors do not carry the Xet one as their context
    log.info(f"{target.endpoint} has no Xet storage; uploading over LFS instead (HF_HUB_DISABLE_XET=1 skips this try)")
    constants.HF_HUB_DISABLE_XET = True
    return _call("upload", target, commit)


def _xet_wanted() -> bool | None:
    """HF_HUB_DISABLE_XET as it is now (huggingface_hub only reads it at import): False = off, True = forced on
    (set to 0), None = unset (try Xet, fall back)."""
    value = (os.environ.get("HF_HUB_DISABLE_XET") or "").strip()
    return None if not value else value.upper() not in _TRUE


@contextlib.contextmanager
def _client_switches() -> Iterator[None]:
    """The huggingface_hub switches a push or pull needs, restored afterwards.

    HF_HUB_OFFLINE stops the libraries' implicit downloads; a push or pull is an explicit transfer to a named
    endpoint, so it is lifted for the call. In offline mode the socket guard (sovtune.offline) still decides which
    hosts are reachable: only loopback and `sovereignty.allowed_endpoints`.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved


# ---------------------------------------------------------------------------------------------------------------
# Pull


def pull(
    repo_id: str,
    endpoint: str | None = None,
    revision: str | None = None,
    out: Path | None = None,
    token: str | None = None,
) -> PullResult:
    """Download a published adapter into `out` (the run-directory layout: adapter/, report.json, manifest.json,
    README.md) and check every adapter file against the manifest's SHA-256. Nothing is written to `out` unless
    everything matches: the files land in a temporary folder beside it and are renamed at the end."""
    from huggingface_hub import HfApi, snapshot_download

    repo_id = checked_repo_id(repo_id)
    endpoint = resolve_endpoint(endpoint)
    out = Path(out) if out is not None else Path(repo_id.split("/")[1])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HubError(f"{out}: exists and is not empty; pass --out to a new folder or remove it")
    token = token or resolve_token(endpoint, required=False)
    target = _Target(endpoint, repo_id, revision or "main", token, "pull")
    api = HfApi(endpoint=endpoint, token=token, library_name="sovtune", library_version=__version__)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.pull-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        with _client_switches():
            # Pin the commit first: every file then comes from the same snapshot, even if the branch moves meanwhile.
            commit = _call("read the repository", target, lambda: api.model_info(repo_id, revision=target.revision)).sha
            download = work / "download"
            _call(
                "download",
                target,
                lambda: snapshot_download(
                    repo_id,
                    revision=commit,
                    endpoint=endpoint,
                    token=token,
                    local_dir=download,
                    cache_dir=work / "cache",
                ),
            )
        present = _arrange(download, work / "run")
        where = f"{endpoint}/{repo_id}@{commit}"
        if MANIFEST not in present:
            raise HubError(
                f"{where}: no manifest.json, so the adapter cannot be verified; publish it with `sovtune push`"
            )
        manifest = RunDir(work / "run").manifest()
        verified = check_against_manifest(manifest, present, where)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(work / "run", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(f"pulled {repo_id}@{commit} into {out}: {len(verified)} files match manifest.json")
    return PullResult(repo_id, endpoint, target.revision, commit, out, verified)


def _arrange(download: Path, run: Path) -> dict[str, Path]:
    """Move downloaded files into the run-directory layout; returns run-relative path -> file."""
    present: dict[str, Path] = {}
    for path in sorted(download.rglob("*")):
        relative = path.relative_to(download).as_posix()
        if not path.is_file() or relative.startswith(".cache/") or relative == ".gitattributes":
            continue
        destination = run / run_path(relative)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
        present[run_path(relative)] = destination
    return present


# ---------------------------------------------------------------------------------------------------------------
# Retries and error messages


class _XetMissing(Exception):
    """The hub has no Xet storage (internal: triggers the LFS fallback)."""


def _call(step: str, target: _Target, fn: Callable[[], Any], explain_xet: bool = True) -> Any:
    """Run one hub call; retry transient failures (429, 5xx, dropped connections) with a doubling wait."""
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return fn()
        except SovtuneError:
            raise  # e.g. the offline guard refusing a host: already one clear line
        except Exception as exc:
            if _xet_missing(exc) and not explain_xet:
                raise _XetMissing() from None
            reason = _transient(exc)
            if reason is None or attempt == RETRY_ATTEMPTS:
                raise HubError(_scrub(_explain(exc, step, target, attempt), target.token)) from None
            wait = RETRY_WAIT_S * 2 ** (attempt - 1)
            log.info(f"{step}: {reason}; retrying in {wait:g}s (attempt {attempt + 1} of {RETRY_ATTEMPTS})")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _http_error(exc: BaseException) -> Any:
    from huggingface_hub.errors import HfHubHTTPError

    return next((e for e in _chain(exc) if isinstance(e, HfHubHTTPError) and e.response is not None), None)


def _xet_missing(exc: BaseException) -> bool:
    return any(isinstance(e, ConnectionError) and "xet-write-token" in str(e) and "404" in str(e) for e in _chain(exc))


def _network_error(exc: BaseException) -> BaseException | None:
    """A dropped or refused connection, timeout or protocol error from the client's HTTP library (httpx in
    huggingface_hub 1.x, httpx2 in 2.x: matched by class so either works)."""
    return next(
        (
            e
            for e in _chain(exc)
            if any(
                cls.__name__ == "TransportError" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
                for cls in type(e).__mro__
            )
        ),
        None,
    )


def _transient(exc: BaseException) -> str | None:
    http = _http_error(exc)
    if http is not None:
        status = http.response.status_code
        return f"the hub answered {status}" if status in TRANSIENT_STATUS else None
    network = _network_error(exc)
    return f"connection problem ({type(network).__name__})" if network is not None else None


def _explain(exc: BaseException, step: str, target: _Target, attempts: int) -> str:
    from huggingface_hub.errors import RepositoryNotFoundError

    endpoint, repo, rev = target.endpoint, target.repo_id, target.revision
    if _xet_missing(exc):
        return (
            f"{step}: the hub at {endpoint} has no Xet storage (its xet-write-token endpoint answered 404, which the "
            "client reports as a misleading 'ConnectionError ... 404'); set HF_HUB_DISABLE_XET=1 to upload over LFS"
        )
    metadata = next(
        (e for e in _chain(exc) if isinstance(e, ValueError) and str(e).startswith("Invalid metadata in README.md")),
        None,
    )
    if metadata is not None:
        reasons = (
            "; ".join(line[2:] for line in str(metadata).splitlines() if line.startswith("- ")) or "no reason given"
        )
        return (
            f"{step}: the hub at {endpoint} rejected the model card metadata (400 from validate-yaml: {reasons}); "
            "base_model and datasets must be hub ids, never local paths: fix the recorded recipe or manifest"
        )
    http = _http_error(exc)
    if http is None:
        network = _network_error(exc)
        if network is not None:
            tried = f" after {attempts} attempts" if attempts > 1 else ""
            return (
                f"{step}: cannot reach the hub at {endpoint}{tried} "
                f"({_first_line(network) or type(network).__name__}); check --endpoint and the network"
            )
        return f"{step} on {endpoint}/{repo} failed: {type(exc).__name__}: {_first_line(exc)}"
    status = http.response.status_code
    server = _first_line(http.server_message) if http.server_message else ""
    said = f": {server}" if server else ""
    code = http.response.headers.get("X-Error-Code")
    if status == 401 and isinstance(http, RepositoryNotFoundError):
        return (
            f"{step}: {repo} is not on {endpoint}, or it is private and needs a token (401); check the name and "
            "export HF_TOKEN=<a token for that hub>"
        )
    if status == 401:
        return (
            f"{step}: the hub at {endpoint} rejected the token (401 Unauthorized{said}); "
            "export HF_TOKEN=<a valid token for that hub> or run `hf auth login`"
        )
    if status == 403:
        need = "write" if target.action == "push" else "read"
        return (
            f"{step}: the token may not {need} {repo} on {endpoint} (403 Forbidden{said}); "
            f"use a token with {need} access to {repo.split('/')[0]}"
        )
    if status == 404 and code == "RevisionNotFound":
        return f"{step}: revision {rev!r} is not in {repo} on {endpoint} (404); check --revision"
    if status == 404 and (code in ("RepoNotFound", None) or isinstance(http, RepositoryNotFoundError)):
        return f"{step}: {repo} is not on {endpoint} (404); check the name and --endpoint"
    if status == 404:
        return f"{step}: {endpoint} answered 404 ({code}{said}); check the repository and revision"
    if status == 409:
        return (
            f"{step}: conflict on {repo} (409{said}); another operation on the repository is in progress, "
            f"wait and run {target.action} again"
        )
    if status == 412:
        return (
            f"{step}: {repo} branch {rev} moved during the push (412 Precondition Failed: another commit landed after "
            f"this push read the branch head); nothing was published, run the push again to publish on top of it"
        )
    if status == 400:
        return f"{step}: the hub at {endpoint} refused the request (400 Bad Request{said})"
    if status in TRANSIENT_STATUS:
        return (
            f"{step}: the hub at {endpoint} is unavailable ({status}{said}) after {attempts} attempts; try again later"
        )
    return f"{step}: the hub at {endpoint} answered {status}{said}"


def _first_line(value: Any) -> str:
    return next((line.strip() for line in str(value).splitlines() if line.strip()), "")


def _scrub(message: str, token: str | None) -> str:
    """One line, and never the token (a server may echo what it was sent)."""
    message = " ".join(message.split())
    return message.replace(token, "***") if token else message
