"""Publish a run to a hub you name, and pull a publication back, verified file by file.

Every call gets its endpoint and token explicitly: huggingface_hub reads HF_ENDPOINT once, at import. In offline mode
(`sovtune.offline`) the endpoint's host must be on the allow-list; that is checked before anything is sent, and the
socket guard refuses any other host the hub might send the client to.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sovtune import __version__, offline
from sovtune.config import HubSection, SovereigntySection, check_endpoint, check_repo_id, endpoint_host
from sovtune.core.files import check_output_place, deletion_hazard, make_output_dir
from sovtune.core.rundir import RunDir
from sovtune.errors import SovtuneError
from sovtune.model import PICKLE_SUFFIXES
from sovtune.publish import publication as publishing
from sovtune.publish.publication import PUBLISH_MANIFEST, SIGNATURE, Publication, PublishError
from sovtune.publish.signing import check_private_key, check_public_key

HUB_FILES = {".gitattributes"}  # the hub's own file in every repository: neither published nor deleted by a push
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
RETRY_ATTEMPTS = 4
RETRY_WAIT_S = 2.0  # doubled after each failed attempt
_TRUE = {"1", "ON", "YES", "TRUE"}

log = logging.getLogger(__name__)


class HubError(PublishError):
    """A push or pull failed: the hub refused, could not be reached, or the files do not match their manifest."""


@dataclass
class PushResult:
    repo_id: str
    endpoint: str
    revision: str
    commit: str  # the new commit, or the branch head when nothing changed
    url: str
    private: bool | None  # the repository's visibility after the push (None: the hub did not say)
    files: list[str] = field(default_factory=list)  # what the repository holds now (the publication)
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # files of an earlier push this run does not publish
    visibility_changed: bool = False
    signed: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.uploaded or self.deleted)

    @property
    def visibility(self) -> str:
        shown = {True: "private", False: "public", None: "visibility not reported by the hub"}[self.private]
        if self.visibility_changed:
            shown += f", changed from {'public' if self.private else 'private'}"
        return shown


@dataclass
class PullResult:
    repo_id: str
    endpoint: str
    revision: str
    commit: str
    out_dir: Path
    verified: list[str] = field(default_factory=list)
    signature: str = "not signed"


@dataclass
class PushSettings:
    """Where and how a run is published: command-line flags first, then the recipe's hub section."""

    repo_id: str
    endpoint: str
    revision: str | None = None
    public: bool | None = None  # --public / --private; None: an existing repository keeps its visibility
    create_private: bool = True  # a new repository (hub.private)
    include_examples: bool = False
    sign_key: Path | None = None


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


def check_push_settings(hub: HubSection, base_dir: Path | None = None) -> None:
    """For `sovtune check`: a recipe with hub.push must be able to publish after training (no network used); its
    signing key (relative to `base_dir`, the recipe's folder) must be a usable key."""
    if hub.push:
        checked_repo_id(hub.repo, "hub.repo")
        resolve_token(resolve_endpoint(None, hub.endpoint), required=True)
    if hub.signing_key:
        check_private_key(_signing_key(hub.signing_key, base_dir))


def _signing_key(recorded: str, base_dir: Path | None) -> Path:
    path = Path(os.path.expanduser(recorded))
    return path if path.is_absolute() else Path(base_dir or ".") / path


def checked_repo_id(repo_id: str | None, source: str = "--repo") -> str:
    if not repo_id:
        raise HubError(f"no repository: pass {source} ORG/NAME or set hub.repo in the recipe")
    try:
        return check_repo_id(repo_id)
    except ValueError as exc:
        raise HubError(f"{source}: {exc}") from None


