"""One live run of ``bench/live_drop.py``: a namespace testbed, the trace sent on its Poisson
schedule, the WAN cut to a fraction of its rate mid-run, the router scraped every second.

- :func:`start_testbed` starts ``prfaas netns``'s testbed (``testbed/hosts.py``) and pins the two
  prefill workers to their own cores (``PINNED_CPUS``): with torch at one thread per worker, the
  dc-remote prefill worker then adds a core of prefill instead of fighting dc-local's for one.
- :func:`send_trace` sends every request at its arrival time over stock ``tritonclient.grpc.aio``
  (the loadgen's inputs) and keeps each request's output ids, so the bench can check them
  against a single engine; a request ends OK, with the error the server sent, or with its
  deadline: every request has a :class:`LiveRecord`, with the times of its first token (t1,
  which the router streams from the prefill leg at once, before any KV crosses a link) and of
  its second (the decode node's first: the KV has arrived). A prompt offloaded into a dropped
  link shows t1 after its prefill and then stalls until its KV is through: only the second
  token's time sees the link.
- :class:`Scraper` (a thread) samples the router's ``prfaas_*`` gauges and counters and the WAN's
  tc counters at dc-remote's end once per second.
- :func:`run_live` puts them together: scraper on, trace sent, ``tc qdisc change`` to the drop
  rate at ``drop_at_s`` and back after ``drop_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import tritonclient.grpc.aio as grpcclient_aio

from trtllm_prfaas.errors import PrfaasError
from trtllm_prfaas.loadgen.client import RequestSpec, StreamedIds, stream_request, stream_request_of
from trtllm_prfaas.loadgen.scrape import MetricsUnavailable, scrape
from trtllm_prfaas.sim.live_profile import Probe
from trtllm_prfaas.testbed.hosts import HostsConfig, NetnsTestbed
from trtllm_prfaas.testbed.netns import WanShape
from trtllm_prfaas.testbed.spec import TestbedConfig

__all__ = [
    "PINNED_CPUS",
    "LiveRecord",
    "LiveRun",
    "Sample",
    "Scraper",
    "pin_workers",
    "run_live",
    "send_trace",
    "start_testbed",
]

MODEL = "tensorrt_llm"
# Worker name suffix -> the CPU it is pinned to (2 cores): PD-P alone on 0, the PrfaaS
# prefill alone on 1. The decode worker, the router, etcd and this client float.
PINNED_CPUS = {"dc-local-prefill-0": 0, "dc-remote-prefill-0": 1}
FINAL = "triton_final_response"


@dataclass(frozen=True, kw_only=True)
class LiveRecord:
    """One request as the client saw it; times are seconds since the run's start."""

    index: int
    num_prompt_tokens: int
    arrival_s: float  # scheduled (the trace's)
    sent_s: float
    first_token_s: float | None  # t1, streamed by the prefill leg the moment it has it
    second_token_s: float | None  # the decode node's first: its KV arrived (module doc)
    finished_s: float
    status: str  # "OK" or the failure (gRPC code name, IN_STREAM_ERROR, DEADLINE_EXCEEDED)
    reason: str = ""
    token_ids: tuple[int, ...] = ()

    @property
    def is_ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def tt2t_s(self) -> float | None:
        """Time to the second token: when a disaggregated request's KV was usable on its
        decode node (t1 comes from the prefill leg before any KV crossed a link). A request
        that ended at t1 (EOS, one token) has nothing after it: its TTFT."""
        if self.second_token_s is None:
            return self.ttft_s if self.is_ok and len(self.token_ids) == 1 else None
        return self.second_token_s - self.sent_s


@dataclass(frozen=True)
class Sample:
    """One scrape: the router's unlabelled ``prfaas_*`` samples, its request counters and the
    WAN's tc counters at dc-remote's end; ``time_s`` since the run's start."""

    time_s: float
    gauges: dict[str, float]
    num_routed: float
    num_remote: float
    wan_bytes: int
    wan_rate_bps: float
    wan_drops: int


@dataclass
class LiveRun:
    """What one mode's run produced."""

    mode: str
    records: list[LiveRecord]
    samples: list[Sample]
    drop_started_s: float
    drop_ended_s: float
    wan_rate_during_drop_bps: float  # what tc reported right after the change
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-min load average at the start, the end
    run_id: str = ""  # the namespace testbed's
    calibration: Probe | None = None  # an unloaded probe just before the run
    pinned: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------- the testbed
def start_testbed(testbed: TestbedConfig, wan: WanShape, fixed_threshold: bool) -> NetnsTestbed:
    """A started namespace testbed (static membership: no etcd process to share the cores),
    its prefill workers pinned; the caller closes it."""
    config = HostsConfig(testbed=testbed, wan=wan, membership="static",
                         fixed_threshold=fixed_threshold)  # fmt: skip
    hosts = NetnsTestbed(config, log_level="ERROR")
    hosts.start()
    try:
        pin_workers(hosts)
    except BaseException:
        hosts.close()
        raise
    return hosts


