"""Value checks shared by the schema and the commands: local path or hub id, repository ids, endpoints, hosts."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX: the longest file or folder name


def check_path_text(value: str) -> str:
    """`value` if the operating system can take it as a path; else ValueError saying why (checked when the recipe
    loads, so a path no file system accepts is one line, not a crash of the first stage that looks it up)."""
    shown = repr(value) if len(value) <= 60 else f"{value[:40]!r}... ({len(value)} characters)"
    if "\0" in value:
        raise ValueError(f"{shown} holds a NUL character, which no path can; remove it")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise ValueError(f"{shown} is longer than {MAX_PATH_BYTES} bytes, the longest path the system takes")
    longest = max(value.split("/"), key=lambda part: len(part.encode("utf-8", "surrogateescape")))
    if len(longest.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise ValueError(f"{shown} has a name longer than {MAX_NAME_BYTES} bytes, the longest a file system takes")
    return value


def check_optional_path_text(value: str | None) -> str | None:
    return None if value is None else check_path_text(value)


def looks_like_local_path(value: str) -> bool:
    """A hub id is `name` or `org/name`; anything with more slashes, a dot prefix or a drive is a path."""
    return (
        value.startswith(("/", "./", "../", "~", "$"))
        or value.count("/") > 1
        or value.endswith((".jsonl", ".json", ".csv", ".parquet", ".txt"))
    )


# A repository id as the hub accepts it, with the namespace the toolkit requires (ORG/NAME).
REPO_ID_HELP = "ORG/NAME with letters, digits, '-', '_' or '.' (no '--' or '..', each part at most 96 characters)"


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is ORG/NAME as the hub accepts it; else ValueError saying what to write."""
    from huggingface_hub.errors import HFValidationError

    # huggingface_hub.utils lists validate_repo_id in an `__all__` it builds at run time, which mypy cannot read, so
    # it reports the documented public name as not exported.
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1 and not repo_id.endswith(".git")
    except HFValidationError:
        valid = False
    if not valid:
        raise ValueError(f"{repo_id!r} is not a repository id; write {REPO_ID_HELP}, e.g. my-org/support-adapter")
    return repo_id


def check_endpoint(endpoint: str) -> str:
    """An http(s) URL with a host and no credentials in it (a token in a URL ends up in logs); trailing / dropped."""
    try:
        parts = urlsplit(endpoint)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{endpoint!r} is not an http(s) URL; write e.g. https://hub.internal.example")
    if parts.username or parts.password:
        raise ValueError("the endpoint URL contains credentials; remove them and set HF_TOKEN instead")
    return endpoint.rstrip("/")


_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def endpoint_host(endpoint: str) -> str | None:
    """The host of `https://hub.internal:8443/path`, `hub.internal:8443`, `10.0.0.5` or `[::1]`; None if malformed."""
    try:
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        host = parts.hostname
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return None
    if not host or (parts.scheme and parts.scheme not in ("http", "https")):
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower() if _HOST.match(host) else None


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or a loopback name: never leaves the machine."""
    host = host.lower().rstrip(".")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
