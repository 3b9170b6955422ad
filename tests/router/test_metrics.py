"""RouterMetrics on a private registry, served over HTTP by MetricsServer."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry

from trtllm_prfaas.telemetry.metrics import MetricsServer, RouterMetrics


def test_metrics_families_are_served() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    metrics.record_request("remote", "ok")
    metrics.record_frontdoor("tensorrt_llm", "ModelInfer", "OK")
    metrics.observe_latency("tensorrt_llm", 0.12, 0.004)
    metrics.observe_latency("tensorrt_llm", None, None)  # no token: nothing recorded
    metrics.add_relay_bytes("dc-remote->dc-local", 1 << 20, goodput_gbps=8.5)
    metrics.set_worker_load("pd-d-0", queue_depth=3, free_decode_slots=5)
    with MetricsServer(registry, port=0) as server:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=5) as response:
            body = response.read().decode()
    for line in (
        'prfaas_requests_total{route="remote",status="ok"} 1.0',
        'prfaas_frontdoor_requests_total{model="tensorrt_llm",rpc="ModelInfer",status="OK"} 1.0',
        'prfaas_ttft_seconds_count{model="tensorrt_llm"} 1.0',
        'prfaas_tpot_seconds_bucket{le="0.005",model="tensorrt_llm"} 1.0',
        'prfaas_relay_bytes_total{link="dc-remote->dc-local"} 1.048576e+06',
        'prfaas_relay_goodput_gbps{link="dc-remote->dc-local"} 8.5',
        'prfaas_worker_queue_depth{worker="pd-d-0"} 3.0',
        'prfaas_worker_free_decode_slots{worker="pd-d-0"} 5.0',
    ):
        assert line in body, line


def test_two_registries_do_not_collide() -> None:
    first, second = RouterMetrics(CollectorRegistry()), RouterMetrics(CollectorRegistry())
    first.record_request("local", "ok")
    assert second.requests.labels(route="local", status="ok")._value.get() == 0
