"""A small in-memory double of a private Hugging Face hub on 127.0.0.1, for tests of push/pull (not a product feature).

It answers the endpoints the real `huggingface_hub` client uses to publish and download (see ../shared/ANCHORS.md):
repository creation and settings (visibility), branch creation, the tree at a branch or commit, preupload, LFS batch
upload, commits that add and delete files, resolve. It has no Xet storage (like most private hubs) and can be told
to fail: bad tokens (401), read-only tokens (403), conflicts (409), a branch that moves under a commit (412),
metadata rejected by validate-yaml (400), outages (503); and to hand out LFS upload URLs on another host (as real
hubs hand out pre-signed storage URLs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
# The real hub stores these through LFS whatever their size (its default .gitattributes).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".onnx", ".msgpack", ".zip", ".tar")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    size: int
    data: bytes | None = None  # regular files keep their bytes in the commit
    lfs_oid: str | None = None  # LFS files point into the LFS store by sha256

    @property
    def pointer(self) -> bytes:
        return LFS_POINTER.format(oid=self.lfs_oid, size=self.size).encode()

    @property
    def blob_id(self) -> str:
        return git_blob_sha1(self.pointer if self.lfs_oid else self.data or b"")

    @property
    def etag(self) -> str:
        return self.lfs_oid or self.blob_id


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def commit_for(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


@dataclass
class Failure:
    status: int
    message: str
    times: int | None  # None = every time
    error_code: str | None = None
    errors: list[str] | None = None  # validate-yaml style reasons, sent as {"errors": [{"message": ...}]}
    before: Callable[[], None] | None = None  # runs instead of failing (e.g. a concurrent commit)


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra or {}


class HubDouble:
    """State of the fake hub. `url` is its endpoint; `tokens` maps token -> (user, "write" | "read")."""

    def __init__(self, lfs_threshold: int = 10 * 1024 * 1024, upload_base: str | None = None) -> None:
        self.lfs_threshold = lfs_threshold
        self.upload_base = upload_base  # where LFS upload URLs point (default: this hub)
        self.tokens: dict[str, tuple[str, str]] = {}
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.failures: dict[str, list[Failure]] = {}
        self.requests: list[dict[str, Any]] = []  # method, path, route, authorized, status
        self.lock = threading.RLock()
        self._signing_key = secrets.token_bytes(16)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> HubDouble:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # shutdown() waits for the serving loop to notice, up to one poll interval (0.5 s by default, per test)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-double", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- test controls -----------------------------------------------------------------------------------------
    def add_token(self, user: str, role: str = "write") -> str:
        token = f"hf_{role}_{secrets.token_hex(12)}"
        self.tokens[token] = (user, role)
        return token

    def fail(
        self,
        route: str,
        status: int,
        message: str = "",
        times: int | None = 1,
        error_code: str | None = None,
        errors: list[str] | None = None,
    ) -> None:
        """Answer the next `times` requests (None: all) to `route` with `status` (routes: see `_Handler.ROUTES`)."""
        with self.lock:
            failure = Failure(status, message or f"injected {status}", times, error_code, errors)
            self.failures.setdefault(route, []).append(failure)

    def before(self, route: str, action: Callable[[], None], times: int = 1) -> None:
        """Run `action` (e.g. a concurrent commit) just before the hub handles the next request to `route`."""
        with self.lock:
            self.failures.setdefault(route, []).append(Failure(0, "", times, before=action))

    def commit_files(self, repo_id: str, files: dict[str, bytes], branch: str = "main", message: str = "commit") -> str:
        """Commit directly (as another client would), bypassing HTTP."""
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo.commits[repo.branches[branch]]
            new_files = dict(parent.files)
            for path, data in files.items():
                new_files[path] = self._store(path, data)
            return self._new_commit(repo, branch, parent.oid, message, new_files)

    def delete_files(self, repo_id: str, paths: list[str], branch: str = "main", message: str = "delete") -> str:
        """Delete files in a commit directly (as another client would), bypassing HTTP."""
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo.commits[repo.branches[branch]]
            new_files = {path: stored for path, stored in parent.files.items() if path not in paths}
            return self._new_commit(repo, branch, parent.oid, message, new_files)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        stored = self.repos[repo_id].commit_for(revision).files[path]
        return self.lfs_store[stored.lfs_oid] if stored.lfs_oid else stored.data

    def is_lfs(self, repo_id: str, path: str, revision: str = "main") -> bool:
        return self.repos[repo_id].commit_for(revision).files[path].lfs_oid is not None

    # -- storage -----------------------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool) -> Repo:
        with self.lock:
            repo = Repo(repo_id=repo_id, private=private)
            self.repos[repo_id] = repo
            self._new_commit(
                repo, "main", None, "initial commit", {".gitattributes": StoredFile(len(GITATTRIBUTES), GITATTRIBUTES)}
            )
            return repo

    def _store(self, path: str, data: bytes) -> StoredFile:
        if self.wants_lfs(path, len(data)):
            oid = hashlib.sha256(data).hexdigest()
            self.lfs_store[oid] = data
            return StoredFile(size=len(data), lfs_oid=oid)
        return StoredFile(size=len(data), data=data)

    def wants_lfs(self, path: str, size: int) -> bool:
        return size > 0 and (size >= self.lfs_threshold or path.endswith(LFS_SUFFIXES))

    def _new_commit(
        self, repo: Repo, branch: str, parent: str | None, message: str, files: dict[str, StoredFile]
    ) -> str:
        listing = json.dumps(sorted((p, f.etag) for p, f in files.items())).encode()
        oid = hashlib.sha1(
            b"%s\0%s\0%s\0%d" % ((parent or "").encode(), message.encode(), listing, len(repo.commits))
        ).hexdigest()
        repo.commits[oid] = Commit(oid=oid, parent=parent, message=message, files=files)
        repo.branches[branch] = oid
        return oid

    def sign(self, oid: str) -> str:
        return hmac.new(self._signing_key, oid.encode(), hashlib.sha256).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    state: HubDouble
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes; with Nagle's algorithm on, the body waits for the client's delayed ACK
    # of the headers (up to 40 ms a response, most of a push's time here). A real hub's server sends without delay.
    disable_nagle_algorithm = True
    REPO = r"(?P<repo>[^/]+/[^/]+)"
    ROUTES: list[tuple[str, str, str]] = [
        ("POST", r"/api/repos/create", "create"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{REPO}/xet-(?P<kind>read|write)-token/(?P<rev>.+)", "xet_token"),
        ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", "model_info"),
        ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", "tree"),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)", "branch"),
        ("PUT", rf"/api/models/{REPO}/settings", "settings"),
        ("GET", rf"/api/models/{REPO}", "model_info"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    # -- plumbing ----------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.body = self._read_body()
        route, match = "unknown", None
        for verb, pattern, name in self.ROUTES:
            # Matched before unquoting: a branch such as release/v1 arrives as release%2Fv1, one path segment.
            match = re.fullmatch(pattern, parts.path) if verb == method else None
            if match:
                route = name
                break
        record = {
            "method": method,
            "path": parts.path,
            "route": route,
            "authorized": "authorization" in {k.lower() for k in self.headers},
        }
        self.state.requests.append(record)
        try:
            self._injected(route)
            if match is None:
                raise HubError(404, f"no route for {method} {parts.path}")
            arguments = {key: unquote(value) if value else value for key, value in match.groupdict().items()}
            status, headers, payload = getattr(self, f"r_{route}")(**arguments)
        except HubError as err:
            status, headers = err.status, {}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            headers["X-Error-Message"] = err.message
            payload = {"error": err.message, **err.extra}
        record["status"] = status
        self._send(status, headers, payload, head=method == "HEAD")

    def _injected(self, route: str) -> None:
        with self.state.lock:
            queue = self.state.failures.get(route) or []
            if not queue:
                return
            failure = queue[0]
            if failure.times is not None:
                failure.times -= 1
                if failure.times <= 0:
                    queue.pop(0)
        if failure.before is not None:
            failure.before()
            return
        extra = {"errors": [{"message": reason} for reason in failure.errors]} if failure.errors else None
        raise HubError(failure.status, failure.message, failure.error_code, extra)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, headers: dict[str, str], payload: Any, head: bool = False) -> None:
        if isinstance(payload, bytes):
            body, content_type = payload, "application/octet-stream"
        else:
            body, content_type = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", content_type))
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError:
            raise HubError(400, "request body is not JSON") from None

    def _base(self) -> str:
        """This hub's URL as the client named it (the Host header), like a real hub behind its own name."""
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.state.url

    # -- auth and lookups --------------------------------------------------------------------------------------
    def _token_role(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization")
        if header is None:
            return None
        token = header.removeprefix("Bearer ").strip()
        if token not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        who = self._token_role()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and who is None):
            # Like the real hub: a private repo is indistinguishable from a missing one without credentials.
            raise HubError(404 if who else 401, "Repository not found", "RepoNotFound")
        if write:
            self._require_write(who)
        return repo

    def _require_write(self, who: tuple[str, str] | None) -> None:
        if who is None:
            raise HubError(401, "You must be authenticated to write")
        if who[1] != "write":
            raise HubError(403, "You don't have the rights to write to this repo: your token is read-only")

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.commit_for(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- endpoints ---------------------------------------------------------------------------------------------
    def r_whoami(self) -> tuple:
        who = self._token_role()
        if who is None:
            raise HubError(401, "Unauthorized")
        user, role = who
        return (
            200,
            {},
            {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token", "accessToken": {"role": role}}},
        )

    def r_create(self) -> tuple:
        self._require_write(self._token_role())
        body = self._json()
        if body.get("type", "model") != "model":
            raise HubError(400, "this hub only hosts model repositories")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        url = f"{self._base()}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                # The real client reads `url` from a 409 body when exist_ok=True.
                raise HubError(409, "You already created this model repo", extra={"url": url})
            self.state.create_repo(repo_id, private=body.get("visibility", "public") == "private")
        return 200, {}, {"url": url, "name": repo_id}

    def r_model_info(self, repo: str, rev: str = "main") -> tuple:
        found = self._repo(repo)
        commit = self._commit(found, rev)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return (
            200,
            {},
            {
                "id": repo,
                "modelId": repo,
                "sha": commit.oid,
                "private": found.private,
                "siblings": siblings,
                "tags": [],
            },
        )

    def r_branch(self, repo: str, rev: str) -> tuple:
        found = self._repo(repo, write=True)
        body = self._json()
        branch = unquote(rev)
        with self.state.lock:
            if branch in found.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = self._commit(found, body.get("startingPoint") or "main")
            found.branches[branch] = start.oid
        return 200, {}, {}

    def r_settings(self, repo: str) -> tuple:
        found = self._repo(repo, write=True)
        body = self._json()
        visibility = body.get("visibility")
        if visibility is None and isinstance(body.get("private"), bool):
            visibility = "private" if body["private"] else "public"
        if visibility not in ("public", "private") or set(body) - {"visibility", "private", "gated"}:
            raise HubError(400, f"unsupported settings {body}")
        with self.state.lock:
            found.private = visibility == "private"
        return 200, {}, {}

    def r_tree(self, repo: str, rev: str, path: str | None = None) -> tuple:
        commit = self._commit(self._repo(repo), rev)
        prefix = (path or "").strip("/")
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for file_path, stored in sorted(commit.files.items()):
            if prefix and not file_path.startswith(prefix + "/"):
                continue
            relative = file_path[len(prefix) + 1 :] if prefix else file_path
            parts = relative.split("/")
            folders = parts[:-1] if recursive else parts[:1] if len(parts) > 1 else []
            for depth in range(1, len(folders) + 1):
                folder = "/".join(filter(None, [prefix, *folders[:depth]]))
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "path": file_path, "size": stored.size, "oid": stored.blob_id}
                if stored.lfs_oid:
                    entry["lfs"] = {"oid": stored.lfs_oid, "size": stored.size, "pointerSize": len(stored.pointer)}
                entries[file_path] = entry
        if prefix and not entries:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        return 200, {}, list(entries.values())

    def r_preupload(self, repo: str, rev: str) -> tuple:
        found = self._repo(repo, write=True)
        commit = self._commit(found, rev)
        answers = []
        for item in self._json().get("files", []):
            lfs = self.state.wants_lfs(item["path"], item["size"])
            existing = commit.files.get(item["path"])
            # sha256 for LFS files, git blob sha1 for regular ones: the client compares them to skip unchanged files.
            oid = None if existing is None else existing.lfs_oid if existing.lfs_oid else existing.blob_id
            answers.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {}, {"files": answers, "commitOid": commit.oid}

    def r_lfs_batch(self, repo: str) -> tuple:
        self._repo(repo, write=True)
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(400, "only uploads are supported by this hub double")
        objects = []
        for item in body.get("objects", []):
            oid, size = item["oid"], item["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in self.state.lfs_store:
                # A pre-signed URL: the client sends no Authorization header to it.
                href = f"{self.state.upload_base or self._base()}/_lfs/{oid}?sig={self.state.sign(oid)}&size={size}"
                verify = f"{self._base()}/{repo}.git/info/lfs/objects/verify"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": verify}}
            objects.append(entry)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic", "objects": objects}

    def r_lfs_upload(self, oid: str) -> tuple:
        if not hmac.compare_digest(self.query.get("sig", ""), self.state.sign(oid)):
            raise HubError(403, "upload URL signature is invalid")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "uploaded bytes do not match the announced sha256")
        with self.state.lock:
            self.state.lfs_store[oid] = self.body
        return 200, {"ETag": f'"{oid}"'}, {}

    def r_lfs_verify(self, repo: str) -> tuple:
        self._repo(repo, write=True)
        body = self._json()
        data = self.state.lfs_store.get(body.get("oid", ""))
        if data is None or len(data) != body.get("size"):
            raise HubError(404, f"object {body.get('oid')} was not uploaded")
        return 200, {}, {}

    def r_commit(self, repo: str, rev: str) -> tuple:
        found = self._repo(repo, write=True)
        branch = unquote(rev)
        if branch not in found.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self.state.lock:
            head = found.branches[branch]
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(
                    412,
                    f"A commit has happened since. Please refresh and try again. "
                    f"(parent {parent} is not the head {head} of {branch})",
                )
            files = dict(found.commits[head].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = StoredFile(size=len(data), data=data)
                elif key == "lfsFile":
                    data = self.state.lfs_store.get(value["oid"])
                    if data is None:
                        raise HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = StoredFile(size=len(data), lfs_oid=value["oid"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(folder)}
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            oid = self.state._new_commit(found, branch, head, header.get("summary", ""), files)
        return (
            200,
            {},
            {
                "commitUrl": f"{self._base()}/{repo}/commit/{oid}",
                "commitOid": oid,
                "pullRequestUrl": None,
                "success": True,
            },
        )

    def r_resolve(self, repo: str, rev: str, path: str) -> tuple:
        found = self._repo(repo)
        commit = self._commit(found, rev)
        stored = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = self.state.lfs_store[stored.lfs_oid] if stored.lfs_oid else stored.data or b""
        headers["ETag"] = f'"{stored.blob_id}"'
        if stored.lfs_oid:
            headers["X-Linked-Etag"] = f'"{stored.lfs_oid}"'
            headers["X-Linked-Size"] = str(stored.size)
        return 200, headers, data

    def r_validate_yaml(self) -> tuple:
        # Sent without a token by some clients: never require one here.
        content = self._json().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match is None:
            return 200, {}, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(match.group(1)) or {}
        except yaml.YAMLError as exc:
            raise HubError(400, "invalid YAML", extra={"errors": [{"message": f"YAML parse error: {exc}"}]}) from None
        errors = []
        for key in ("base_model", "datasets"):
            values = metadata.get(key)
            for value in [values] if isinstance(values, str) else values or []:
                if not isinstance(value, str) or not HUB_ID.match(value):
                    errors.append(
                        {
                            "message": f'"{key}" with value "{value}" is not valid. Use a model id from https://hf.co/models.'
                        }
                    )
        for index in metadata.get("model-index") or []:
            for result in index.get("results", []):
                for metric in result.get("metrics", []):
                    if not isinstance(metric.get("value"), (int, float, str)):
                        errors.append({"message": f'"model-index" metric {metric.get("type")} has no valid value'})
        if errors:
            raise HubError(400, "Invalid metadata in README.md", extra={"errors": errors})
        return 200, {}, {"warnings": []}

    def r_xet_token(self, repo: str, kind: str, rev: str) -> tuple:
        raise HubError(404, "Not Found")  # this hub has no Xet storage
