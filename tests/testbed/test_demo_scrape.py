"""``testbed.demo.scrape``: labelled samples by key and summed per family; an unlabelled sample
once (it was counted twice: its key and its family's name are the same string)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from trtllm_prfaas.telemetry.metrics import MetricsServer
from trtllm_prfaas.testbed import demo


def test_scrape_sums_labelled_samples_and_counts_unlabelled_ones_once() -> None:
    registry = CollectorRegistry()
    Gauge("prfaas_router_is_leader", "x", registry=registry).set(1)
    relayed = Counter("prfaas_relay_bytes", "x", ["link"], registry=registry)
    relayed.labels(link="a").inc(3)
    relayed.labels(link="b").inc(4)
    server = MetricsServer(registry, port=0)
    try:
        figures = demo.scrape(f"http://127.0.0.1:{server.port}/metrics")
    finally:
        server.close()
    assert figures["prfaas_router_is_leader"] == 1.0
    assert figures["prfaas_relay_bytes_total"] == 7.0
    assert figures['prfaas_relay_bytes_total|link="a"}'] == 3.0
