"""The relay sender's link-bound counters feed a link estimate that tells a slow link from a
slow producer (``transport/stats.py`` -> ``policy/link_estimate.py``), on real loopback relays:

- a paced link (the sender's token bucket, the CPU-only stand-in for a shaped WAN) with a fast
  producer is estimated within 20% of its rate;
- a slow producer on a fast link leaves the estimate at the provisioned rate (the sender is
  never link-bound, so goodput below the link says nothing about the link).
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.transport.conftest import Relay, make_config
from trtllm_prfaas.policy import link_estimate as le
from trtllm_prfaas.transport import Kind, RelaySender
from trtllm_prfaas.transport.stats import PumpState, SendCounters, TcpInfo

PROVISIONED_GBPS = 10.0


def _counters(tx: RelaySender) -> le.RelayCounters:
    s = tx.stats()
    return le.RelayCounters(
        now_s=time.monotonic(),
        bytes_sent=s.bytes_sent,
        bytes_acked=s.bytes_acked,
        link_wait_s=s.link_wait_s,
        link_wait_bytes=s.link_wait_bytes,
        credit_wait_s=s.credit_wait_s,
        tcp_bound_s=s.tcp_bound_s,
        tcp_bound_gbit=s.tcp_bound_gbit,
        tcp_retrans=s.tcp_total_retrans or 0,
        tcp_segs_out=s.tcp_segs_out or 0,
    )


class Sampler:
    """Samples a sender's counters every ``period_s`` on a thread and folds each period into a
    link estimate (provisioned ``PROVISIONED_GBPS``), as the router does per control tick."""

    def __init__(self, tx: RelaySender, period_s: float) -> None:
        self.tx, self.period_s = tx, period_s
        self.estimate = le.initial_estimate(PROVISIONED_GBPS, PROVISIONED_GBPS)
        self.periods: list[le.RelayPeriod] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-sampler")

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        before = _counters(self.tx)
        while not self._stop.wait(self.period_s):
            after = _counters(self.tx)
            p = le.period(before, after)
            if p is not None:
                self.periods.append(p)
                self.estimate = le.update(le.LinkEstimateConfig(), self.estimate, [p], after.now_s)
            before = after


def test_paced_link_is_estimated_within_20_percent(relay: Relay) -> None:
    rate_gbps = 0.2  # 25 MB/s: 16 MiB take ~0.67 s, several 0.1 s periods
    config = make_config(link_gbps=rate_gbps, credit_bytes=32 << 20)
    payload = bytes(16 << 20)
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        assert tx.wait_ready(5.0)
        with Sampler(tx, period_s=0.1) as sampler:
            handle = tx.open_transfer("t-paced", "req-paced", deadline_s=20.0)
            handle.send(Kind.FULL_BLOCK, 0, (0, 1), payload)
            handle.finish()
            handle.wait(timeout_s=20.0)
        rx.release("t-paced")
        stats = tx.stats()
    assert stats.link_wait_s > 0.4  # most of the transfer waited on the pacer
    drain_gbps = stats.link_wait_bytes * 8 / 1e9 / stats.link_wait_s
    assert drain_gbps == pytest.approx(rate_gbps, rel=0.2)
    assert sampler.estimate.gbps == pytest.approx(rate_gbps, rel=0.2), sampler.periods


def test_slow_producer_on_a_fast_link_keeps_the_provisioned_estimate(relay: Relay) -> None:
    config = make_config(credit_bytes=8 << 20)
    item = bytes(256 << 10)  # 256 KiB every 20 ms: ~0.1 Gbps of a link that carries far more
    with relay.receiver(config) as rx, relay.sender(rx.endpoint, config) as tx:
        assert tx.wait_ready(5.0)
        with Sampler(tx, period_s=0.1) as sampler:
            for k in range(40):
                handle = tx.open_transfer(f"t-{k}", f"req-{k}", deadline_s=5.0)
                handle.send(Kind.FULL_BLOCK, 0, (0, 1), item)
                handle.finish()
                handle.wait(timeout_s=5.0)
                rx.release(f"t-{k}")
                time.sleep(0.02)
        stats = tx.stats()
    assert stats.bytes_sent == 40 * len(item)
    assert sum(p.sent_gbps for p in sampler.periods) > 0  # it did carry traffic
    assert sampler.estimate.gbps >= PROVISIONED_GBPS  # never lowered by a slow producer
    assert stats.goodput_gbps < PROVISIONED_GBPS  # while goodput alone would have said "slow"


def test_pump_states_charge_time_and_bytes_to_the_state_they_ended_in() -> None:
    c = SendCounters(num_streams=1)
    c.on_pump(PumpState.LINK, now_s=0.0)
    c.on_chunk(0, 1000, queued_s=0.0, now_s=1.0)  # handed over by the next pump
    c.on_pump(PumpState.CREDIT, now_s=1.0)
    c.on_chunk(0, 500, queued_s=1.0, now_s=3.0)
    c.on_pump(PumpState.IDLE, now_s=3.0)
    c.on_pump(PumpState.IDLE, now_s=9.0)
    s = c.snapshot("tcp://x:1", {}, 0, now_s=9.0)
    assert (s.link_wait_s, s.link_wait_bytes, s.credit_wait_s) == (1.0, 1000, 2.0)
    assert s.bytes_sent == 1500 and s.chunks_sent == 2


def _info(acked: int, notsent: int, app_limited: bool = False) -> TcpInfo:
    return TcpInfo(1, 2, 1, 100, 10, 0, 0, acked, 0, 10, notsent, 5_000_000, app_limited, 4)


def test_kernel_link_bound_time_counts_acked_bytes_between_limited_reads() -> None:
    c = SendCounters(num_streams=1)
    c.on_tcp_read({0: (_info(0, 1000),)}, now_s=0.0)
    c.on_tcp_read({0: (_info(1_250_000, 1000),)}, now_s=0.1)  # limited at both: 0.1 Gbps
    c.on_tcp_read({0: (_info(2_500_000, 0),)}, now_s=0.2)  # drained: the link was not limiting
    c.on_tcp_read({0: (_info(2_600_000, 1000, app_limited=True),)}, now_s=0.3)  # app-limited
    c.on_tcp_read({0: (_info(2_700_000, 1000),)}, now_s=0.4)
    c.on_tcp_read({0: (_info(9_000_000, 1000),)}, now_s=1.4)  # a gap: says nothing
    s = c.snapshot("tcp://x:1", {}, 0, now_s=1.5)
    assert s.tcp_bound_s == pytest.approx(0.1)
    assert s.tcp_bound_gbit == pytest.approx(0.01)
