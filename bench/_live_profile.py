"""Measure the namespace testbed before the live runs (``bench/live_drop.py``): the WAN's TCP
goodput at a rate, and unloaded probes through the router (``sim/live_profile.py`` says how the
simulator uses them).

- :func:`measure_link_gbps`: a plain TCP stream from dc-remote to dc-local across the shaped
  WAN for ``seconds`` (a receiver and a sender, each a ``python -c`` child in its namespace,
  stopped by PID): the goodput the tbf bucket really gives a TCP flow, which is what the relay
  gets, rather than the configured rate.
- :func:`probe`: one request at a time (nothing else in flight): TTFT, time per output token,
  whether the router offloaded it (``prfaas_requests_total{route="remote"}`` moved) and the KV
  bytes relayed for it, local or remote (``prfaas_relay_bytes_total`` over every link, read
  once the workers' 0.1 s load reports have settled: nothing else is in flight).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import tritonclient.grpc.aio as grpcclient_aio
from _live_run import LiveRecord, send_traced

from trtllm_prfaas.errors import PrfaasError
from trtllm_prfaas.loadgen.client import RequestSpec
from trtllm_prfaas.loadgen.scrape import MetricsSnapshot, scrape
from trtllm_prfaas.sim.live_profile import Probe
from trtllm_prfaas.testbed.hosts import NetnsTestbed
from trtllm_prfaas.testbed.processes import stop_process

__all__ = ["measure_link_gbps", "probe"]

LINK_PORT = 7999  # the receiver's port on dc-local's WAN address (namespaces are private)

_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(30)
first = None; n = 0; last = time.monotonic()
while True:
    b = c.recv(1 << 16)
    if not b: break
    if first is None: first = time.monotonic()
    else: n += len(b)
    last = time.monotonic()
print(n, last - (first or last), flush=True)
"""

_SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
buf = b"x" * (1 << 16); end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end: c.sendall(buf)
c.close()
"""


def measure_link_gbps(hosts: NetnsTestbed, seconds: float) -> float:
    """TCP goodput (Gbps) from dc-remote to dc-local over ``seconds`` (the first segment's
    arrival starts the clock, so connection set-up is not counted)."""
    address = hosts.network.wan_address("dc-local")
    recv_cmd = [*hosts.network.exec_prefix("dc-local"), sys.executable, "-c", _RECEIVER,
                address, str(LINK_PORT)]  # fmt: skip
    send_cmd = [*hosts.network.exec_prefix("dc-remote"), sys.executable, "-c", _SENDER,
                address, str(LINK_PORT), str(seconds)]  # fmt: skip
    receiver = subprocess.Popen(recv_cmd, stdout=subprocess.PIPE, text=True)
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "listening":
            raise PrfaasError("the WAN goodput receiver did not start")
        sender = subprocess.Popen(send_cmd, text=True)
        sender.wait(timeout=seconds + 30)
        out, _ = receiver.communicate(timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise PrfaasError(f"the WAN goodput measurement did not finish: {exc}") from exc
    finally:
        for process in (sender, receiver):
            if process is not None:
                stop_process(process, 5.0)
    num_bytes, elapsed = out.split()
    if float(elapsed) <= 0:
        raise PrfaasError(f"the WAN goodput measurement saw no data: {out!r}")
    return float(num_bytes) * 8 / 1e9 / float(elapsed)


def _relayed(snap: MetricsSnapshot) -> float:
    return snap.total("prfaas_relay_bytes_total")


def _settled(url: str, timeout_s: float = 5.0) -> MetricsSnapshot:
    """A scrape once the relayed-bytes counter stopped moving (load reports lag 0.1 s)."""
    last = scrape(url, time.monotonic())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = scrape(url, time.monotonic())
        if _relayed(now) == _relayed(last):
            return now
        last = now
    return last


def probe(
    hosts: NetnsTestbed, specs: list[RequestSpec], timeout_s: float
) -> tuple[list[Probe], list[str]]:
    """Each spec alone through router 0; its probe, and the failures (``"index: reason"``)."""
    router = hosts.routers[0]
    if router.metrics_url is None:
        raise PrfaasError("the router serves no metrics: the bench needs them")
    url = str(router.metrics_url)
    probes, failures = [], []
    for spec in specs:
        before = _settled(url)
        started = time.monotonic()
        record = asyncio.run(_one(router.address, spec, started, timeout_s))
        after = _settled(url)
        ttft = record.ttft_s
        if not record.is_ok or ttft is None:
            failures.append(f"{spec.index}: {record.status} {record.reason}")
            continue
        remote = after.total("prfaas_requests_total", route="remote") - before.total(
            "prfaas_requests_total", route="remote")  # fmt: skip
        relayed = _relayed(after) - _relayed(before)
        num = len(record.token_ids)
        tpot = (record.finished_s - (record.first_token_s or 0.0)) / (num - 1) if num > 1 else None
        probes.append(Probe(num_tokens=spec.num_prompt_tokens, ttft_s=ttft, is_remote=remote > 0,
                            relay_bytes=relayed, tpot_s=tpot, tt2t_s=record.tt2t_s))  # fmt: skip
    return probes, failures


async def _one(address: str, spec: RequestSpec, started: float, timeout_s: float) -> LiveRecord:
    client = grpcclient_aio.InferenceServerClient(address)
    try:
        return await send_traced(client, spec, 0.0, started, timeout_s)
    finally:
        await client.close()
