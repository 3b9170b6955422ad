"""The namespace testbed: each datacenter a network namespace (a host), each worker and each
router replica its own process in its datacenter, joined by a shaped WAN (``testbed/netns.py``).

- dc-remote (the PrfaaS cluster): the PrfaaS prefill workers;
- dc-local (the local PD cluster): the PD-P and PD-D workers, ``num_routers`` ``prfaas router``
  processes and, with ``membership="etcd"``, an etcd member;
- the root namespace: clients, which reach the routers at ``Network.local_address``.

Workers bind their control and relay sockets on their datacenter's WAN address, so a remote
prefill worker's KV reaches the decode worker through the shaped WAN, and the routers reach the
remote workers' control sockets across it too. Curve is on (relay and control plane) unless
``TestbedConfig.curve`` is False: keys are written fresh into the run's private directory (PrfaaS
prefill workers hold the relay sender's keys, local PD workers both roles', every router the
router's key file). Membership is the static ``--worker`` list, or etcd (workers register with
``--discovery``, routers watch it), whichever ``HostsConfig.membership`` says.

Everything is undone on ``close()`` and when ``start()`` fails: routers, workers and etcd are
stopped by PID, then the namespaces are deleted (stopping by PID anything left inside).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtllm_prfaas.config import TestbedKeys, load_control_security, write_testbed_keyset
from trtllm_prfaas.errors import ConfigError, PrfaasError
from trtllm_prfaas.testbed.etcd import ETCD_CLIENT_PORT, start_etcd, stop_etcd
from trtllm_prfaas.testbed.netns import Network, QdiscStats, WanShape
from trtllm_prfaas.testbed.processes import (
    WorkerProcess,
    launch_prfaas,
    read_ready_line,
    start_workers,
    stop_process,
)
from trtllm_prfaas.testbed.spec import TestbedConfig
from trtllm_prfaas.transport import RelaySecurity

__all__ = ["HostsConfig", "NetnsTestbed", "RouterReplica"]

MEMBERSHIPS = ("static", "etcd")
REPLICA_PORT_STEP = 10  # router replica i serves on each configured port + 10 * i


@dataclass(frozen=True, kw_only=True)
class HostsConfig:
    """One namespace testbed: the embedded testbed's shape plus the WAN and the routers.
    ``testbed.grpc_port``/``metrics_port``/``http_port``/``openai_port`` are replica 0's ports on
    dc-local's root-link address (0: a free port; None: no such door)."""

    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    wan: WanShape = field(default_factory=WanShape)
    num_routers: int = 1
    membership: str = "etcd"  # workers register, routers watch (--discovery); or "static"
    etcd_namespace: str = "prfaas"  # the key prefix of this deployment in etcd
    fixed_threshold: bool = False  # True: routers keep threshold_tokens (no control loop)
    run_id: str = ""  # "": a fresh random one
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.num_routers < 1:
            raise ConfigError(f"num_routers must be >= 1, got {self.num_routers}")
        if self.membership not in MEMBERSHIPS:
            raise ConfigError(f"membership {self.membership!r}: one of {list(MEMBERSHIPS)}")
        if self.startup_timeout_s <= 0:
            raise ConfigError("startup_timeout_s must be > 0")


@dataclass
class RouterReplica:
    """One ``prfaas router`` process in dc-local; ``ready`` is its JSON ready line."""

    name: str
    process: subprocess.Popen[str]
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``HOST:PORT`` of its KServe v2 gRPC door, as a client in the root namespace dials."""
        return str(self.ready["listen"])

    @property
    def metrics_url(self) -> str | None:
        return self.ready.get("metrics")

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM (in-flight requests get the router's grace), SIGKILL past ``timeout_s``."""
        code = stop_process(self.process, timeout_s)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


