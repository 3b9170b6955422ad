"""The embedded testbed end to end: workers as processes, the router, stock tritonclient; and
its YAML configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from trtllm_prfaas.errors import ConfigError, TransportError
from trtllm_prfaas.testbed import demo
from trtllm_prfaas.testbed.spec import TestbedConfig, load_testbed_config
from trtllm_prfaas.testbed.up import Testbed
from trtllm_prfaas.worker.client import WorkerClient


def test_testbed_serves_tritonclient_with_single_engine_tokens() -> None:
    config = TestbedConfig(
        model_preset="tiny", grpc_port=0, metrics_port=0, threshold_tokens=100, num_blocks=512
    )
    with Testbed(config) as testbed:
        assert testbed.router is not None
        assert "Curve-encrypted" in testbed.describe()
        results = demo.demo_prompts(config.threshold_tokens)
        demo.run_demo(testbed.router.address, results, timeout_s=120)
        want = demo.reference_tokens(config, results)
        assert [r.error for r in results] == [""] * len(results)
        assert [r.token_ids for r in results] == want
        decisions = testbed.router.orchestrator.decisions
        assert sorted(d.is_remote for d in decisions) == [False] * 3 + [True] * 3
        assert testbed.router.metrics_server is not None
        figures = demo.scrape(testbed.router.metrics_server.url)
        assert figures["prfaas_relay_bytes_total"] > 0
        assert figures['prfaas_requests_total|route="remote",status="ok"}'] == 3
        for result in (results[0], results[2]):  # one local, one remote: unary == streaming
            assert _unary_ids(testbed.router.address, result) == result.token_ids
        _assert_control_is_curve(testbed)
        codes = testbed.close()
    assert codes and all(code == 0 for code in codes.values())


def _assert_control_is_curve(testbed: Testbed) -> None:
    """The router's control sockets are Curve: a worker answers the router's keys, and a
    plaintext DEALER gets no answer (its handshake is refused)."""
    assert testbed.control_security.curve is not None
    for proc in testbed.workers.values():
        with proc.client() as client:
            assert client.ping(10).worker_id
        with WorkerClient(proc.control) as stranger, pytest.raises(TransportError):
            stranger.ping(1.0)


def _unary_ids(address: str, result: demo.DemoResult) -> list[int]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    try:
        inputs = [i for i in demo._inputs(result) if i.name() != "streaming"]
        response = client.infer("tensorrt_llm", inputs, client_timeout=60)
        return [int(t) for t in response.as_numpy("output_ids")]
    finally:
        client.close()


def test_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "testbed.yaml"
    path.write_text("threshold_tokens: 4096\nlink_gbps: 10\nclusters: {pd_decode: 2}\n")
    config = load_testbed_config(path, grpc_port=0)
    assert (config.threshold_tokens, config.link_gbps, config.num_pd_decode) == (4096, 10, 2)
    assert config.grpc_port == 0
    paced = [args for name, args in config.worker_args().items() if "--link-gbps" in args]
    assert len(paced) == 1 and "dc-remote" in paced[0]  # only the inter-DC sender is paced


def test_prefix_routing_key_reaches_the_router(tmp_path: Path) -> None:
    """``prefix_routing: false`` makes the testbed's router cache-blind (default: aware)."""
    path = tmp_path / "testbed.yaml"
    path.write_text("prefix_routing: false\nenable_block_reuse: true\n")
    for config, expected in ((load_testbed_config(None), True), (load_testbed_config(path), False)):
        testbed = Testbed(config)
        try:
            assert testbed._router_config().prefix_routing is expected
        finally:
            testbed.close()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("prefix_routing: sometimes\n", "prefix_routing"),
        ("bogus: 1\n", "unknown keys"),
        ("clusters: {gpus: 3}\n", "clusters.gpus"),
        ("model_preset: huge\n", "model_preset"),
        ("- a list\n", "mapping"),
        ("link_gbps: -1\n", "link_gbps"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_testbed_config(path)
