"""Offline mode: the guard refuses real outbound attempts (naming the host) and lets loopback and allowed hosts
through."""

from __future__ import annotations

import socket
import threading
from typing import Any, Iterator

import pytest

from helpers import invoke
from sovtune import offline

TEST_NET = "203.0.113.1"  # TEST-NET-3: never routed; the guard refuses before any packet is sent


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name in offline.OFFLINE_SWITCHES:
        monkeypatch.delenv(name, raising=False)  # restored after the test
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)
    yield offline
    offline.disable()


@pytest.fixture
def local_server() -> Iterator[tuple[str, int]]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"hello")
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()
    server.close()


def test_switches_are_set(guard: Any) -> None:
    import huggingface_hub.constants as hub_constants

    guard.enable()
    for name in offline.OFFLINE_SWITCHES:
        assert __import__("os").environ[name] == "1"
    assert hub_constants.HF_HUB_OFFLINE is True


def test_refuses_non_loopback_address(guard: Any) -> None:
    guard.enable(["https://hub.internal.example"])
    with pytest.raises(offline.NetworkBlocked, match=rf"{TEST_NET}:443") as info:
        socket.create_connection((TEST_NET, 443), timeout=1)
    assert "hub.internal.example" in str(info.value)  # says what is allowed
    raw = socket.socket()
    with pytest.raises(offline.NetworkBlocked, match=rf"{TEST_NET}:80"):
        raw.connect((TEST_NET, 80))
    with pytest.raises(offline.NetworkBlocked):
        raw.connect_ex((TEST_NET, 80))
    raw.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(offline.NetworkBlocked, match="8.8.8.8"):
        udp.sendto(b"dns?", ("8.8.8.8", 53))
    udp.close()
    assert [(a.call, a.host) for a in guard.refused_attempts()][:2] == [
        ("create_connection", TEST_NET),
        ("connect", TEST_NET),
    ]


def test_refuses_hub_hostname_before_resolving(guard: Any) -> None:
    guard.enable()
    with pytest.raises(offline.NetworkBlocked, match="huggingface.co"):
        socket.getaddrinfo("huggingface.co", 443)
    import httpx2

    # A real HTTP client: the refusal surfaces as is (not retried or turned into a vague ConnectionError).
    with pytest.raises(offline.NetworkBlocked, match="huggingface.co:443"):
        httpx2.get("https://huggingface.co/api/models", timeout=2)


def test_hub_client_fails_without_network(guard: Any) -> None:
    guard.enable()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    # The library's own switch stops it first; the socket guard is the backstop when a library ignores it.
    with pytest.raises((OfflineModeIsEnabled, offline.NetworkBlocked)):
        HfApi(endpoint="https://huggingface.co").model_info("gpt2")


def test_allows_loopback(guard: Any, local_server: tuple[str, int]) -> None:
    guard.enable()
    with socket.create_connection(local_server, timeout=2) as conn:
        assert conn.recv(5) == b"hello"
    with socket.create_connection(("localhost", local_server[1]), timeout=2) as conn:
        assert conn.recv(5) == b"hello"
    assert guard.refused_attempts() == []


