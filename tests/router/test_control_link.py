"""The control loop's live link estimate: fed by the PrfaaS workers' ``LoadReport`` relay
counters, exported as ``prfaas_link_estimate_gbps`` with the floor ``prfaas_threshold_min_tokens``.

- With ``link_gbps`` unconfigured the estimate is all there is: it starts at the default and
  takes the first link-bound sample as is.
- End to end with real worker processes: a PrfaaS worker whose relay is paced at 0.004 Gbps
  (``--link-gbps``, the CPU-only stand-in for a slow WAN) shows the router a link-bound relay,
  and the router's estimate of a provisioned 10 Gbps link falls to the paced rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from tests.harness import WorkerProcess
from tests.router.test_disaggregated import _prompt, _request, _tokens
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.control import ControlConfig, ControlLoop
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.testbed.processes import start_workers
from trtllm_prfaas.worker import protocol as p

GB = 125_000_000
COMMON = ["--model-preset", "tiny", "--plaintext", "--num-blocks", "512", "--chunk-size", "64"]
# 500 KB/s. The tiny model's KV is 256 bytes a token: 6 prompts of 1,500 tokens relay 2.3 MB,
# past the pacer's 1 MB burst (a bucket that refilled while idle sends that much unpaced).
PACED_GBPS = 0.004


def test_unconfigured_link_is_estimated_and_exported() -> None:
    clock, registry = [100.0], CollectorRegistry()
    cluster = ClusterState()
    info = p.WorkerInfo("prfaas", "prefill", "c", "m", 8192, 16, 512, 16, "", 1024, 4096)
    cluster.add(WorkerState("prfaas", "tcp://x", info, True, reported_at=clock[0]))
    config = ControlConfig(rebalancer=None, default_link_gbps=25.0)
    loop = ControlLoop(config, cluster, 500.0, RouterMetrics(registry), clock=lambda: clock[0])
    assert registry.get_sample_value("prfaas_link_estimate_gbps") == 25.0
    for k in range(3):  # link-bound for 0.8 s of each second at 2 Gbps
        clock[0] += 1.0
        bound = {"relay_link_wait_s": 0.8 * k, "relay_link_wait_bytes": int(1.6 * k * GB)}
        report = p.LoadReport("prfaas", 0, 1, 0, 100, 0, relay_bytes_out=k * 2 * GB, **bound)
        cluster.on_report("prfaas", report)
        cluster.workers["prfaas"].reported_at = clock[0]
        record = loop.tick(clock[0])
    assert record.link_gbps == pytest.approx(2.0)  # the default was a guess: replaced at once
    assert registry.get_sample_value("prfaas_link_estimate_gbps") == pytest.approx(2.0)
    assert registry.get_sample_value("prfaas_threshold_min_tokens") == 500.0  # warming up


@pytest.fixture
def paced_workers() -> Iterator[dict[str, WorkerProcess]]:
    procs = start_workers({
        "prfaas": ["--role", "prefill", "--cluster", "dc-remote", "--link-gbps", str(PACED_GBPS),
                   *COMMON],
        "pd": ["--role", "prefill", "--cluster", "dc-local", *COMMON],
        "decode": ["--role", "decode", "--cluster", "dc-local", *COMMON],
    })  # fmt: skip
    try:
        yield procs
    finally:
        codes = {name: proc.stop() for name, proc in procs.items()}
        assert all(code == 0 for code in codes.values()), codes


def test_a_paced_relay_pulls_the_routers_estimate_to_the_paced_rate(
    paced_workers: dict[str, WorkerProcess],
) -> None:
    specs = tuple(WorkerSpec(n, w.control, n == "prfaas") for n, w in paced_workers.items())
    control = ControlConfig(period_s=0.5, rebalancer=None, link_gbps=10.0)

    async def scenario() -> list[float]:
        orch = DisaggregatedOrchestrator(RouterConfig(specs, threshold_tokens=100, control=control))
        await orch.start()  # the control loop ticks every 0.5 s from here
        backlogs: list[int] = []

        async def watch_backlog() -> None:  # what the PrfaaS worker reports queued on its relay
            while True:
                report = orch.cluster.workers["prfaas"].report
                backlogs.append(report.relay_bytes_backlog if report else 0)
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_backlog())
        try:
            requests = [_request(f"r{k}", _prompt(1500 + k)) for k in range(6)]
            await asyncio.gather(*(_tokens(orch, r) for r in requests))
            assert orch.counters["remote"] == 6 and orch.counters["relay_recomputed"] == 0
            await asyncio.sleep(1.0)  # the ticks that read the last reports
            # 1,500 tokens x 256 B behind a 500 KB/s pacer: the backlog shows, then drains
            assert max(backlogs) >= 256 * 1500 and backlogs[-1] == 0, backlogs
            delays = [tick.signals.relay_queue_delay_s for tick in orch.control.ticks]
            assert max(delays) > 0.5, delays  # seconds of KV queued on a 0.004 Gbps link
            return [tick.link_gbps for tick in orch.control.ticks]
        finally:
            watcher.cancel()
            await orch.close()

    estimates = asyncio.run(scenario())
    assert estimates[0] == 10.0  # the provisioned rate until the relay is link-bound
    assert min(estimates) == pytest.approx(PACED_GBPS, rel=0.25), estimates
