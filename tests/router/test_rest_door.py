"""The KServe v2 REST door (``router/kserve_rest.py`` on ``router/http_door.py``) against stock
``tritonclient.http`` and plain ``httpx``, beside the gRPC door over the same tiny engine.

Checked: health, server/model metadata and config (equal to the gRPC door's); infer with
``text_input`` in Triton's binary tensor extension (tritonclient's default) and in JSON, with
greedy tokens equal to the gRPC door's for the same prompt; Triton's generate extension
(``generate`` JSON, ``generate_stream`` SSE ``data: {...}`` events whose pieces join to the unary
text); errors as Triton's REST shapes them (``{"error": ...}``: unknown model 404, bad JSON or a
mistyped field 400 naming it); a malformed body and a 10 MB prompt do not hurt a concurrent
stream; the door's stop ends an in-flight stream within its grace.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from tests.router.builders import MODEL, ids_of, llm_inputs, text_of
from tests.router.test_router_command import keys, workers  # noqa: F401 (module fixtures)
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router.frontdoor import FrontDoor
from trtllm_prfaas.router.http_door import HttpDoor, HttpDoorConfig
from trtllm_prfaas.router.kserve_rest import rest_app
from trtllm_prfaas.router.local import LocalEngineOrchestrator
from trtllm_prfaas.router.servicer import FrontDoorConfig
from trtllm_prfaas.telemetry.metrics import RouterMetrics

PROMPT = "Prefill-as-a-Service moves KVCache across datacenters."
TIMEOUT = httpx.Timeout(30.0)


@pytest.fixture
def doors(
    orchestrator: LocalEngineOrchestrator, registry: CollectorRegistry
) -> Iterator[tuple[Any, HttpDoor]]:
    """A gRPC client and the REST door over the same orchestrator and the same metrics."""
    metrics = RouterMetrics(registry)
    with (
        FrontDoor(orchestrator, FrontDoorConfig(port=0), metrics) as grpc_door,
        grpcclient.InferenceServerClient(grpc_door.address) as grpc_client,
        HttpDoor(rest_app(orchestrator, FrontDoorConfig(port=0), metrics),
                 HttpDoorConfig(port=0, shutdown_grace_s=0.5)) as door,
    ):  # fmt: skip
        yield grpc_client, door


@pytest.fixture
def rest(doors: tuple[Any, HttpDoor]) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(doors[1].url.removeprefix("http://"),
                                              network_timeout=30.0)  # fmt: skip
    yield client
    client.close()


def http_inputs(text: str, max_tokens: int, binary: bool = True) -> list[Any]:
    prompt = httpclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([text.encode()], dtype=object), binary_data=binary)
    limit = httpclient.InferInput("sampling_param_max_tokens", [1], "INT32")
    limit.set_data_from_numpy(np.array([max_tokens], dtype=np.int32), binary_data=binary)
    return [prompt, limit]


def test_health_and_metadata_equal_the_grpc_doors(doors, rest) -> None:
    grpc_client, _ = doors
    assert rest.is_server_live() and rest.is_server_ready()
    assert rest.is_model_ready(MODEL) and rest.is_model_ready("ensemble")
    assert not rest.is_model_ready("nope")
    assert rest.get_server_metadata()["name"] == "trtllm-prfaas"
    for model in (MODEL, "ensemble"):
        meta = rest.get_model_metadata(model)
        expected = grpc_client.get_model_metadata(model, as_json=True)
        assert meta["name"] == expected["name"] and meta["versions"] == expected["versions"]
        assert meta["inputs"] == [{**t, "shape": [int(d) for d in t["shape"]]}
                                  for t in expected["inputs"]]  # fmt: skip
        assert meta["outputs"] == [{**t, "shape": [int(d) for d in t["shape"]]}
                                   for t in expected["outputs"]]  # fmt: skip
        config = rest.get_model_config(model)
        grpc_config = grpc_client.get_model_config(model, as_json=True)["config"]
        assert [i["name"] for i in config["input"]] == [i["name"] for i in grpc_config["input"]]
        assert config["model_transaction_policy"] == {"decoupled": True}
        assert all(isinstance(d, int) for i in config["input"] for d in i["dims"])


@pytest.mark.parametrize("binary", [True, False])
def test_infer_tokens_equal_the_grpc_doors(doors, rest, binary) -> None:
    grpc_client, _ = doors
    expected = grpc_client.infer(MODEL, llm_inputs(PROMPT, max_tokens=12))
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary)
               for n in ("text_output", "output_ids")]  # fmt: skip
    result = rest.infer(MODEL, http_inputs(PROMPT, 12, binary), outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    assert [int(t) for t in result.as_numpy("output_ids")] == ids_of(expected)
    text = result.as_numpy("text_output")[0]
    assert (text.decode() if isinstance(text, bytes) else text) == text_of(expected)
    assert len(ids_of(expected)) == 12


def test_rest_requests_count_in_the_grpc_doors_metrics(doors, rest, registry) -> None:
    rest.infer(MODEL, http_inputs(PROMPT, 3))
    with pytest.raises(InferenceServerException):
        rest.infer(MODEL, http_inputs(PROMPT, 0))
    labels = {"model": MODEL, "rpc": "ModelInfer"}
    value = registry.get_sample_value
    assert value("prfaas_frontdoor_requests_total", {**labels, "status": "OK"}) == 1.0
    assert value("prfaas_frontdoor_requests_total", {**labels, "status": "INVALID_ARGUMENT"}) == 1


def test_a_unary_client_that_leaves_cancels_its_request(doors, registry, orchestrator) -> None:
    _, door = doors
    body = {"text_input": PROMPT, "max_tokens": 1500, "exclude_input_in_output": True}
    with (
        httpx.Client(base_url=door.url, timeout=httpx.Timeout(0.5)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v2/models/ensemble/generate", json=body)
    labels = {"model": "ensemble", "rpc": "ModelInfer", "status": "CANCELLED"}
    deadline = time.monotonic() + 10
    while registry.get_sample_value("prfaas_frontdoor_requests_total", labels) != 1.0:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.05)
    while orchestrator.leak_report() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert orchestrator.leak_report() == []  # its blocks are free while the door still serves


def test_a_stream_client_that_leaves_cancels_its_request(doors, registry, orchestrator) -> None:
    _, door = doors
    body = {"text_input": PROMPT, "max_tokens": 1500, "stream": True}
    with (
        httpx.Client(base_url=door.url, timeout=TIMEOUT) as http,
        http.stream("POST", "/v2/models/ensemble/generate_stream", json=body) as response,
    ):
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert "text_output" in json.loads(first.removeprefix("data: "))
    labels = {"model": "ensemble", "rpc": "ModelStreamInfer", "status": "CANCELLED"}
    deadline = time.monotonic() + 10
    while registry.get_sample_value("prfaas_frontdoor_requests_total", labels) != 1.0:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.05)
    while orchestrator.leak_report() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert orchestrator.leak_report() == []


def test_tritons_timeout_parameter_is_the_deadline(doors, rest) -> None:
    _, door = doors
    body = {"text_input": PROMPT, "max_tokens": 1500, "parameters": {"timeout": 200_000}}
    with httpx.Client(base_url=door.url, timeout=TIMEOUT) as http:
        late = http.post("/v2/models/ensemble/generate", json=body)
        bad = http.post("/v2/models/ensemble/generate", json={**body, "timeout": "soon"})
    assert late.status_code == 504 and "deadline" in late.json()["error"]
    assert bad.status_code == 400 and "'timeout'" in bad.json()["error"]
    with pytest.raises(InferenceServerException, match="deadline"):
        rest.infer(MODEL, http_inputs(PROMPT, 1500), timeout=200_000)  # microseconds


def test_infer_default_outputs_come_binary(doors, rest) -> None:
    grpc_client, _ = doors
    expected = grpc_client.infer(MODEL, llm_inputs(PROMPT, max_tokens=5))
    result = rest.infer(MODEL, http_inputs(PROMPT, 5))  # tritonclient asks binary_data_output
    assert bytes(result.as_numpy("text_output")[0]).decode() == text_of(expected)


def test_generate_and_generate_stream_join_to_the_unary_text(doors) -> None:
    _, door = doors
    body = {"text_input": PROMPT, "max_tokens": 10, "exclude_input_in_output": True}
    with httpx.Client(base_url=door.url, timeout=TIMEOUT) as http:
        unary = http.post("/v2/models/ensemble/generate", json=body)
        assert unary.status_code == 200, unary.text
        document = unary.json()
        assert document["model_name"] == "ensemble" and document["model_version"] == "1"
        pieces = stream_events(http, "ensemble", {**body, "stream": True})
        llmapi = http.post(f"/v2/models/{MODEL}/generate",
                           json={"text_input": PROMPT, "parameters": {
                               "sampling_param_max_tokens": 10}}).json()  # fmt: skip
    assert len(pieces) == 10
    assert "".join(p["text_output"] for p in pieces) == document["text_output"]
    assert llmapi["text_output"] == document["text_output"]
    assert len(llmapi["output_ids"]) == 10


def stream_events(http: httpx.Client, model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ``data:`` event of one generate_stream call."""
    events = []
    with http.stream("POST", f"/v2/models/{model}/generate_stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_llmapi_generate_stream_is_cumulative(doors) -> None:
    _, door = doors
    body = {"text_input": PROMPT, "sampling_param_max_tokens": 6, "streaming": True}
    with httpx.Client(base_url=door.url, timeout=TIMEOUT) as http:
        pieces = stream_events(http, MODEL, body)
        unary = http.post(f"/v2/models/{MODEL}/generate", json=body).json()
    assert len(pieces) == 6 and pieces[-1]["text_output"] == unary["text_output"]


def test_errors_are_tritons_rest_shapes(doors, rest) -> None:
    _, door = doors
    with httpx.Client(base_url=door.url, timeout=TIMEOUT) as http:
        for path in ("/v2/models/nope", "/v2/models/nope/config"):
            assert http.get(path).status_code == 404
        missing = http.post("/v2/models/nope/generate", json={"text_input": "x"})
        assert missing.status_code == 404 and "'nope' is not found" in missing.json()["error"]
        stream_missing = http.post("/v2/models/nope/generate_stream", json={"text_input": "x"})
        assert stream_missing.status_code == 404
        bad = http.post(f"/v2/models/{MODEL}/infer", content=b"{not json")
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]
        no_shape = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": "text_input", "datatype": "BYTES", "data": ["x"]}]})  # fmt: skip
        assert no_shape.status_code == 400 and "'shape'" in no_shape.json()["error"]
        typed = http.post("/v2/models/ensemble/generate",
                          json={"text_input": PROMPT, "max_tokens": "ten"})  # fmt: skip
        assert typed.status_code == 400 and "'max_tokens'" in typed.json()["error"]
        required = http.post("/v2/models/ensemble/generate", json={"text_input": PROMPT})
        assert required.status_code == 400 and "'max_tokens'" in required.json()["error"]
        stream_bad = http.post(
            "/v2/models/ensemble/generate_stream",
            json={"text_input": PROMPT, "max_tokens": 0, "stream": True},
        )
        assert stream_bad.status_code == 400 and "max_tokens" in stream_bad.json()["error"]
    with pytest.raises(InferenceServerException, match="unexpected inference input 'bogus'"):
        bogus = httpclient.InferInput("bogus", [1], "INT32")
        bogus.set_data_from_numpy(np.array([1], dtype=np.int32))
        rest.infer(MODEL, [*http_inputs(PROMPT, 4), bogus])
    with pytest.raises(InferenceServerException, match="not found"):
        rest.infer("nope", http_inputs(PROMPT, 4))


