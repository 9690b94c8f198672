"""Offline mode: the hub libraries' offline switches plus a socket guard that refuses non-local connections.

Light (no torch, transformers or huggingface_hub), so the CLI can install it before any of those is imported.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from sovtune.config.validators import endpoint_host, is_loopback
from sovtune.errors import SovtuneError

# huggingface_hub, transformers and datasets read these at import time; set them before importing those.
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


class NetworkBlocked(SovtuneError):
    """Offline mode refused a connection. Deliberately not an OSError, so HTTP clients do not retry or hide it."""


@dataclass
class Attempt:
    call: str
    host: str
    port: int | None


@dataclass
class _Guard:
    allowed_hosts: set[str] = field(default_factory=set)
    allowed_addresses: set[str] = field(default_factory=set)
    refused: list[Attempt] = field(default_factory=list)
    reason: str | None = None  # what switched offline mode on, for the messages (e.g. "HF_HUB_OFFLINE is set")
    originals: dict[str, Any] = field(
        default_factory=dict
    )  # what the wrappers call (tests may stand in for the network)
    restore: dict[str, Any] = field(default_factory=dict)  # what `disable` puts back, whatever `originals` became
    lock: threading.Lock = field(default_factory=threading.Lock)


_guard: _Guard | None = None


def is_active() -> bool:
    return _guard is not None


def refused_attempts() -> list[Attempt]:
    """Connections refused since the guard was installed (also the ones a library caught and ignored)."""
    return list(_guard.refused) if _guard else []


def reason_for(flag: bool, recipe_offline: bool = False) -> str | None:
    """What switches offline mode on for a command, in words; None: it stays off. The hub libraries' switches in
    the environment (HF_HUB_OFFLINE & co.) count: a user who set them asked for no network."""
    if flag:
        return "--offline"
    if recipe_offline:
        return "sovereignty.offline: true"
    switched = [name for name in OFFLINE_SWITCHES if (os.environ.get(name) or "").strip().upper() in _TRUE]
    return f"{switched[0]} is set" if switched else None


def enable(allowed_hosts: Iterable[str] = ()) -> None:
    """Switch the HF libraries offline and install the guard; loopback and `allowed_hosts` (host names, IPs or
    URLs, reduced to their host) stay reachable.

    Calling it again adds hosts. Modules already imported get their cached offline flags updated too.
    """
    for name in OFFLINE_SWITCHES:
        os.environ[name] = "1"
    _update_imported_flags()
    hosts = set()
    for entry in allowed_hosts:
        host = endpoint_host(entry)
        if host is None:
            raise SovtuneError(
                f"allowed host {entry!r} is not a host name, IP address or http(s) URL; e.g. hub.internal.example"
            )
        hosts.add(host)
    global _guard
    if _guard is None:
        _guard = _Guard()
        _install(_guard)
    with _guard.lock:
        _guard.allowed_hosts |= hosts
        _guard.allowed_addresses |= {host for host in hosts if _is_ip(host)}


def enable_for(recipe: Any, extra_hosts: Iterable[str] = ()) -> None:
    """Offline mode for a recipe: only loopback, `sovereignty.allowed_hosts` and `extra_hosts` (--allow-host)."""
    enable([*recipe.sovereignty.allowed_hosts, *extra_hosts])


@contextlib.contextmanager
def session(on: bool, allowed_hosts: Iterable[str] = (), reason: str | None = None) -> Iterator[None]:
    """Offline mode for one command (a block): the guard and switches when `on`, taken away again at the end if
    this block installed them (a library caller keeps its process as it was). Already offline: hosts are added.
    `reason` (what switched it on) is named in refusals."""
    if not on:
        yield
        return
    if is_active():
        enable(allowed_hosts)
        yield
        return
    saved_env = {name: os.environ.get(name) for name in OFFLINE_SWITCHES}
    saved_flags = _imported_flags()
    enable(allowed_hosts)
    assert _guard is not None
    _guard.reason = reason
    try:
        yield
    finally:
        disable()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _restore_imported_flags(saved_flags)


def describe() -> str:
    """What offline mode lets through, for doctor."""
    hosts = ", ".join(sorted(_guard.allowed_hosts)) if _guard else ""
    return f"on: loopback{', ' + hosts if hosts else ''} only" if _guard else "off"


def allowed(host: str) -> bool:
    """Whether a connection to `host` would pass now (always, when the guard is not installed)."""
    return _guard is None or _allowed(_guard, host)


def check_endpoint_allowed(endpoint: str, what: str = "the hub") -> None:
    """Refuse a URL whose host offline mode does not allow, before any name lookup or connection is attempted."""
    host = endpoint_host(endpoint)
    if _guard is None or host is None or _allowed(_guard, host):
        return
    why = f" ({_guard.reason})" if _guard.reason else ""
    raise NetworkBlocked(
        f"offline mode{why}: {what} at {endpoint} is not on the allow-list ({_allow_list(_guard)}); nothing was "
        f"sent. If {host} is your own server, add it to sovereignty.allowed_hosts or pass --allow-host {host}"
    )


def _allow_list(guard: _Guard) -> str:
    hosts = ", ".join(sorted(guard.allowed_hosts))
    return f"allowed: loopback, {hosts}" if hosts else "allowed: loopback only"


def disable() -> None:
    """Remove the guard (tests; a process that goes offline normally stays offline). Env switches stay set."""
    global _guard
    if _guard is None:
        return
    socket.socket.connect = _guard.restore["connect"]
    socket.socket.connect_ex = _guard.restore["connect_ex"]
    socket.socket.sendto = _guard.restore["sendto"]
    socket.getaddrinfo = _guard.restore["getaddrinfo"]
    socket.create_connection = _guard.restore["create_connection"]
    _guard = None


# The offline flags hub libraries cache at import time.
_FLAG_MODULES = {
    "huggingface_hub.constants": ("HF_HUB_OFFLINE",),
    "datasets.config": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
}


def _imported_flags() -> dict[tuple[str, str], Any]:
    return {
        (module_name, name): getattr(sys.modules[module_name], name)
        for module_name, names in _FLAG_MODULES.items()
        if module_name in sys.modules
        for name in names
        if hasattr(sys.modules[module_name], name)
    }


def _restore_imported_flags(flags: dict[tuple[str, str], Any]) -> None:
    for (module_name, name), value in flags.items():
        setattr(sys.modules[module_name], name, value)


def _update_imported_flags() -> None:
    _restore_imported_flags({key: True for key in _imported_flags()})


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _allowed(guard: _Guard, host: str) -> bool:
    host = host.lower().rstrip(".")
    return is_loopback(host) or host in guard.allowed_hosts or host in guard.allowed_addresses


def _refuse(guard: _Guard, call: str, host: str, port: Any) -> None:
    port_number = port if isinstance(port, int) else None
    with guard.lock:
        guard.refused.append(Attempt(call=call, host=host, port=port_number))
    where = f"{host}:{port}" if port_number is not None else host
    raise NetworkBlocked(
        f"offline mode refused a connection to {where} ({_allow_list(guard)}); "
        "add the host to sovereignty.allowed_hosts (or pass --allow-host) if it is your own server, or run without "
        "offline mode"
    )


def _check_address(guard: _Guard, call: str, family: int, address: Any) -> None:
    # AF_UNIX sockets (paths) never leave the machine.
    if family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple) or not address:
        return
    host, port = str(address[0]), address[1] if len(address) > 1 else None
    if not _allowed(guard, host):
        _refuse(guard, call, host, port)


def _install(guard: _Guard) -> None:
    originals = guard.originals
    originals.update(
        connect=socket.socket.connect,
        connect_ex=socket.socket.connect_ex,
        sendto=socket.socket.sendto,
        getaddrinfo=socket.getaddrinfo,
        create_connection=socket.create_connection,
    )
    guard.restore.update(originals)

    def connect(self: socket.socket, address: Any) -> None:
        _check_address(guard, "connect", self.family, address)
        return originals["connect"](self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_address(guard, "connect_ex", self.family, address)
        return originals["connect_ex"](self, address)

    def sendto(self: socket.socket, data: bytes, *args: Any) -> int:
        # UDP: sendto(data, address) or sendto(data, flags, address); DNS queries would go this way.
        _check_address(guard, "sendto", self.family, args[-1] if args else None)
        return originals["sendto"](self, data, *args)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        # Refuse at name resolution so not even a DNS query for an outside host leaves the machine.
        name = host.decode() if isinstance(host, bytes) else host
        if name not in (None, "") and not _allowed(guard, str(name)):
            _refuse(guard, "getaddrinfo", str(name), port)
        results = originals["getaddrinfo"](host, port, *args, **kwargs)
        if name is not None and str(name).lower().rstrip(".") in guard.allowed_hosts:
            # An allowed endpoint's resolved addresses may be connected to.
            with guard.lock:
                guard.allowed_addresses |= {str(info[4][0]) for info in results}
        return results

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        host = str(address[0])
        if not _allowed(guard, host):
            _refuse(guard, "create_connection", host, address[1])
        return originals["create_connection"](address, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    socket.create_connection = create_connection
