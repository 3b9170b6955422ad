"""Fixtures for relay tests: configs, key pairs, builders that track what they open, and an
autouse leak check (no new threads, no relay contexts left open, no new TCP sockets)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from zmq.utils.garbage import GarbageCollectorThread

from trtllm_prfaas.transport import (
    CurveKeys,
    RelayConfig,
    RelayReceiver,
    RelaySecurity,
    RelaySender,
    generate_keypair,
)


def _threads() -> set[threading.Thread]:
    # pyzmq's process-wide zero-copy GC thread is pyzmq's, started once and never ours to join.
    return {t for t in threading.enumerate() if not isinstance(t, GarbageCollectorThread)}


def _tcp_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


@pytest.fixture(autouse=True)
def leak_check() -> Iterator[None]:
    threads, sockets = _threads(), _tcp_fds()
    yield
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and (_threads() - threads or _tcp_fds() - sockets):
        time.sleep(0.02)
    assert not _threads() - threads, f"leaked threads: {_threads() - threads}"
    assert not _tcp_fds() - sockets, f"leaked sockets: {_tcp_fds() - sockets}"


def make_config(**overrides: Any) -> RelayConfig:
    """A small plaintext config for loopback tests."""
    fields: dict[str, Any] = {
        "security": RelaySecurity.insecure_plaintext(),
        "num_streams": 4,
        "chunk_bytes": 64 << 10,
        "credit_bytes": 8 << 20,
        "poll_interval_s": 0.02,
        "connect_timeout_s": 5.0,
    }
    fields.update(overrides)
    return RelayConfig(**fields)


@pytest.fixture(scope="session")
def curve_keys() -> dict[str, tuple[bytes, bytes]]:
    return {name: generate_keypair() for name in ("server", "client", "intruder")}


def curve_security(keys: dict[str, tuple[bytes, bytes]], client: str = "client") -> RelaySecurity:
    """Curve security with ``keys[client]`` as the client pair; only "client" is allowed."""
    return RelaySecurity(
        curve=CurveKeys(
            server_public_key=keys["server"][0],
            server_secret_key=keys["server"][1],
            client_public_key=keys[client][0],
            client_secret_key=keys[client][1],
            allowed_client_public_keys=frozenset({keys["client"][0]}),
        )
    )


class Relay:
    """Builds senders/receivers and checks at teardown that every one was closed."""

    def __init__(self) -> None:
        self.opened: list[RelaySender | RelayReceiver] = []

    def receiver(
        self, config: RelayConfig, endpoint: str = "tcp://127.0.0.1:0", **kw: Any
    ) -> RelayReceiver:
        rx = RelayReceiver(config, endpoint, **kw)
        self.opened.append(rx)
        return rx

    def sender(self, endpoint: str, config: RelayConfig, **kw: Any) -> RelaySender:
        tx = RelaySender(endpoint, config, **kw)
        self.opened.append(tx)
        return tx

    def assert_closed(self) -> None:
        for obj in self.opened:
            assert obj._ctx.closed, f"{type(obj).__name__} left its zmq context open"


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay()
    yield r
    r.assert_closed()


def free_loopback_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Waiter = Callable[[Callable[[], bool], float], bool]


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