def test_malformed_and_huge_bodies_do_not_hurt_a_concurrent_stream(doors) -> None:
    _, door = doors
    body = {"text_input": PROMPT, "max_tokens": 24, "stream": True,
            "exclude_input_in_output": True}  # fmt: skip
    with httpx.Client(base_url=door.url, timeout=TIMEOUT) as http:
        expected = http.post("/v2/models/ensemble/generate", json={**body, "stream": False})
        got: dict[str, Any] = {}

        def run() -> None:
            got["pieces"] = stream_events(http, "ensemble", body)

        worker = threading.Thread(target=run)
        worker.start()
        huge = http.post("/v2/models/ensemble/generate",
                         json={"text_input": "a" * 10_000_000, "max_tokens": 4})  # fmt: skip
        garbage = http.post(f"/v2/models/{MODEL}/infer", content=b"\xff" * 4096,
                            headers={"Inference-Header-Content-Length": "99999"})  # fmt: skip
        worker.join(30)
    assert huge.status_code == 400 and "exceeds the max length" in huge.json()["error"]
    assert garbage.status_code == 400 and "exceeds the body" in garbage.json()["error"]
    assert "".join(p["text_output"] for p in got["pieces"]) == expected.json()["text_output"]


def test_stop_ends_an_in_flight_stream_within_its_grace(orchestrator) -> None:
    app = rest_app(orchestrator, FrontDoorConfig(port=0))
    door = HttpDoor(app, HttpDoorConfig(port=0, shutdown_grace_s=0.2))
    door.start()
    ended: dict[str, Any] = {}

    def run() -> None:
        body = {"text_input": PROMPT, "max_tokens": 1500, "stream": True}
        try:
            with (
                httpx.Client(base_url=door.url, timeout=TIMEOUT) as http,
                http.stream("POST", "/v2/models/ensemble/generate_stream", json=body) as r,
            ):
                ended["status"] = r.status_code
                for _ in r.iter_lines():
                    ended.setdefault("first", time.monotonic())
                    time.sleep(0.05)  # a slow reader: the stream is still open at stop()
        except httpx.HTTPError as exc:
            ended["error"] = exc

    worker = threading.Thread(target=run)
    try:
        worker.start()
        deadline = time.monotonic() + 20
        while "first" not in ended and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
    finally:
        door.close()
    stopped_s = time.monotonic() - started
    worker.join(20)
    assert not worker.is_alive()
    assert ended["status"] == 200
    assert isinstance(ended.get("error"), httpx.RemoteProtocolError)  # cut, not finished
    assert stopped_s < 0.2 + 3.0
    assert orchestrator.leak_report() == []


