"""A real etcd for the tests: Debian's ``etcd-server`` (3.4, v3 API) on loopback, started by
``trtllm_prfaas.testbed.etcd`` (as the namespace testbed starts its own).

``make test`` installs the package when it is missing (the ``etcd-tool`` target); without the
binary the tests that need etcd skip with that reason. Each server gets its own data directory
and two free loopback ports, and is stopped by PID (SIGTERM, then SIGKILL) even when a test fails.
``stop()`` and ``start()`` let a test take etcd away and bring it back on the same ports and data.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trtllm_prfaas.testbed.etcd import start_etcd

__all__ = ["EtcdServer", "etcd_binary", "free_loopback_port", "running_etcd"]


def etcd_binary() -> str | None:
    return shutil.which("etcd") or next(
        (p for p in ("/usr/bin/etcd", "/usr/sbin/etcd") if Path(p).exists()), None
    )


def free_loopback_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member listening for clients on ``host:client_port``."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", netns: str = "") -> None:
        """``directory`` holds its data (``etcd/``) and log (``etcd.log``)."""
        self.directory, self.host, self.netns = directory, host, netns
        self.client_port = free_loopback_port() if not netns else 2379
        self.peer_port = free_loopback_port() if not netns else 2380
        self.process: subprocess.Popen[str] | None = None

    @property
    def data_dir(self) -> Path:
        return self.directory / "etcd"

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` for clients."""
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        """The ``--discovery`` form: ``etcd://HOST:PORT``."""
        return f"etcd://{self.endpoint}"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start (or start again, on the same ports and data) and wait until healthy."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        peer_url = f"http://{self.host}:{self.peer_port}"
        self.process = start_etcd(prefix, [self.host], self.directory,
                                  time.monotonic() + timeout_s, client_port=self.client_port,
                                  peer_url=peer_url)  # fmt: skip

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crashed etcd."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10.0)
        self.process = None


def running_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """Yield a started etcd (skip when the binary is missing); stop it afterwards."""
    if etcd_binary() is None:
        pytest.skip("etcd is not installed: `make test` installs Debian's etcd-server (as root)")
    server = EtcdServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
