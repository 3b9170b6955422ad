"""Datacenters as Linux network namespaces joined by a shaped WAN: the network of
``prfaas netns up`` (``testbed/hosts.py`` runs the processes in it).

One run (``RUN``: a short random id, so runs side by side never meet)::

    root namespace         prfaas-RUN-dc-local                   prfaas-RUN-dc-remote
    clients  pfRUN ═══════ host0          wan0 ══ tbf ════ tbf ══ wan0
    10.201.N.2/30          10.201.N.1/30  10.200.0.2/30          10.200.0.1/30

- the WAN is one veth pair between the two datacenters, shaped at both ends with
  ``tc qdisc ... root tbf rate R burst B latency L``; :meth:`Network.set_wan_rate` changes it live
  (``tc qdisc change``), and :meth:`Network.wan_stats` reads its counters (``tc -s``). The KV relay
  (dc-remote prefill -> dc-local decode) leaves through dc-remote's end, so that end's byte
  counter is at least the relayed KV bytes. This kernel has no ``netem``: no added delay.
- the WAN addresses exist only inside the two namespaces (the same in every run); the root
  namespace reaches dc-local through a second veth pair whose /30 is taken from 10.201.0.0/16
  under a lock file, skipping addresses the root namespace already has. dc-remote is not
  reachable from the root namespace at all: clients reach the router in dc-local.
- :meth:`Network.close` deletes both namespaces (and so every interface in them) after stopping
  any process still inside them by PID (``ip netns pids``). :func:`delete_run` does the same for
  a run whose owner died (``prfaas netns down RUN``).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's ``ip`` and ``tc``.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trtllm_prfaas.errors import ConfigError, PrfaasError
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = [
    "DATACENTERS",
    "Network",
    "QdiscStats",
    "WanShape",
    "delete_run",
    "list_runs",
    "missing_requirements",
    "parse_rate_bits",
]

log = get_logger(__name__)

DATACENTERS = ("dc-remote", "dc-local")
PREFIX = "prfaas-"
WAN_DEVICE = "wan0"
HOST_DEVICE = "host0"  # dc-local's end of the link to the root namespace
WAN_ADDRESSES = {"dc-remote": "10.200.0.1", "dc-local": "10.200.0.2"}  # /30, namespaces only
ROOT_POOL = ipaddress.IPv4Network("10.201.0.0/16")  # root <-> dc-local /30s
LOCK_PATH = Path("/run/prfaas-netns.lock")
COMMAND_TIMEOUT_S = 20.0

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_BYTES = re.compile(r"^(\d+)(b|kb|mb)?$")
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_BYTE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2}


def parse_rate_bits(text: str, what: str = "rate") -> float:
    """A tc rate in bits (``100mbit``, ``1gbit``, ``2.5gbit``) -> bits per second. tc's own
    ``bps`` means bytes per second: refused here so that nobody is off by 8."""
    match = _RATE.match(text.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"{what} {text!r}: expected a positive rate like 100mbit or 1gbit")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


def parse_bytes(text: str, what: str = "burst") -> int:
    """``64kb``, ``1mb``, ``32000`` -> bytes (tc's units: kb = 1024 bytes)."""
    match = _BYTES.match(text.strip().lower())
    if match is None or int(match.group(1)) <= 0:
        raise ConfigError(f"{what} {text!r}: expected a size like 64kb, 1mb or 65536")
    return int(match.group(1)) * _BYTE_UNITS[match.group(2) or "b"]


@dataclass(frozen=True, kw_only=True)
class WanShape:
    """The WAN's token bucket, in tc's own words. ``burst`` must hold at least one full-size
    packet (1514 bytes); at high rates give it more (a bucket refills every timer tick)."""

    rate: str = "1gbit"
    burst: str = "128kb"
    latency: str = "50ms"  # how long a packet may wait in the bucket before it is dropped

    def __post_init__(self) -> None:
        parse_rate_bits(self.rate, "WAN rate")
        if parse_bytes(self.burst, "WAN burst") < 1514:
            raise ConfigError(f"WAN burst {self.burst!r}: must hold a 1514-byte packet")
        if _TIME.match(self.latency.strip().lower()) is None:
            raise ConfigError(f"WAN latency {self.latency!r}: expected e.g. 50ms, 200us or 1s")

    @property
    def rate_gbps(self) -> float:
        return parse_rate_bits(self.rate) / 1e9

    def tc_args(self) -> list[str]:
        return ["tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]


@dataclass(frozen=True)
class QdiscStats:
    """One WAN end's tbf qdisc as ``tc -s -j qdisc show`` reports it."""

    rate_bytes_per_s: int
    burst_bytes: int
    num_bytes: int  # sent through this end since the qdisc was added
    num_packets: int
    num_drops: int
    num_overlimits: int


def missing_requirements() -> str:
    """Why this machine cannot run the namespace testbed ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and tc need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs iproute2's `{tool}` on PATH (Debian: apt-get install iproute2)"
    return ""


def _run(*argv: str, check: bool = True) -> str:
    """Run one ``ip``/``tc`` command; a failure names the command and what it printed."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrfaasError(f"`{' '.join(argv)}` failed: {exc}") from exc
    if check and done.returncode != 0:
        raise PrfaasError(f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Network:
    """The two namespaces of one run, the WAN between them and the root link; a context
    manager. ``create()`` undoes what it did if any step fails."""

    def __init__(self, shape: WanShape | None = None, run_id: str = "") -> None:
        self.run_id = run_id or secrets.token_hex(3)
        if not re.fullmatch(r"[0-9a-z]{1,8}", self.run_id):
            raise ConfigError(f"run id {self.run_id!r}: 1-8 lowercase letters or digits")
        self.shape = shape or WanShape()
        self.root_device = f"pf{self.run_id}"
        self.root_address = ""  # the root namespace's end of the root link
        self.local_address = ""  # dc-local's end: where clients reach the router(s)
        self._created: list[str] = []

    def namespace(self, datacenter: str) -> str:
        if datacenter not in DATACENTERS:
            raise ConfigError(f"datacenter {datacenter!r}: one of {list(DATACENTERS)}")
        return f"{PREFIX}{self.run_id}-{datacenter}"

    def exec_prefix(self, datacenter: str) -> list[str]:
        """Prefix a command line with this to run it in ``datacenter``; ``ip netns exec``
        execs the command itself, so the PID Popen returns is the command's."""
        return ["ip", "netns", "exec", self.namespace(datacenter)]

    def wan_address(self, datacenter: str) -> str:
        return WAN_ADDRESSES[datacenter]

    # ------------------------------------------------------------------------ lifecycle
    def create(self) -> Network:
        why = missing_requirements()
        if why:
            raise PrfaasError(f"the namespace testbed {why}")
        try:
            for datacenter in DATACENTERS:
                namespace = self.namespace(datacenter)
                _run("ip", "netns", "add", namespace)
                self._created.append(namespace)
                _run("ip", "-n", namespace, "link", "set", "lo", "up")
            self._create_wan()
            self._create_root_link()
        except BaseException:
            self.close()
            raise
        log.info("netns_created", run_id=self.run_id, wan=self.shape.rate, root=self.local_address)
        return self

    def _create_wan(self) -> None:
        remote, local = (self.namespace(dc) for dc in DATACENTERS)
        _run("ip", "link", "add", WAN_DEVICE, "netns", remote, "type", "veth",
             "peer", "name", WAN_DEVICE, "netns", local)  # fmt: skip
        for datacenter in DATACENTERS:
            namespace = self.namespace(datacenter)
            _run("ip", "-n", namespace, "addr", "add", f"{WAN_ADDRESSES[datacenter]}/30",
                 "dev", WAN_DEVICE)  # fmt: skip
            _run("ip", "-n", namespace, "link", "set", WAN_DEVICE, "up")
            _run("tc", "-n", namespace, "qdisc", "add", "dev", WAN_DEVICE, "root",
                 *self.shape.tc_args())  # fmt: skip

    def _create_root_link(self) -> None:
        local = self.namespace("dc-local")
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        with LOCK_PATH.open("a") as lock:  # parallel runs take distinct /30s
            fcntl.flock(lock, fcntl.LOCK_EX)
            subnet = _free_subnet()
            self.local_address, self.root_address = (str(h) for h in subnet.hosts())
            _run("ip", "link", "add", self.root_device, "type", "veth",
                 "peer", "name", HOST_DEVICE, "netns", local)  # fmt: skip
            self._created.append(self.root_device)
            _run("ip", "addr", "add", f"{self.root_address}/30", "dev", self.root_device)
        _run("ip", "link", "set", self.root_device, "up")
        _run("ip", "-n", local, "addr", "add", f"{self.local_address}/30", "dev", HOST_DEVICE)
        _run("ip", "-n", local, "link", "set", HOST_DEVICE, "up")

    def close(self) -> None:
        """Stop what still runs inside, delete the root link and both namespaces. Idempotent."""
        for name in reversed(self._created):
            if name == self.root_device:
                _run("ip", "link", "del", name, check=False)
            else:
                _stop_namespace_processes(name)
                _run("ip", "netns", "del", name, check=False)
        if self._created:
            log.info("netns_deleted", run_id=self.run_id)
        self._created.clear()

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ the WAN
    def set_wan_rate(self, rate: str, burst: str | None = None) -> WanShape:
        """Change the WAN's rate (and burst) at both ends, live: connections stay up."""
        shape = replace(self.shape, rate=rate, burst=burst or self.shape.burst)
        for datacenter in DATACENTERS:
            _run("tc", "-n", self.namespace(datacenter), "qdisc", "change", "dev", WAN_DEVICE,
                 "root", *shape.tc_args())  # fmt: skip
        self.shape = shape
        log.info("wan_rate_changed", run_id=self.run_id, rate=rate, burst=shape.burst)
        return shape

    def wan_stats(self, datacenter: str) -> QdiscStats:
        """The tbf counters at ``datacenter``'s end (its egress into the WAN)."""
        return wan_stats(self.namespace(datacenter))


def wan_stats(namespace: str) -> QdiscStats:
    text = _run("tc", "-n", namespace, "-s", "-j", "qdisc", "show", "dev", WAN_DEVICE)
    for qdisc in json.loads(text or "[]"):
        if qdisc.get("kind") == "tbf":
            options: dict[str, Any] = qdisc.get("options", {})
            return QdiscStats(
                rate_bytes_per_s=int(options.get("rate", 0)),
                burst_bytes=int(options.get("burst", 0)),
                num_bytes=int(qdisc.get("bytes", 0)),
                num_packets=int(qdisc.get("packets", 0)),
                num_drops=int(qdisc.get("drops", 0)),
                num_overlimits=int(qdisc.get("overlimits", 0)),
            )
    raise PrfaasError(f"no tbf qdisc on {WAN_DEVICE} in {namespace}")


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /30 of ROOT_POOL that overlaps no address or route of the root namespace."""
    used = []
    for line in _run("ip", "-4", "-o", "addr", "show").splitlines():
        fields = line.split()
        if "inet" in fields:
            used.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in _run("ip", "-4", "route", "show").splitlines():
        destination = line.split()[0] if line.strip() else "default"
        if destination != "default":
            used.append(ipaddress.ip_network(destination, strict=False))
    for subnet in ROOT_POOL.subnets(new_prefix=30):
        if not any(subnet.overlaps(net) for net in used):
            return subnet
    raise PrfaasError(f"no free /30 left in {ROOT_POOL} for the root link")


# ---------------------------------------------------------------------------- runs left behind
def list_runs() -> dict[str, list[str]]:
    """Run id -> its namespaces, for every namespace testbed on this machine."""
    runs: dict[str, list[str]] = {}
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        for datacenter in DATACENTERS:
            if name.startswith(PREFIX) and name.endswith(f"-{datacenter}"):
                run_id = name[len(PREFIX) : -len(datacenter) - 1]
                runs.setdefault(run_id, []).append(name)
    return runs


def delete_run(run_id: str) -> list[str]:
    """Stop every process inside run ``run_id``'s namespaces and delete them (a run whose
    owner died); returns the namespaces deleted."""
    namespaces = list_runs().get(run_id, [])
    for namespace in namespaces:
        _stop_namespace_processes(namespace)
        _run("ip", "netns", "del", namespace, check=False)
    _run("ip", "link", "del", f"pf{run_id}", check=False)
    return namespaces


def _stop_namespace_processes(namespace: str, timeout_s: float = 10.0) -> None:
    """SIGTERM each process still in ``namespace`` (by PID), then SIGKILL what remains."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _namespace_pids(namespace)
        if not pids:
            return
        log.warning("netns_stopping_leftovers", namespace=namespace, pids=pids, signal=sig.name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _namespace_pids(namespace):
            time.sleep(0.1)


def _namespace_pids(namespace: str) -> list[int]:
    out = _run("ip", "netns", "pids", namespace, check=False)
    return [int(pid) for pid in out.split() if pid.isdigit()]
