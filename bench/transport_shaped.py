"""The relay on a shaped 1 Gbit/s link: goodput vs iperf3, and how fast it follows rate changes.

    python bench/transport_shaped.py --json [--seconds 10] [--hold-s 4]   # as root

The link: two network namespaces ``prfaas-a-<pid>`` and ``prfaas-b-<pid>`` joined by a veth
pair (10.201.0.1 in A, 10.201.0.2 in B; these addresses exist only in the namespaces, which
are deleted on the way out, also on errors and Ctrl-C/SIGTERM). Data flows A -> B, so only
A's veth egress is shaped: ``tc qdisc add dev pfa<pid> root tbf rate 1gbit burst 128kb latency
20ms``; B -> A carries only ACKs and the relay's small control messages.

In one run, on that link:

1. iperf3 (Debian ``iperf3``, apt-installed here when missing): server in B, client in A,
   4 parallel streams, ``--seconds`` after a 1 s omitted warm-up; the receiver's bit rate.
2. The relay: ``_relay_peer.py recv`` in B, ``_relay_peer.py send`` in A (4 plaintext streams,
   128 KiB chunks, 32 MiB transfers of eight 4 MiB bf16 KV layers, two in flight), streaming
   without pause. The receiver prints its ``bytes_received`` every 50 ms; ``relay_gbps`` is the
   bytes it received over ``--seconds`` after a 1 s warm-up. Then, still streaming, the rate is
   changed live (``tc qdisc change``) to 200 Mbit/s, held ``--hold-s``, and back to 1 Gbit/s.

``shaped_over_iperf3`` = relay_gbps / iperf3_gbps (target >= 0.95).
``rate_change_tracked_s``: the observed goodput is the bytes received over a trailing window of
``--window-s`` (0.3 s; 50 ms samples), so it lags a step by up to one window, which is counted.
After each change (timed from just before ``tc`` runs), the settle time is the time until that
goodput enters and stays within +-10 % of the new rate's payload capacity (nominal rate x
1448/1514, the TCP payload per frame byte that tbf counts) for the rest of the hold (>= 0.5
s); the figure is the larger of the two (``None`` if either never settled; target <= 1 s).
Without root or ``ip netns``, it prints ``{"skipped": why, ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from _relay_peer import Peer, PeerError, peer_argv

ADDR_A, ADDR_B = "10.201.0.1", "10.201.0.2"
FAST_MBIT, SLOW_MBIT = 1000, 200
TBF_SHAPE = ("burst", "128kb", "latency", "20ms")
NUM_STREAMS = 4
IPERF3_PORT = 5201  # inside namespace B only
WARMUP_S = 1.0
TOLERANCE = 0.10
# Payload per byte the tbf counts: a 1448-byte TCP segment (timestamps on) travels in a 1514-byte
# frame (14 Ethernet + 20 IP + 32 TCP); iperf3 gets 0.95 Gbit/s of payload from "rate 1gbit".
WIRE_EFFICIENCY = 1448 / 1514
RELAY_OPTIONS: dict[str, object] = {
    "streams": NUM_STREAMS,
    "chunk_bytes": 128 << 10,  # fine-grained byte counts: 50 chunks per 0.3 s at 200 Mbit/s
    "credit_bytes": 64 << 20,
    "layer_bytes": 4 << 20,
    "layers_per_transfer": 8,
}

Sample = tuple[float, int]  # (monotonic s, bytes received so far)
Rate = tuple[float, float]  # (monotonic s, Gbit/s over the window ending then)


# ---- pure helpers -----------------------------------------------------------------------------


def windowed_gbps(samples: Sequence[Sample], window_s: float) -> list[Rate]:
    """Goodput at each sample over the trailing window: from the latest sample at least
    ``window_s`` older (so each window spans >= ``window_s``). Samples must be time-ordered."""
    times = [t for t, _ in samples]
    rates: list[Rate] = []
    for t, received in samples:
        j = bisect.bisect_right(times, t - window_s) - 1
        if j >= 0:
            rates.append((t, (received - samples[j][1]) * 8 / (t - times[j]) / 1e9))
    return rates


def settle_time_s(
    rates: Sequence[Rate],
    change_t: float,
    end_t: float,
    target_gbps: float,
    tolerance: float = TOLERANCE,
    min_hold_s: float = 0.5,
) -> float | None:
    """Seconds from ``change_t`` until the goodput is within ``tolerance`` of ``target_gbps``
    at every point up to ``end_t``, staying there >= ``min_hold_s``; ``None`` if it never does."""
    phase = [(t, gbps) for t, gbps in rates if change_t < t <= end_t]
    outside = [
        k for k, (_, gbps) in enumerate(phase) if abs(gbps - target_gbps) > tolerance * target_gbps
    ]
    first_in = outside[-1] + 1 if outside else 0
    if first_in >= len(phase) or phase[-1][0] - phase[first_in][0] < min_hold_s:
        return None
    return phase[first_in][0] - change_t


def span_gbps(samples: Sequence[Sample], start_t: float, end_t: float) -> float | None:
    """Mean goodput between the first samples at/after ``start_t`` and at/before ``end_t``."""
    inside = [(t, received) for t, received in samples if start_t <= t <= end_t]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) * 8 / (inside[-1][0] - inside[0][0]) / 1e9


def median_gbps(rates: Sequence[Rate], start_t: float, end_t: float) -> float | None:
    values = [gbps for t, gbps in rates if start_t < t <= end_t]
    return statistics.median(values) if values else None


def skipped(reason: str) -> dict[str, Any]:
    """The report when the bench cannot run here: every figure ``None`` and why."""
    return {"skipped": reason, "shaped_over_iperf3": None, "rate_change_tracked_s": None}


def preflight() -> str | None:
    """Why the shaped bench cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "not root: network namespaces and tc need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: apt-get install iproute2)"
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"ip netns unavailable: {done.stderr.strip()}"
    return None


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---- the link ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str

    @classmethod
    def for_pid(cls, pid: int) -> Link:
        return cls(f"prfaas-a-{pid}", f"prfaas-b-{pid}", f"pfa{pid}", f"pfb{pid}")

    def in_a(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns_a, *argv]

    def in_b(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns_b, *argv]

    def tbf(self, verb: str, rate_mbit: int) -> list[str]:
        """``tc qdisc add|change`` of the tbf on A's egress."""
        shape = ["rate", f"{rate_mbit}mbit", *TBF_SHAPE]
        return self.in_a("tc", "qdisc", verb, "dev", self.dev_a, "root", "tbf", *shape)