def test_http_door_port_taken_is_a_config_error(orchestrator) -> None:
    app = rest_app(orchestrator)
    with HttpDoor(app, HttpDoorConfig(port=0)) as first:
        assert first.port
        with pytest.raises(ConfigError, match="cannot bind"):
            HttpDoor(app, HttpDoorConfig(port=first.port)).start()


def test_http_door_connections_have_tcp_nodelay() -> None:
    """A connection the door accepts sends without Nagle: with it, a response's header and body
    writes met the client's delayed ACK and every JSON answer took 40 ms more (asyncio sets
    TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and the door binds its own)."""
    import socket

    from trtllm_prfaas.router.http_door import bind

    listener = bind("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname()[:2], timeout=5)
    try:
        listener.setblocking(True)
        listener.settimeout(5)
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.close()
        listener.close()


def test_http_door_answers_json_without_a_delayed_ack(orchestrator) -> None:
    """Ten sequential model-metadata GETs on one kept-alive connection: each well under the
    40 ms a Nagle/delayed-ACK stall costs (median, so one slow scheduling does not fail it)."""
    with HttpDoor(rest_app(orchestrator), HttpDoorConfig(port=0)) as door, \
            httpx.Client(base_url=door.url, timeout=5) as http:  # fmt: skip
        took = []
        for _ in range(10):
            started = time.perf_counter()
            assert http.get(f"/v2/models/{MODEL}").status_code == 200
            took.append(time.perf_counter() - started)
    assert sorted(took)[5] < 0.030, took


# ---------------------------------------------------------------- through the PrfaaS router
def test_rest_door_of_the_disaggregated_router_equals_its_grpc_door() -> None:
    """``RouterService`` with ``http_port`` (what ``prfaas up`` and ``prfaas router
    --http-listen`` run): REST and gRPC requests reach the same orchestrator, long prompts go
    to the remote prefill and short ones stay local, and both doors answer the same tokens."""
    from trtllm_prfaas.testbed.spec import TestbedConfig
    from trtllm_prfaas.testbed.up import Testbed

    config = TestbedConfig(model_preset="tiny", grpc_port=0, metrics_port=0, http_port=0,
                           num_blocks=512, threshold_tokens=40)  # fmt: skip
    with Testbed(config) as bed:
        router = bed.router
        assert router is not None and router.http_url is not None
        assert f"KServe v2 REST (+ generate extension): {router.http_url}" in bed.describe()
        with (
            grpcclient.InferenceServerClient(router.address) as grpc_client,
            httpx.Client(base_url=router.http_url, timeout=httpx.Timeout(60.0)) as http,
        ):
            for prompt in (PROMPT * 2, "short one"):
                expected = grpc_client.infer(MODEL, llm_inputs(prompt, 6), client_timeout=60)
                body = {"text_input": prompt, "sampling_param_max_tokens": 6}
                got = http.post(f"/v2/models/{MODEL}/generate", json=body).json()
                assert got["output_ids"] == ids_of(expected)
                assert got["text_output"] == text_of(expected)
        decisions = [r.decision.is_remote for r in router.orchestrator.route_log]
        assert decisions == [True, True, False, False]
        assert router.orchestrator.counters["relay_recomputed"] == 0


def test_prfaas_router_takes_http_listen() -> None:
    import argparse

    from trtllm_prfaas.router import command

    parser = argparse.ArgumentParser()
    command.add_arguments("router", parser)
    args = parser.parse_args(["--http-listen", "127.0.0.1:8000", "--plaintext",
                              "--worker", "dc-local/prefill=h:1",
                              "--worker", "dc-local/decode=h:2"])  # fmt: skip
    assert command.load_settings(args).http_listen == ("127.0.0.1", 8000)
    args = parser.parse_args(["--plaintext", "--worker", "dc-local/prefill=h:1",
                              "--worker", "dc-local/decode=h:2"])  # fmt: skip
    assert command.load_settings(args).http_listen is None


def test_prfaas_router_process_serves_rest_with_single_engine_tokens(workers: Any) -> None:  # noqa: F811
    """A real ``prfaas router --http-listen`` process in front of real workers (the fixtures of
    ``test_router_command``): its ready line names the REST door, and generate over REST answers
    the single-engine tokens for a local and a remote prompt; SIGTERM still exits 0."""
    from tests.router import test_router_command as rc

    with rc.RouterProcess(*rc.router_args(workers, "--http-listen", "127.0.0.1:0")) as router:
        ready = router.wait_ready()
        url = ready["http"]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        with httpx.Client(base_url=url, timeout=httpx.Timeout(60.0)) as http:
            assert http.get("/v2/health/ready").status_code == 200
            for length in (40, 600):  # local (l <= t), remote (l > t)
                tokens = rc.prompt(length)
                body = {"input_ids": tokens, "sampling_param_max_tokens": 8,
                        "sampling_param_temperature": rc.TEMPERATURE,
                        "sampling_param_seed": rc.SEED}  # fmt: skip
                got = http.post(f"/v2/models/{MODEL}/generate", json=body)
                assert got.status_code == 200, got.text
                assert got.json()["output_ids"] == rc.reference(tokens, 8), length
        assert router.stop() == 0
    rc.assert_workers_idle(workers)


def test_http_door_on_a_given_loop_leaves_that_loop_running(orchestrator) -> None:
    """``HttpDoor(loop=...)`` serves on the caller's loop (the orchestrator's, in the router)
    and on close stops only its server: the loop and its thread stay the caller's."""
    import asyncio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with HttpDoor(rest_app(orchestrator), HttpDoorConfig(port=0), loop=loop) as door:
            assert httpx.get(door.url + "/v2/health/live", timeout=10).status_code == 200
        assert loop.is_running() and thread.is_alive()
        assert asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "ok"), loop).result(5) == "ok"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
