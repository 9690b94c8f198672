"""Offline mode: the hub libraries' offline switches plus a socket guard that refuses non-local connections.

Light (no torch, transformers or huggingface_hub), so the CLI can install it before any of those is imported.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from sovtune.config.validators import endpoint_host
from sovtune.errors import SovtuneError

# huggingface_hub, transformers and datasets read these at import time; set them before importing those.
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


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


def enable(allowed_endpoints: Iterable[str] = ()) -> None:
    """Switch the HF libraries offline and install the guard; loopback and `allowed_endpoints` stay reachable.

    Calling it again adds endpoints. Modules already imported get their cached offline flags updated too.
    """
    for name in OFFLINE_SWITCHES:
        os.environ[name] = "1"
    _update_imported_flags()
    hosts = set()
    for endpoint in allowed_endpoints:
        host = endpoint_host(endpoint)
        if host is None:
            raise SovtuneError(
                f"allowed endpoint {endpoint!r} is not an http(s) URL or host name; e.g. https://hub.internal"
            )
        hosts.add(host)
    global _guard
    if _guard is None:
        _guard = _Guard()
        _install(_guard)
    with _guard.lock:
        _guard.allowed_hosts |= hosts
        _guard.allowed_addresses |= {host for host in hosts if _is_ip(host)}


def enable_for(recipe: Any) -> None:
    """Offline mode for a recipe: its allowed endpoints and its hub endpoint (the configured private hub) stay
    reachable."""
    endpoints = list(recipe.sovereignty.allowed_endpoints)
    hub = getattr(recipe, "hub", None)
    if hub is not None and hub.endpoint:
        endpoints.append(hub.endpoint)
    enable(endpoints)


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


def _update_imported_flags() -> None:
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _allowed(guard: _Guard, host: str) -> bool:
    host = host.lower().rstrip(".")
    return _is_loopback(host) or host in guard.allowed_hosts or host in guard.allowed_addresses


def _refuse(guard: _Guard, call: str, host: str, port: Any) -> None:
    port_number = port if isinstance(port, int) else None
    with guard.lock:
        guard.refused.append(Attempt(call=call, host=host, port=port_number))
    where = f"{host}:{port}" if port_number is not None else host
    allowed = ", ".join(sorted(guard.allowed_hosts)) or "none"
    raise NetworkBlocked(
        f"offline mode refused a connection to {where} (allowed: loopback, {allowed}); "
        "add the host to sovereignty.allowed_endpoints if it is your own server, or run without offline mode"
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
