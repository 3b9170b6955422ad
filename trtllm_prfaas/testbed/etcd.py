"""One etcd member for the namespace testbed (``testbed/hosts.py``): Debian's ``etcd-server``
(3.4, v3 API) started as a process, in a network namespace when given a command prefix, and
stopped by PID. Membership only: no replication, its data in the run's private directory."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from trtllm_prfaas.errors import PrfaasError
from trtllm_prfaas.testbed.processes import stop_process

__all__ = ["ETCD_CLIENT_PORT", "start_etcd", "stop_etcd"]

ETCD_CLIENT_PORT = 2379
ETCD_PEER_URL = "http://127.0.0.1:2380"  # one member: peers only on its own loopback


def start_etcd(
    prefix: Sequence[str],
    client_hosts: Sequence[str],
    directory: Path,
    deadline: float,
    *,
    client_port: int = ETCD_CLIENT_PORT,
    peer_url: str = ETCD_PEER_URL,
) -> subprocess.Popen[str]:
    """etcd under ``prefix`` (``ip netns exec NS``), serving clients on ``client_hosts`` (the
    first is advertised) at ``client_port``, healthy (checked from this namespace through the
    last of them) by ``deadline``; PrfaasError with its log's tail otherwise. On the root
    namespace's loopback (benchmarks) pass free ports: ``client_port`` and ``peer_url``."""
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    if not Path(binary).exists():
        raise PrfaasError("membership etcd needs etcd (Debian: apt-get install etcd-server)")
    clients = [f"http://{host}:{client_port}" for host in client_hosts]
    argv = [
        *prefix, binary, "--name", "prfaas", "--data-dir", str(directory / "etcd"),
        "--listen-client-urls", ",".join(clients), "--advertise-client-urls", clients[0],
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"prfaas={peer_url}", "--initial-cluster-state", "new",
    ]  # fmt: skip
    log_path = directory / "etcd.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1000:]
            raise PrfaasError(f"etcd exited with {process.returncode}: {tail}")
        if _is_healthy(f"{clients[-1]}/health"):
            return process
        time.sleep(0.1)
    stop_process(process, 10.0)
    raise PrfaasError(f"etcd did not become healthy in time (log: {log_path})")


def stop_etcd(process: subprocess.Popen[str], timeout_s: float = 10.0) -> int:
    """SIGTERM (SIGKILL past ``timeout_s``); 0 for a clean stop: etcd cleans up on SIGTERM,
    then re-raises it on itself, so its clean exit reads as -SIGTERM."""
    code = stop_process(process, timeout_s)
    return 0 if code == -signal.SIGTERM else code


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return b'"true"' in response.read()
    except OSError:
        return False