def sh(argv: list[str], timeout_s: float = 30.0) -> str:
    """Run a command; its stdout. RuntimeError with its stderr when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={done.returncode}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def shaped_link(link: Link) -> Iterator[Link]:
    """Create the namespaces, veth pair, addresses and the 1 Gbit/s tbf; always delete them."""
    try:
        sh(["ip", "netns", "add", link.ns_a])
        sh(["ip", "netns", "add", link.ns_b])
        sh(["ip", "link", "add", link.dev_a, "netns", link.ns_a, "type", "veth",
            "peer", "name", link.dev_b, "netns", link.ns_b])  # fmt: skip
        for run, dev, addr in ((link.in_a, link.dev_a, ADDR_A), (link.in_b, link.dev_b, ADDR_B)):
            sh(run("ip", "addr", "add", f"{addr}/24", "dev", dev))
            sh(run("ip", "link", "set", dev, "up"))
            sh(run("ip", "link", "set", "lo", "up"))
        sh(link.tbf("add", FAST_MBIT))
        yield link
    finally:
        for ns in (link.ns_a, link.ns_b):  # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


# ---- iperf3 -----------------------------------------------------------------------------------


def ensure_iperf3() -> str | None:
    """Install Debian's iperf3 if missing (root); ``None`` when present, else why not."""
    if shutil.which("iperf3") is not None:
        return None
    if os.geteuid() != 0:
        return "iperf3 missing and not root: run apt-get install -y iperf3"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "iperf3"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:  # stale package lists: update once and retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=False)
        done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
    if shutil.which("iperf3") is None:
        return f"apt-get install iperf3 failed: {' '.join(done.stderr.split())[-400:]}"
    return None


def wait_listening(link: Link, port: int, timeout_s: float = 10.0) -> None:
    """Wait until a TCP socket listens on ``port`` in B (``ss``)."""
    deadline = time.monotonic() + timeout_s
    while not sh(link.in_b("ss", "-Hltn", f"sport = :{port}")).strip():
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port} in {link.ns_b}")
        time.sleep(0.05)