def _checked_branch(revision: str | None) -> str | None:
    try:
        return HubSection(revision=revision).revision
    except ValueError as exc:  # pydantic's ValidationError
        raise HubError(f"--revision: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _recorded_section(run_dir: Path, name: str, section: Any) -> Any:
    """One section of the recipe the run recorded, validated on its own (defaults when the run has no recipe)."""
    run = RunDir(run_dir)
    path = run / RunDir.RECIPE
    if not path.exists():
        return section()
    try:
        return section.model_validate(run.recipe_data().get(name) or {})
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        where = ".".join(str(part) for part in first["loc"])
        raise HubError(f"{path}: {name}.{where}: {first['msg'].removeprefix('Value error, ')}") from None


def run_hub_settings(run_dir: Path) -> HubSection:
    """The hub section of the recipe the run recorded (defaults when it has none)."""
    return _recorded_section(run_dir, "hub", HubSection)


def run_sovereignty(run_dir: Path) -> SovereigntySection:
    """The sovereignty section of the recipe the run recorded: offline mode and its allowed hosts travel with a run."""
    return _recorded_section(run_dir, "sovereignty", SovereigntySection)


def recipe_folder(run_dir: Path) -> Path:
    """The folder of the recipe the run was trained from (relative recipe paths resolve there), else the run."""
    run = RunDir(run_dir)
    source = run.recipe_data().get("source_path") if (run / RunDir.RECIPE).is_file() else None
    return Path(source).parent if isinstance(source, str) and source else Path(run_dir)


# What a recorded hub section may decide, and what each choice is called in a message.
RUN_HUB_FIELDS = {
    "repo": "hub.repo",
    "endpoint": "hub.endpoint",
    "revision": "hub.revision",
    "private": "hub.private",
    "signing_key": "hub.signing_key",
    "include_examples": "hub.include_examples",
}


def push_settings(
    run_dir: Path,
    repo_id: str | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    public: bool | None = None,
    sign_key: Path | None = None,
    include_examples: bool | None = None,
    hub: HubSection | None = None,
    base_dir: Path | None = None,
    use_run_hub: bool = False,
) -> PushSettings:
    """Flags first, then the hub section, then $HF_ENDPOINT.

    The hub section is the given one (`sovtune run`: the user's own recipe). For `sovtune push RUN` it is the run's
    recorded section only with `use_run_hub` (--use-run-hub): a run folder may come from someone else, and its
    recipe.yaml must not choose where the user's token goes, which repository is overwritten, whether it turns
    public, which key signs or whether held-out examples leave. Without it the defaults hold (private, no examples,
    no signature) and repository and endpoint come from the flags and the environment.
    """
    if hub is None:
        if use_run_hub:
            hub, base_dir = run_hub_settings(run_dir), recipe_folder(run_dir)
        else:
            try:
                recorded = run_hub_settings(run_dir)
            except HubError:
                recorded = HubSection()  # unused anyway: a damaged hub section does not stop a push that ignores it
            _refuse_recorded_destination(run_dir, recorded, repo_id, endpoint)
            hub = HubSection()
    key = sign_key if sign_key is not None or not hub.signing_key else _signing_key(hub.signing_key, base_dir)
    return PushSettings(
        repo_id=checked_repo_id(repo_id or hub.repo, "--repo" if repo_id else "hub.repo"),
        endpoint=resolve_endpoint(endpoint, hub.endpoint),
        revision=revision or hub.revision,
        public=public,
        create_private=hub.private,
        include_examples=hub.include_examples if include_examples is None else include_examples,
        sign_key=key,
    )


def _refuse_recorded_destination(
    run_dir: Path, recorded: HubSection, repo_id: str | None, endpoint: str | None
) -> None:
    """Without --use-run-hub, a push that would need the run's recorded repository or endpoint is refused before
    anything is sent, with what the run names and how to choose; recorded settings that are left unused are said."""
    defaults = HubSection()
    named = {
        label: getattr(recorded, name)
        for name, label in RUN_HUB_FIELDS.items()
        if getattr(recorded, name) != getattr(defaults, name)
    }
    where = RunDir(run_dir) / RunDir.RECIPE
    needed = []
    if not repo_id:
        needed.append("--repo ORG/NAME")
    if not endpoint and not os.environ.get("HF_ENDPOINT"):
        needed.append("--endpoint URL (or export HF_ENDPOINT)")
    if needed and ("hub.repo" in named or "hub.endpoint" in named):
        recorded_line = ", ".join(
            f"{label} {value}" for label, value in named.items() if label in ("hub.repo", "hub.endpoint")
        )
        raise HubError(
            f"{where} names {recorded_line}, but a run folder does not choose where your token goes: pass "
            f"{' and '.join(needed)}, or --use-run-hub to push where the run's recipe says"
        )
    if not repo_id:
        raise HubError("no repository: pass --repo ORG/NAME")
    if named:
        log.info(
            f"not used from {where} (pass --use-run-hub to use them): "
            + ", ".join(f"{label}: {value}" for label, value in named.items())
        )


def push_run(run_dir: Path, **flags: Any) -> PushResult:
    """`sovtune push` as a library call: `push_settings(run_dir, **flags)`, then `push`."""
    return push(run_dir, **vars(push_settings(run_dir, **flags)))


# ---------------------------------------------------------------------------------------------------------------
# Push


def push(
    run_dir: Path,
    repo_id: str,
    endpoint: str,
    revision: str | None = None,
    public: bool | None = None,
    create_private: bool = True,
    include_examples: bool = False,
    sign_key: Path | None = None,
    token: str | None = None,
) -> PushResult:
    """Make the branch of `repo_id` hold exactly the run's publication, in one commit (none if nothing changed).

    Files an earlier push left that this run does not publish are deleted in the same commit. A new repository is
    private unless `create_private=False`; an existing one keeps its visibility unless `public` says otherwise, and
    an existing public one is refused when the push is private by default. The commit names the branch head it was
    built on, so a concurrent push fails (412) instead of silently interleaving.
    """
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    repo_id, endpoint = checked_repo_id(repo_id), resolve_endpoint(endpoint)
    branch = _checked_branch(revision) or "main"
    offline.check_endpoint_allowed(endpoint)
    published, signature = _prepared(run_dir, repo_id, branch, include_examples, sign_key)
    token = token or resolve_token(endpoint, required=True)
    target = _Target(endpoint, repo_id, branch, token, "push")
    api = HfApi(endpoint=endpoint, token=token, library_name="sovtune", library_version=__version__)
    with _client_switches():
        private, changes_visibility = _visibility(api, target, public, create_private)
        if changes_visibility and private:
            _set_visibility(api, target, private=True)  # before the upload: nothing lands in a public repository
        if branch != "main":
            _call("create the branch", target, lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
        head = _call("read the branch head", target, lambda: api.model_info(repo_id, revision=branch)).sha
        files = {path: published.files[path].source or published.files[path].read_bytes() for path in published.paths}
        if signature is not None:
            files[SIGNATURE] = signature
        uploads, deletes = _differences(api, target, head, files)
        if sign_key is not None and uploads == [SIGNATURE] and not deletes:
            # ECDSA signatures differ each time: the hub's signature is kept when it is ours over these files.
            held = _remote_bytes(api, target, head, SIGNATURE)
            if publishing.signature_holds(published, held, sign_key):
                files[SIGNATURE], uploads = held, []
        commit, url = (head, f"{endpoint}/{repo_id}/tree/{branch}")
        if uploads or deletes:
            commit, url = _commit(api, target, head, files, uploads, deletes, _run_name(run_dir))
        if changes_visibility and not private:
            _set_visibility(api, target, private=False)  # after the upload: a failed push never makes it public
    result = PushResult(
        repo_id, endpoint, branch, commit, url, private, sorted(files), uploads, deletes, changes_visibility,
        signature is not None,
    )  # fmt: skip
    _log_push(result, published)
    return result


def _visibility(api: Any, target: _Target, public: bool | None, create_private: bool) -> tuple[bool | None, bool]:
    """Create the repository if needed; (private after the push, whether the push changes it). Visibility changes
    only when `public` asks; an existing public repository is refused for a push that is private by default."""
    created_private = create_private if public is None else not public
    repo_id, endpoint = target.repo_id, target.endpoint
    _call("create the repository", target, lambda: api.create_repo(repo_id, private=created_private, exist_ok=True))
    private_now = _call("read the repository", target, lambda: api.model_info(repo_id)).private
    if public is None and private_now is False and create_private:
        raise HubError(
            f"{repo_id} exists on {endpoint} and is public, but the push is private; pass --public to publish "
            "there, or --private to make the repository private first"
        )
    wanted = private_now if public is None else not public
    return wanted, public is not None and private_now is not wanted


def _differences(api: Any, target: _Target, head: str, files: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(files the hub does not hold as they are, files it holds that are not published), from the tree at `head`."""
    tree = _tree(api, target, head)
    uploads = [path for path, content in sorted(files.items()) if not _holds(tree.get(path), content)]
    return uploads, sorted(set(tree) - set(files) - HUB_FILES)


def _commit(
    api: Any, target: _Target, head: str, files: dict[str, Any], uploads: list[str], deletes: list[str], run: str
) -> tuple[str, str]:
    """One commit on top of `head`: the uploads and the deletions; (commit id, its URL)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    def operations() -> list[Any]:
        # A fresh list per attempt: the client marks operations as committed and refuses to reuse them.
        adds = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=_upload_form(files[path])) for path in uploads]
        return adds + [CommitOperationDelete(path_in_repo=path) for path in deletes]

    commit = _upload(
        target,
        lambda: api.create_commit(
            target.repo_id,
            operations=operations(),
            commit_message=f"sovtune: adapter from run {run}",
            commit_description=(
                f"Exactly the files listed in {PUBLISH_MANIFEST}: adapter, tokenizer, chat template, report.json, "
                "manifest.json and model card."
            ),
            revision=target.revision,
            parent_commit=head,
        ),
    )
    return commit.oid, commit.commit_url


def _prepared(
    run_dir: Path, repo_id: str, branch: str, include_examples: bool, sign_key: Path | None
) -> tuple[Publication, bytes | None]:
    """The publication and its signature: made with `sign_key`, else the one `sovtune sign` left in the run."""
    existing = RunDir(run_dir) / SIGNATURE
    signed = sign_key is not None or existing.is_file()
    published = publishing.build(run_dir, repo_id, branch, include_examples, signed=signed)
    if sign_key is not None:
        return published, publishing.sign(published, sign_key)
    if signed:
        signature = existing.read_bytes()
        publishing.check_signature_covers(published, signature, str(existing))
        return published, signature
    return published, None


def _remote_bytes(api: Any, target: _Target, commit: str, path: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="sovtune-hub-") as tmp:
        _download(api, target, commit, path, Path(tmp), Path(tmp) / "files")
        return (Path(tmp) / "files" / path).read_bytes()


def _upload_form(content: Path | bytes) -> str | bytes:
    return str(content) if isinstance(content, Path) else content


def _holds(entry: Any, content: Path | bytes) -> bool:
    """Whether the hub's file (a tree entry) already has these bytes: the LFS sha256, else the git blob id."""
    if entry is None:
        return False
    data = content.read_bytes() if isinstance(content, Path) else content
    if entry.lfs is not None:
        return bool(entry.lfs.sha256 == hashlib.sha256(data).hexdigest())
    return bool(entry.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())


def _tree(api: Any, target: _Target, commit: str) -> dict[str, Any]:
    """path -> file entry of every file at `commit` (folders left out)."""
    from huggingface_hub.hf_api import RepoFile

    listing = _call(
        "list the repository's files",
        target,
        lambda: list(api.list_repo_tree(target.repo_id, revision=commit, recursive=True)),
    )
    return {entry.path: entry for entry in listing if isinstance(entry, RepoFile)}


def _set_visibility(api: Any, target: _Target, private: bool) -> None:
    _call(
        f"make the repository {'private' if private else 'public'}",
        target,
        lambda: api.update_repo_settings(target.repo_id, visibility="private" if private else "public"),
    )


def _run_name(run_dir: Path) -> str:
    manifest = RunDir(run_dir).read_json(RunDir.MANIFEST, "manifest") or {}
    return str((manifest.get("run") or {}).get("name") or run_dir.name)


def _log_push(result: PushResult, published: Publication) -> None:
    where = f"{result.endpoint}/{result.repo_id} ({result.visibility})"
    for note in published.withheld:
        log.info(f"not published: {note.removeprefix('withheld: ')}")
    signed = "signed" if result.signed else "unsigned"
    if not result.changed:
        log.info(
            f"no change: {where} already holds exactly these {len(result.files)} files ({signed}) on "
            f"{result.revision} at {result.commit}; no commit made"
        )
        return
    deleted = (
        f"; deleted {len(result.deleted)} left by an earlier push: {', '.join(result.deleted)}"
        if result.deleted
        else ""
    )
    log.info(
        f"published {len(result.files)} files ({signed}) to {where} on {result.revision} at {result.commit}: "
        f"{len(result.uploaded)} uploaded{deleted}"
    )


def _upload(target: _Target, commit: Callable[[], Any]) -> Any:
    """Commit through Xet when the hub has it; a hub without Xet answers its token endpoint with 404, and the client
    reports that as a misleading `ConnectionError ... 404`: then fall back to plain LFS, unless Xet was asked for."""
    from huggingface_hub import constants

    wanted = _xet_wanted()
    if offline.is_active():
        constants.HF_HUB_DISABLE_XET = True  # set by _client_switches: LFS only
        return _call("upload", target, commit)
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
    endpoint, so it is lifted for the call. Offline mode still holds: the endpoint was checked against the
    allow-list, the socket guard (sovtune.offline, installed for the whole command) refuses every other host, and
    Xet (whose Rust client the guard cannot see) is off.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET, constants.HF_HUB_DISABLE_TELEMETRY
    # Telemetry off: with it, building the request headers fetches an "agent harnesses" list from
    # constants.ENDPOINT (the public hub unless HF_ENDPOINT was set before import): a call nobody asked for.
    constants.HF_HUB_DISABLE_TELEMETRY = True
    if offline.is_active():
        # Xet's transfers run in Rust on sockets the guard cannot see: offline mode moves files over LFS only.
        if _xet_wanted() is True:
            raise HubError(
                "offline mode and HF_HUB_DISABLE_XET=0 do not go together: Xet transfers open their own connections, "
                "which offline mode cannot check; unset HF_HUB_DISABLE_XET (files then go over LFS)"
            )
        constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET, constants.HF_HUB_DISABLE_TELEMETRY = saved


# ---------------------------------------------------------------------------------------------------------------
# Pull


def pull(
    repo_id: str,
    endpoint: str | None = None,
    revision: str | None = None,
    out: Path | None = None,
    token: str | None = None,
    trust: Path | None = None,
) -> PullResult:
    """Download a publication into `out`: exactly the files its publish manifest lists, each checked against it and
    against the run's manifest.json; with `trust`, its signature too. A revision holding files the publish manifest
    does not list is refused before anything else is downloaded. Nothing is written to `out` unless everything
    matches: the files land in a temporary folder beside it and are renamed at the end."""
    from huggingface_hub import HfApi

    repo_id = checked_repo_id(repo_id, "REPO")
    endpoint = resolve_endpoint(endpoint)
    offline.check_endpoint_allowed(endpoint)
    if trust is not None:
        check_public_key(trust)
    out = Path(out) if out is not None else Path(repo_id.split("/")[1])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HubError(f"{out}: exists and is not empty; pass --out to a new folder or remove it")
    check_output_place(out, "the download")
    hazard = deletion_hazard(out) if os.path.lexists(out) else None  # an empty --out is replaced by the download
    if hazard is not None:
        raise HubError(f"{out}: --out refused: {hazard}; pass --out a new folder")
    token = token or resolve_token(endpoint, required=False)
    target = _Target(endpoint, repo_id, revision or "main", token, "pull")
    api = HfApi(endpoint=endpoint, token=token, library_name="sovtune", library_version=__version__)
    make_output_dir(out.parent, "the download")
    work = out.parent / f".{out.name}.pull-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        with _client_switches():
            # Pin the commit first: every file then comes from the same snapshot, even if the branch moves meanwhile.
            commit = _call("read the repository", target, lambda: api.model_info(repo_id, revision=target.revision)).sha
            where = f"{endpoint}/{repo_id}@{commit}"
            tree = _tree(api, target, commit)
            if PUBLISH_MANIFEST not in tree:
                raise HubError(
                    f"{where}: no {PUBLISH_MANIFEST}, so the files cannot be verified; it was not published by "
                    "`sovtune push` (or by a version before publish manifests): push the run again"
                )
            folder = work / "files"
            _download(api, target, commit, PUBLISH_MANIFEST, work, folder)
            listing = publishing.read_publish_manifest((folder / PUBLISH_MANIFEST).read_bytes(), where)
            _check_tree(set(tree), listing, where, trust)
            for path in sorted(publishing.listed_paths(listing) - {PUBLISH_MANIFEST}):
                _download(api, target, commit, path, work, folder)
        result = publishing.verify_published(folder, trust, where=where)
        if not result.ok:
            raise HubError(f"{where}: {result.problems()}; nothing was written")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(folder, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    matched = f"{len(result.checked)} files match {PUBLISH_MANIFEST}"
    log.info(f"pulled {repo_id}@{commit} into {out}: {matched}; {result.signature}")
    return PullResult(repo_id, endpoint, target.revision, commit, out, result.checked, result.signature or "not signed")


def _check_tree(tree: set[str], listing: dict[str, Any], where: str, trust: Path | None) -> None:
    """The revision must hold exactly the listed files (and the hub's own), before any of them is downloaded."""
    expected = publishing.listed_paths(listing)
    unlisted = sorted(tree - expected - HUB_FILES)
    absent = sorted(expected - tree)
    problems = [
        f"{label}: {', '.join(paths)}"
        for label, paths in ((f"not listed in {PUBLISH_MANIFEST}", unlisted), ("missing", absent))
        if paths
    ]
    if problems:
        raise HubError(
            f"{where}: the revision does not hold exactly the published files ({'; '.join(problems)}); "
            "it was changed after the push, nothing was downloaded"
        )
    pickles = sorted(path for path in expected if path.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise HubError(
            f"{where}: {', '.join(pickles)}: pickle weights, which can run code when loaded; sovtune publishes "
            "safetensors only, nothing was downloaded"
        )
    if trust is not None and not listing.get("signature"):
        raise HubError(f"{where}: not signed, but --trust {trust} requires a signature; nothing was downloaded")


def _download(api: Any, target: _Target, commit: str, path: str, work: Path, folder: Path) -> None:
    """One file at the pinned commit into `folder` (the client keeps its metadata beside, in `work`)."""
    from huggingface_hub import hf_hub_download

    downloaded = _call(
        "download",
        target,
        lambda: hf_hub_download(
            target.repo_id,
            path,
            revision=commit,
            endpoint=target.endpoint,
            token=target.token,
            local_dir=work / "download",
        ),
    )
    destination = folder / path
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, destination)


# ---------------------------------------------------------------------------------------------------------------
# doctor's probe


def probe(endpoint: str) -> tuple[str, str]:
    """(status, text) for doctor: one unretried GET of the endpoint's whoami with the token, if one is set. Offline
    mode decides first whether the host may be contacted at all. The token is never shown."""
    from huggingface_hub.utils import build_hf_headers, get_session

    host = endpoint_host(endpoint) or endpoint
    if not offline.allowed(host):
        return "warn", f"not contacted: offline mode allows loopback and the allow-list only (--allow-host {host})"
    token = resolve_token(endpoint, required=False)
    try:
        with _client_switches():
            headers = build_hf_headers(token=token or False, library_name="sovtune", library_version=__version__)
            response = get_session().get(f"{endpoint}/api/whoami-v2", headers=headers, timeout=10)
    except SovtuneError as exc:  # the guard
        return "warn", _first_line(exc)
    except Exception as exc:
        network = _network_error(exc) or exc
        return "warn", _scrub(f"cannot reach it ({_first_line(network) or type(network).__name__})", token)
    if response.status_code == 200:
        name = response.json().get("name") if "json" in response.headers.get("content-type", "") else None
        return "ok", f"reachable; the token is accepted{f' (user {name})' if name else ''}"
    if response.status_code == 401:
        return ("warn", "reachable; the token was rejected (401)") if token else ("ok", "reachable; no token set")
    return "warn", f"reachable, but it answered {response.status_code} to whoami"


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
            # The client wraps errors of its worker threads (LFS uploads): a guard refusal stays what it is.
            refused = next((e for e in _chain(exc) if isinstance(e, SovtuneError)), None)
            if refused is not None:
                raise refused from None
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
    if status == 404 and step == "create the branch" and code != "RepoNotFound":
        return (
            f"{step}: the hub at {endpoint} answered 404 to creating branch {rev!r} in {repo} "
            f"({code or 'no error code'}{said}); the hub may not support creating branches through its API: "
            f"create {rev!r} on the hub, or push to main"
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
