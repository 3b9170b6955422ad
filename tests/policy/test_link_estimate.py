"""The link estimate: link-bound periods measure the link, idle or producer-bound ones never
lower it, it relaxes back to the prior once nothing is link-bound, and counters that go back
(a restarted sender) give no period."""

from __future__ import annotations

from dataclasses import replace

import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy import link_estimate as le

C = le.LinkEstimateConfig()
GB = 125_000_000  # bytes in one gigabit


def _period(sent_gbps: float, bound_share: float = 0.0, bound_gbps: float = 0.0) -> le.RelayPeriod:
    # delivered as fast as sent: a healthy period
    return le.RelayPeriod(1.0, sent_gbps, bound_share, bound_gbps, 0.0, 0.0, 0.0, 0, 0, sent_gbps)


def test_a_link_bound_period_sets_the_estimate_and_idle_ones_keep_it() -> None:
    est = le.initial_estimate(10.0, 99.0)
    est = le.update(C, est, [_period(1.0, 1.0, 1.0)], now_s=1.0)
    assert est.gbps == pytest.approx(1.0) and est.is_link_bound
    for now in (2.0, 3.0, 4.0, 5.0):  # idle, then a slow producer: no evidence either way
        est = le.update(C, est, [_period(0.5 if now > 3 else 0.0)], now)
        assert est.gbps == pytest.approx(1.0) and not est.is_link_bound


def test_without_link_bound_periods_it_relaxes_back_to_the_provisioned_rate() -> None:
    est = le.update(C, le.initial_estimate(10.0, 99.0), [_period(1.0, 1.0, 1.0)], now_s=0.0)
    trail = []
    for now in range(1, 30):
        est = le.update(C, est, [_period(0.2)], float(now))
        trail.append(est.gbps)
    assert trail[int(C.recover_s) - 2] == pytest.approx(1.0)  # holds for recover_s
    assert trail[-1] == pytest.approx(10.0) and max(trail) <= 10.0
    assert trail == sorted(trail)


def test_a_producer_bound_worker_adds_its_share_to_a_link_bound_one() -> None:
    est = le.initial_estimate(10.0, 99.0)
    est = le.update(C, est, [_period(2.0, 0.9, 3.0), _period(1.0)], now_s=1.0)
    assert est.gbps == pytest.approx(4.0)


def test_the_kernels_view_counts_when_the_sender_waits_on_credit() -> None:
    kernel = replace(_period(0.3), credit_wait_share=0.9, tcp_bound_share=0.8, tcp_gbps=0.4)
    est = le.update(C, le.initial_estimate(10.0, 99.0), [kernel], now_s=1.0)
    assert est.gbps == pytest.approx(0.4) and est.is_link_bound
    brief = replace(kernel, tcp_bound_share=0.1)  # limiting for 0.1 s of 1 s: not the bottleneck
    assert le.update(C, est, [brief], now_s=2.0).last_sample_gbps is None


def test_an_unconfigured_link_learns_its_prior_from_what_it_measured() -> None:
    est = le.initial_estimate(None, 10.0)
    est = le.update(C, est, [_period(3.0)], now_s=0.0)  # carried 3: at least 3, prior 10
    assert est.gbps == pytest.approx(10.0)
    est = le.update(C, est, [_period(2.0, 1.0, 2.0)], now_s=1.0)  # measured: the guess goes
    assert est.gbps == pytest.approx(2.0) and est.prior_gbps == pytest.approx(3.0)
    for now in range(2, 40):
        est = le.update(C, est, [_period(0.0)], float(now))
    assert est.gbps == pytest.approx(3.0)  # back to the highest rate seen, not the default


def test_periods_from_counters() -> None:
    a = le.RelayCounters(0.0, bytes_sent=0, tcp_retrans=1, tcp_segs_out=100)
    b = le.RelayCounters(
        2.0, bytes_sent=2 * GB, link_wait_s=1.0, link_wait_bytes=GB // 2, credit_wait_s=0.5,
        tcp_bound_s=0.5, tcp_bound_gbit=0.1, tcp_retrans=3, tcp_segs_out=300,
    )  # fmt: skip
    p = le.period(a, b)
    assert p is not None
    assert (p.sent_gbps, p.link_bound_share, p.bound_gbps, p.credit_wait_share) == (
        1.0, 0.5, 0.5, 0.25,
    )  # fmt: skip
    assert (p.tcp_bound_share, p.tcp_gbps) == (0.25, pytest.approx(0.2))
    assert le.retransmit_ratio([p]) == pytest.approx(0.01)
    assert le.period(b, a) is None  # counters went back: a restarted sender
    with pytest.raises(ConfigError, match="alphas"):
        le.LinkEstimateConfig(alpha_up=0.0)
    with pytest.raises(ConfigError, match="> 0 Gbps"):
        le.initial_estimate(0.0, 10.0)


def test_recovery_jumps_to_what_was_delivered_but_never_past_the_provisioned_rate() -> None:
    est = le.update(C, le.initial_estimate(10.0, 99.0), [_period(1.0, 1.0, 1.0)], now_s=0.0)
    buffered = replace(_period(0.0), sent_gbps=8.0)  # handed to buffers, nothing delivered yet
    est = le.update(C, est, [buffered], now_s=1.0)
    assert est.gbps == pytest.approx(1.0)  # bytes in buffers are no evidence of a faster link
    est = le.update(C, est, [_period(6.0)], now_s=1.0 + C.recover_s)  # quiet, 6 delivered
    assert est.gbps == pytest.approx(6.0)
    est = le.update(C, est, [_period(30.0)], now_s=2.0 + C.recover_s)  # one lumpy period
    assert est.gbps == pytest.approx(10.0)
