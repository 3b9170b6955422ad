"""A real etcd for the tests: Debian's ``etcd-server`` (3.4, v3 API) on loopback.

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

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", netns: str = "") -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.binary, self.data_dir, self.host, self.netns = binary, data_dir, host, netns
        self.client_port = free_loopback_port() if not netns else 2379
        self.peer_port = free_loopback_port() if not netns else 2380
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` for clients."""
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        """The ``--discovery`` form: ``etcd://HOST:PORT``."""
        return f"etcd://{self.endpoint}"

    def start(self, timeout_s: float = 20.0) -> None:
        client, peer = (
            f"http://{self.host}:{self.client_port}",
            f"http://{self.host}:{self.peer_port}",
        )
        argv = [
            self.binary, "--name", "prfaas-test", "--data-dir", str(self.data_dir),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"prfaas-test={peer}", "--initial-cluster-state", "new",
        ]  # fmt: skip
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited {self.process.returncode}: {self._log_tail()}")
            if self._is_healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {timeout_s}s: {self._log_tail()}")

    def _is_healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1.0) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

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
    server = EtcdServer(tmp_path / "etcd-data")
    server.start()
    try:
        yield server
    finally:
        server.stop()
