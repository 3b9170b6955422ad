"""Scraping the router's Prometheus endpoint: deltas, absent metrics, unreachable endpoint."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter

from trtllm_prfaas.loadgen.scrape import MetricsUnavailable, parse, router_delta, scrape
from trtllm_prfaas.telemetry.metrics import MetricsServer, RouterMetrics


def test_deltas_from_a_router_registry() -> None:
    metrics = RouterMetrics(CollectorRegistry())
    metrics.record_request("local", "ok")  # before the run: not counted
    metrics.add_relay_bytes("dc-remote->dc-local", 1000)
    with MetricsServer(metrics.registry, port=0) as server:
        before = scrape(server.url, taken_at=10.0)
        for _ in range(3):
            metrics.record_request("remote", "ok")
        metrics.record_request("local", "ok")
        metrics.add_relay_bytes("dc-remote->dc-local", 2_000_000_000)
        metrics.add_relay_bytes("dc-remote2->dc-local", 500_000_000)
        after = scrape(server.url, taken_at=12.0)
    delta = router_delta(before, after)
    assert delta.num_routed == 4 and delta.remote_share == pytest.approx(0.75)
    assert delta.relay_bytes == 2_500_000_000
    assert delta.egress_gbps == pytest.approx(2.5e9 * 8 / 1e9 / 2.0)


def test_declared_but_unused_metrics_are_zero_not_absent() -> None:
    metrics = RouterMetrics(CollectorRegistry())
    with MetricsServer(metrics.registry, port=0) as server:
        before, after = scrape(server.url, 0.0), scrape(server.url, 1.0)
    delta = router_delta(before, after)
    assert delta.num_routed == 0 and delta.remote_share is None  # nothing routed: no share
    assert delta.relay_bytes == 0 and delta.egress_gbps == 0


def test_absent_metrics_are_none() -> None:
    registry = CollectorRegistry()
    Counter("something_else", "not the router's", registry=registry).inc()
    with MetricsServer(registry, port=0) as server:
        before, after = scrape(server.url, 0.0), scrape(server.url, 1.0)
    delta = router_delta(before, after)
    assert (delta.num_routed, delta.remote_share, delta.relay_bytes, delta.egress_gbps) == (
        None, None, None, None)  # fmt: skip


def test_unreachable_and_malformed_endpoints_raise() -> None:
    with MetricsServer(CollectorRegistry(), port=0) as server:
        url = server.url
    with pytest.raises(MetricsUnavailable, match="cannot read"):
        scrape(url, 0.0, timeout_s=2.0)  # closed: connection refused
    with pytest.raises(MetricsUnavailable, match="cannot parse"):
        parse("prfaas_requests_total{route=} not-a-number\n", 0.0)