def test_allows_configured_endpoint(guard: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allowed host name resolves, and its addresses may be connected to; a different host may not."""
    guard.enable(["https://hub.internal.example:8443"])
    state = offline._guard
    resolved, connected = [], []

    def fake_resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("198.51.100.7", port))]

    def fake_connect(sock: socket.socket, address: Any) -> None:
        connected.append(address)  # stands in for the network: nothing leaves the machine in this test

    monkeypatch.setitem(state.originals, "getaddrinfo", fake_resolve)
    monkeypatch.setitem(state.originals, "connect", fake_connect)
    info = socket.getaddrinfo("hub.internal.example", 8443)
    sock = socket.socket()
    sock.connect(info[0][4])
    sock.close()
    assert resolved == ["hub.internal.example"] and connected == [("198.51.100.7", 8443)]
    with pytest.raises(offline.NetworkBlocked, match="198.51.100.8"):
        socket.socket().connect(("198.51.100.8", 8443))
    assert [a.host for a in guard.refused_attempts()] == ["198.51.100.8"]


def test_allowed_ip_endpoint(guard: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    guard.enable(["http://198.51.100.20"])
    connected = []
    monkeypatch.setitem(offline._guard.originals, "connect", lambda sock, address: connected.append(address))
    socket.socket().connect(("198.51.100.20", 80))
    assert connected == [("198.51.100.20", 80)]


def test_disable_restores_socket(guard: Any) -> None:
    original = socket.socket.connect
    guard.enable()
    assert socket.socket.connect is not original
    offline._guard.originals["connect"] = lambda sock, address: None  # a stand-in must not outlive the guard
    guard.disable()
    assert socket.socket.connect is original and not guard.is_active()


def test_bad_endpoint_is_an_error(guard: Any) -> None:
    from sovtune.errors import SovtuneError

    with pytest.raises(SovtuneError, match="ftp://files"):
        guard.enable(["ftp://files"])


def test_attempts_a_library_swallows_are_still_counted(guard: Any) -> None:
    """What makes the full-run test below meaningful: a refusal caught and ignored by library code is recorded."""
    guard.enable()
    try:
        socket.create_connection((TEST_NET, 443), timeout=1)
    except Exception:
        pass  # e.g. telemetry or an update check that gives up quietly
    assert [(a.host, a.port) for a in guard.refused_attempts()] == [(TEST_NET, 443)]


@pytest.mark.slow
def test_full_run_in_offline_mode_attempts_no_connection(
    guard: Any, make_recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sovtune run --offline`: data, model, training, evaluation and manifest with zero outbound attempts."""
    import json

    recipe_path = make_recipe(
        "offline-run",
        train={"max_steps": 1, "batch_size": 4, "gradient_checkpointing": False, "seed": 0, "save_steps": 10},
        eval={"max_examples": 2, "samples": 0, "generation": {"max_new_tokens": 4}},
    )
    result = invoke("run", str(recipe_path), "--offline")
    assert result.exit_code in (0, 3), result.output  # 3 = a gate said no: the run itself completed
    assert guard.is_active() and __import__("os").environ["HF_HUB_OFFLINE"] == "1"
    assert guard.refused_attempts() == []
    run_dir = recipe_path.parent / "runs" / "offline-run"
    stages = [stage["stage"] for stage in json.loads((run_dir / "manifest.json").read_text())["stages"]]
    assert stages == ["train", "eval"]
    from sovtune.audit import log_path

    events = [json.loads(line) for line in log_path().read_text().splitlines()]
    assert [e["event"] for e in events if e["destination"] == str(run_dir)][-2:] == ["train", "eval"]


def test_recipe_switches_offline_and_allows_only_its_allowed_hosts(
    guard: Any, make_recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sovereignty.offline: true` needs no flag; reachable: loopback, allowed_hosts and (older name)
    allowed_endpoints, nothing else, not even the recipe's hub.endpoint unless it is listed."""
    from sovtune.cli import commands

    path = make_recipe(
        "offline-recipe",
        sovereignty={
            "offline": True,
            "allowed_hosts": ["Mirror.Internal.Example", "https://10.0.0.5:8443"],
            "allowed_endpoints": ["https://old.internal.example"],
        },
        hub={"endpoint": "https://hub.internal.example:8443"},
    )
    commands.load(path, None)
    assert guard.is_active()
    assert offline._guard.allowed_hosts == {"mirror.internal.example", "10.0.0.5", "old.internal.example"}
    for host in ("huggingface.co", "hub.internal.example"):
        with pytest.raises(offline.NetworkBlocked, match=host):
            socket.getaddrinfo(host, 443)


def test_online_recipe_installs_nothing(guard: Any, make_recipe) -> None:
    from sovtune.cli import commands

    commands.load(make_recipe("online"), None)
    assert not guard.is_active()
    commands.load(make_recipe("online-flag"), None, offline=True)
    assert guard.is_active()


def test_endpoints_are_validated_at_load(make_recipe) -> None:
    from sovtune.config import load_recipe
    from sovtune.errors import RecipeError

    for field in ("allowed_hosts", "allowed_endpoints"):
        with pytest.raises(
            RecipeError, match=rf"sovereignty.{field}: \['ftp://files', 'bad host'\] are not host names or http\(s\)"
        ):
            load_recipe(make_recipe("badend", sovereignty={field: ["ftp://files", "bad host", "https://ok.example"]}))


def test_offline_push_needs_a_private_endpoint(make_recipe) -> None:
    from sovtune.config import load_recipe
    from sovtune.errors import RecipeError

    with pytest.raises(RecipeError, match="sovereignty.offline with hub.push needs hub.endpoint"):
        load_recipe(make_recipe("offpush", sovereignty={"offline": True}, hub={"repo": "acme/x", "push": True}))
    hub = {"repo": "acme/x", "push": True, "endpoint": "https://hub.internal.example"}
    with pytest.raises(RecipeError, match=r"the hub's host hub.internal.example is not in sovereignty.allowed_hosts"):
        load_recipe(make_recipe("offpush2", sovereignty={"offline": True}, hub=hub))
    ok = load_recipe(
        make_recipe("offpush3", sovereignty={"offline": True, "allowed_hosts": ["hub.internal.example"]}, hub=hub)
    )
    assert ok.hub.endpoint == "https://hub.internal.example"
    loopback = {"repo": "acme/x", "push": True, "endpoint": "http://127.0.0.1:8080"}
    assert load_recipe(make_recipe("offpush4", sovereignty={"offline": True}, hub=loopback)).hub.push