class NetnsTestbed:
    """Namespaces, etcd, workers and routers of one run; a context manager."""

    __test__ = False

    def __init__(self, config: HostsConfig, log_level: str = "ERROR") -> None:
        self.config = config
        self.log_level = log_level
        self.network = Network(config.wan, config.run_id)
        self.workers: dict[str, WorkerProcess] = {}
        self.routers: list[RouterReplica] = []
        self.etcd: subprocess.Popen[str] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix=f"prfaas-netns-{self.network.run_id}-")
        self.directory = Path(self._dir.name)
        self._keys: TestbedKeys | None = None

    @property
    def run_id(self) -> str:
        return self.network.run_id

    @property
    def etcd_url(self) -> str:
        """``--discovery`` for processes in either datacenter (dc-local's WAN address)."""
        return f"etcd://{self.network.wan_address('dc-local')}:{ETCD_CLIENT_PORT}"

    @property
    def control_security(self) -> RelaySecurity:
        """The routers' keys to the workers' control sockets (plaintext without Curve)."""
        if self._keys is None:
            return RelaySecurity.insecure_plaintext()
        return load_control_security(self._keys.router, False, "router")

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        try:
            self.network.create()
            if self.config.testbed.curve:
                self._keys = write_testbed_keyset(self.directory / "keys")
            if self.config.membership == "etcd":
                hosts = (self.network.wan_address("dc-local"), self.network.local_address)
                prefix = self.network.exec_prefix("dc-local")
                self.etcd = start_etcd(prefix, hosts, self.directory, deadline)
            prefixes = {
                name: self.network.exec_prefix(self._datacenter(name))
                for name in self.config.testbed.worker_args()
            }
            self.workers = start_workers(
                self._worker_specs(),
                timeout_s=max(1.0, deadline - time.monotonic()),
                log_level=self.log_level,
                control_security=self.control_security,
                prefixes=prefixes,
            )
            self.routers = self._start_routers(deadline)
        except BaseException:
            self.close()
            raise

    def close(self) -> dict[str, int]:
        """Stop routers, workers and etcd by PID, delete the namespaces; returns exit codes by
        process name. Idempotent."""
        # One SIGTERM to each at once, so their drains overlap; SIGKILL for the late ones.
        _stop_all([router.process for router in self.routers], 40.0)
        codes = {router.name: router.stop() for router in self.routers}
        _stop_all([proc.process for proc in self.workers.values()], 15.0)
        codes.update({name: proc.stop() for name, proc in self.workers.items()})
        self.routers, self.workers = [], {}
        if self.etcd is not None:
            codes["etcd"] = stop_etcd(self.etcd)
            self.etcd = None
        self.network.close()
        self._dir.cleanup()
        return codes

    def __enter__(self) -> NetnsTestbed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ the WAN
    def set_wan_rate(self, rate: str, burst: str | None = None) -> WanShape:
        """Change the WAN's rate (and burst) live, at both ends (``tc qdisc change``)."""
        return self.network.set_wan_rate(rate, burst)

    def wan_stats(self, datacenter: str = "dc-remote") -> QdiscStats:
        """The WAN counters at ``datacenter``'s end (dc-remote's carries the relayed KV)."""
        return self.network.wan_stats(datacenter)

    # ------------------------------------------------------------------------ processes
    def _datacenter(self, worker_name: str) -> str:
        prfaas = self.config.testbed.prfaas_cluster
        return "dc-remote" if worker_name.startswith(f"{prfaas}-") else "dc-local"

    def _worker_specs(self) -> dict[str, list[str]]:
        specs: dict[str, list[str]] = {}
        for name, args in self.config.testbed.worker_args().items():
            datacenter = self._datacenter(name)
            host = self.network.wan_address(datacenter)
            where = ["--control", f"tcp://{host}:0", "--relay", f"tcp://{host}:0"]
            specs[name] = [*args, *where, *self._worker_security(datacenter)]
            if self.config.membership == "etcd":
                specs[name] += [
                    "--discovery",
                    self.etcd_url,
                    "--namespace",
                    self.config.etcd_namespace,
                ]
        return specs

    def _worker_security(self, datacenter: str) -> list[str]:
        if self._keys is None:
            return ["--plaintext"]
        keys = self._keys.sender if datacenter == "dc-remote" else self._keys.both
        return ["--curve-keys", str(keys)]

    def _start_routers(self, deadline: float) -> list[RouterReplica]:
        routers = []
        try:
            for i in range(self.config.num_routers):
                prefix = self.network.exec_prefix("dc-local")
                process = launch_prfaas("router", self.router_args(i), log_level=self.log_level,
                                        prefix=prefix)  # fmt: skip
                routers.append(RouterReplica(f"router-{i}", process))
            for router in routers:
                router.ready = read_ready_line(router.process, router.name, deadline)
                if self.config.membership == "etcd":
                    self._wait_discovered(router, deadline)
        except BaseException:
            for router in routers:
                router.stop(10.0)
            raise
        return routers

    def _wait_discovered(self, router: RouterReplica, deadline: float) -> None:
        """Until ``router`` knows every worker from etcd (its ready line names those it had
        by then; ``prfaas_discovery_workers`` counts the rest as they join)."""
        num_workers = len(self.workers)
        if len(router.ready.get("workers", {})) >= num_workers or router.metrics_url is None:
            return
        while time.monotonic() < deadline:
            if _metric(router.metrics_url, "prfaas_discovery_workers") >= num_workers:
                return
            time.sleep(0.2)
        raise PrfaasError(f"{router.name} did not discover the {num_workers} workers in time")

    def router_args(self, i: int) -> list[str]:
        """``prfaas router`` flags of replica ``i`` (needs the workers' ready lines)."""
        t = self.config.testbed
        host = self.network.local_address

        def listen(port: int | None) -> str:
            return f"{host}:{port + REPLICA_PORT_STEP * i if port else 0}"

        args = ["--listen", listen(t.grpc_port), "--prfaas-cluster", t.prfaas_cluster,
                "--threshold-tokens", str(t.threshold_tokens),
                "--link-gbps", str(t.link_gbps or self.network.shape.rate_gbps)]  # fmt: skip
        doors = (("--metrics-listen", t.metrics_port), ("--http-listen", t.http_port),
                 ("--openai-listen", t.openai_port))  # fmt: skip
        args += [arg for flag, port in doors if port is not None for arg in (flag, listen(port))]
        if self.config.fixed_threshold:
            args.append("--fixed-threshold")
        if t.tokenizer_dir:
            args += ["--tokenizer", t.tokenizer_dir]
        keys = self._keys
        args += ["--curve-keys", str(keys.router)] if keys is not None else ["--plaintext"]
        if self.config.membership == "etcd":
            return [*args, "--discovery", self.etcd_url, "--namespace", self.config.etcd_namespace]
        return [*args, *self.worker_flags()]

    def worker_flags(self) -> list[str]:
        """The static list: ``--worker CLUSTER/ROLE=HOST:PORT`` for every worker."""
        flags = []
        for name, args in self.config.testbed.worker_args().items():
            role, cluster = args[args.index("--role") + 1], args[args.index("--cluster") + 1]
            address = self.workers[name].control.removeprefix("tcp://")
            flags += ["--worker", f"{cluster}/{role}={address}"]
        return flags

    # ------------------------------------------------------------------------ report
    def describe(self) -> str:
        t, net = self.config.testbed, self.network
        lines = [f"run {self.run_id}: namespaces {net.namespace('dc-remote')} and "
                 f"{net.namespace('dc-local')}"]  # fmt: skip
        for router in self.routers:
            doors = [f"gRPC {router.address}"]
            doors += [
                f"{k} {router.ready[k]}"
                for k in ("metrics", "http", "openai")
                if router.ready.get(k)
            ]
            lines.append(
                f"{router.name:10} pid {router.process.pid:<7} (dc-local) " + ", ".join(doors)
            )
        for name, proc in self.workers.items():
            dc = self._datacenter(name)
            lines.append(
                f"worker {name:22} pid {proc.process.pid:<7} ({dc}) control {proc.control}"
            )
        if self.etcd is not None:
            lines.append(f"etcd pid {self.etcd.pid} (dc-local) {self.etcd_url}")
        s = net.shape
        lines.append(
            f"WAN dc-remote <-> dc-local: tbf rate {s.rate} burst {s.burst} latency {s.latency}; "
            f"threshold t = {t.threshold_tokens} tokens; membership {self.config.membership}; "
            f"relay and control {'Curve-encrypted' if self._keys else 'PLAINTEXT'}"
        )
        lines.append(f"change the WAN live: prfaas netns wan {self.run_id} --rate 100mbit")
        return "\n".join(lines)


def _stop_all(processes: list[subprocess.Popen[str]], timeout_s: float) -> None:
    """SIGTERM every process still running, wait up to ``timeout_s`` for all of them, SIGKILL
    those still there (each is signalled once: a second SIGTERM may cut a drain short)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)


def _metric(url: str, name: str) -> float:
    """One unlabelled sample of the Prometheus text at ``url`` (0 when absent)."""
    with urllib.request.urlopen(url, timeout=5.0) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0