def pin_workers(hosts: NetnsTestbed) -> dict[str, int]:
    """Pin every thread of each worker named in ``PINNED_CPUS`` to its CPU (threads started
    later inherit the mask of the thread that starts them). Skipped on a machine with fewer
    than 2 CPUs the process may use."""
    if len(os.sched_getaffinity(0)) < 2:
        return {}
    pinned = {}
    for name, worker in hosts.workers.items():
        cpu = PINNED_CPUS.get(name)
        if cpu is None:
            continue
        for tid in os.listdir(f"/proc/{worker.process.pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), {cpu})
        pinned[name] = cpu
    return pinned


# ---------------------------------------------------------------------------- the scraper
class Scraper:
    """Samples the router and the WAN every ``period_s`` on a thread; a context manager."""

    def __init__(self, hosts: NetnsTestbed, started_at: float, period_s: float = 1.0) -> None:
        if hosts.routers[0].metrics_url is None:
            raise PrfaasError("the router serves no metrics: the bench needs them")
        self.url = str(hosts.routers[0].metrics_url)
        self.hosts, self.started_at, self.period_s = hosts, started_at, period_s
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except (MetricsUnavailable, PrfaasError) as exc:  # counted, the run goes on
                self.errors.append(str(exc))
            next_at += self.period_s
            self._stop.wait(max(next_at - time.monotonic(), 0.0))

    def sample(self) -> Sample:
        now = time.monotonic()
        snap = scrape(self.url, now)
        gauges = {name: v for (name, labels), v in snap.samples.items()
                  if name.startswith("prfaas_") and not labels}  # fmt: skip
        wan = self.hosts.wan_stats("dc-remote")
        return Sample(
            time_s=now - self.started_at,
            gauges=gauges,
            num_routed=snap.total("prfaas_requests_total"),
            num_remote=snap.total("prfaas_requests_total", route="remote"),
            wan_bytes=wan.num_bytes,
            wan_rate_bps=wan.rate_bytes_per_s * 8.0,
            wan_drops=wan.num_drops,
        )


# ---------------------------------------------------------------------------- the client
async def send_traced(
    client: Any, spec: RequestSpec, arrival_s: float, started_at: float, timeout_s: float
) -> LiveRecord:
    """Stream one request (input ids), keep its output ids; never raises for a failed one."""
    sent, streamed = time.monotonic(), StreamedIds()
    request = stream_request_of(MODEL, spec, ["output_ids"], str(spec.index))
    status, reason = await stream_request(client, request, streamed.add, timeout_s)

    def since_start(at: float | None) -> float | None:
        return None if at is None else at - started_at

    return LiveRecord(index=spec.index, num_prompt_tokens=spec.num_prompt_tokens,
                      arrival_s=arrival_s, sent_s=sent - started_at,
                      first_token_s=since_start(streamed.first_at),
                      second_token_s=since_start(streamed.second_at),
                      finished_s=time.monotonic() - started_at, status=status, reason=reason,
                      token_ids=tuple(streamed.ids))  # fmt: skip


async def send_trace(
    address: str,
    specs: list[RequestSpec],
    arrivals_s: list[float],
    started_at: float,
    timeout_s: float,
) -> list[LiveRecord]:
    """Send ``specs[i]`` at ``started_at + arrivals_s[i]``; every request's record, in order."""
    client = grpcclient_aio.InferenceServerClient(address)
    try:
        tasks = []
        for spec, arrival in zip(specs, arrivals_s, strict=True):
            await asyncio.sleep(max(started_at + arrival - time.monotonic(), 0.0))
            tasks.append(asyncio.create_task(
                send_traced(client, spec, arrival, started_at, timeout_s)))  # fmt: skip
        return list(await asyncio.gather(*tasks))
    finally:
        await client.close()


async def _drop(
    hosts: NetnsTestbed, started_at: float, at_s: float, duration_s: float, rate: str
) -> tuple[float, float, float]:
    """``tc qdisc change`` to ``rate`` at ``at_s`` and back after ``duration_s``; returns
    (start, end, the rate tc reported during the drop in bit/s)."""
    base = hosts.network.shape
    await asyncio.sleep(max(started_at + at_s - time.monotonic(), 0.0))
    await asyncio.to_thread(hosts.set_wan_rate, rate)
    began = time.monotonic() - started_at
    during = (await asyncio.to_thread(hosts.wan_stats, "dc-remote")).rate_bytes_per_s * 8.0
    await asyncio.sleep(max(started_at + began + duration_s - time.monotonic(), 0.0))
    await asyncio.to_thread(hosts.set_wan_rate, base.rate, base.burst)
    return began, time.monotonic() - started_at, float(during)


def run_live(
    hosts: NetnsTestbed,
    mode: str,
    specs: list[RequestSpec],
    arrivals_s: list[float],
    *,
    drop_at_s: float,
    drop_s: float,
    drop_rate: str,
    timeout_s: float,
) -> LiveRun:
    """Send the trace with the drop and the scraper on; returns when every request ended."""
    started_at = time.monotonic() + 0.5
    load_before = os.getloadavg()[0]

    async def both() -> tuple[list[LiveRecord], tuple[float, float, float]]:
        drop = asyncio.create_task(_drop(hosts, started_at, drop_at_s, drop_s, drop_rate))
        records = await send_trace(hosts.routers[0].address, specs, arrivals_s, started_at,
                                   timeout_s)  # fmt: skip
        return records, await drop

    with Scraper(hosts, started_at) as scraper:
        records, (began, ended, during) = asyncio.run(both())
        time.sleep(1.5)  # one more sample after the last request
    load = (load_before, os.getloadavg()[0])
    return LiveRun(mode, records, scraper.samples, began, ended, during, load, hosts.run_id)