def iperf3_gbps(link: Link, seconds: float) -> float:
    """iperf3, server in B and client in A, ``NUM_STREAMS`` streams: the receiver's Gbit/s."""
    server = subprocess.Popen(
        link.in_b("iperf3", "-s", "-1", "-B", ADDR_B, "-p", str(IPERF3_PORT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(link, IPERF3_PORT)
        client = link.in_a(
            "iperf3",
            "-c",
            ADDR_B,
            "-p",
            str(IPERF3_PORT),
            "-P",
            str(NUM_STREAMS),
            "-t",
            str(seconds),
        )
        client += ["-O", str(int(WARMUP_S)), "--json"]
        done = subprocess.run(
            client, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        report = json.loads(done.stdout) if done.stdout.strip() else {}
        if done.returncode != 0 or "error" in report:
            why = report.get("error") or done.stderr.strip()
            raise RuntimeError(f"iperf3 client: rc={done.returncode}: {why}")
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.terminate()
        try:
            server.wait(5.0)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ---- the relay --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayRun:
    samples: list[Sample]
    steady: tuple[float, float]  # the window relay_gbps is measured over
    changes: list[tuple[float, float, int]]  # (change at, phase end, new rate in Mbit/s)
    sender: dict[str, Any]


def relay_run(link: Link, seconds: float, hold_s: float) -> RelayRun:
    """Stream without pause: warm-up, steady ``seconds``, then 200 Mbit/s and back."""
    recv = peer_argv("recv", bind=f"tcp://{ADDR_B}:0", sample_s=0.05, **RELAY_OPTIONS)
    with Peer("relay-recv", link.in_b(*recv)) as rx:
        endpoint = rx.expect("endpoint", 120.0)["endpoint"]
        send = peer_argv("send", endpoint=endpoint, **RELAY_OPTIONS)
        with Peer("relay-send", link.in_a(*send)) as tx:
            if not tx.expect("ready", 120.0)["ready"]:
                raise PeerError(tx.describe("streams not ready"))
            start = time.monotonic() + WARMUP_S
            time.sleep(WARMUP_S + seconds)
            changes = []
            for rate_mbit in (SLOW_MBIT, FAST_MBIT):
                changed_t = time.monotonic()
                sh(link.tbf("change", rate_mbit))
                time.sleep(hold_s)
                changes.append((changed_t, time.monotonic(), rate_mbit))
            tx.stop_input()
            sender = tx.expect("result", 120.0)["result"]
        rx.stop_input()
        rx.expect("done", 60.0)
        samples = [(r["t"], r["bytes"]) for r in rx.records if "t" in r]
    return RelayRun(samples, (start, start + seconds), changes, sender)


def tracking(run: RelayRun, window_s: float) -> dict[str, Any]:
    """Settle time and the median goodput (last half of the hold) after each change."""
    rates = windowed_gbps(run.samples, window_s)
    settle: list[float | None] = []
    medians: list[float | None] = []
    for changed_t, end_t, rate_mbit in run.changes:
        target_gbps = rate_mbit / 1000 * WIRE_EFFICIENCY
        settle.append(settle_time_s(rates, changed_t, end_t, target_gbps))
        medians.append(median_gbps(rates, (changed_t + end_t) / 2, end_t))
    tracked = None if None in settle else max(s for s in settle if s is not None)
    return {
        "rate_change_tracked_s": _r(tracked),
        "settle_s": {
            f"to_{m}mbit": _r(s) for (_, _, m), s in zip(run.changes, settle, strict=True)
        },
        "hold_gbps": {f"{m}mbit": _r(g) for (_, _, m), g in zip(run.changes, medians, strict=True)},
    }


# ---- the bench --------------------------------------------------------------------------------


def measure(seconds: float = 10.0, hold_s: float = 4.0, window_s: float = 0.3) -> dict[str, Any]:
    """The report (see the module docstring); ``skipped(...)`` when it cannot run here."""
    reason = preflight()
    if reason is not None:
        return skipped(reason)
    iperf3_error = ensure_iperf3()
    with shaped_link(Link.for_pid(os.getpid())) as link:
        iperf3 = None if iperf3_error else iperf3_gbps(link, seconds)
        run = relay_run(link, seconds, hold_s)
    relay = span_gbps(run.samples, *run.steady)
    ratio = relay / iperf3 if relay is not None and iperf3 else None
    return {
        "shaped_over_iperf3": _r(ratio),
        **tracking(run, window_s),
        "relay_gbps": _r(relay),
        "iperf3_gbps": _r(iperf3),
        "iperf3_error": iperf3_error,
        "relay_sender": {k: run.sender[k] for k in ("tcp_total_retrans", "num_streams")},
        "link": f"tbf rate {FAST_MBIT}mbit {' '.join(TBF_SHAPE)} on A's veth egress",
        "seconds": seconds,
        "hold_s": hold_s,
        "window_s": window_s,
        "sample_s": 0.05,
        "tolerance": TOLERANCE,
        "num_streams": NUM_STREAMS,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every ``finally`` (namespaces, processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="iperf3 and relay steady s")
    parser.add_argument("--hold-s", type=float, default=4.0, help="hold after each rate change")
    parser.add_argument("--window-s", type=float, default=0.3, help="goodput window")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    with contextlib.redirect_stdout(sys.stderr):
        result = measure(args.seconds, args.hold_s, args.window_s)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
