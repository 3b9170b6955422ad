"""The front door's error mapping, deadlines and cancellation, over a scripted orchestrator."""

from __future__ import annotations

import queue

import pytest
from tritonclient.utils import InferenceServerException

from tests.router.builders import MODEL, ids_of, is_final, llm_inputs, stream, text_of
from tests.router.fakes import FakeOrchestrator
from trtllm_prfaas.errors import (
    AdmissionRejected,
    ConfigError,
    ConnectorError,
    DeadlineExceeded,
    EngineError,
    InvalidRequestError,
    TransferTimeout,
    TransportError,
)
from trtllm_prfaas.router.api import TokenChunk
from trtllm_prfaas.router.frontdoor import FrontDoor, FrontDoorConfig

MAPPING = [
    (InvalidRequestError("prompt is bad"), "INVALID_ARGUMENT", "prompt is bad"),
    (AdmissionRejected("no decode slot"), "UNAVAILABLE", "no decode slot"),
    (TransferTimeout("relay missed its deadline"), "DEADLINE_EXCEEDED", "relay missed"),
    (DeadlineExceeded("request ran past 30 s"), "DEADLINE_EXCEEDED", "ran past 30 s"),
    (EngineError("engine died"), "INTERNAL", "engine died"),
    (ConnectorError("load failed"), "INTERNAL", "load failed"),
    (TransportError("peer gone"), "INTERNAL", "peer gone"),
    (RuntimeError("a bug"), "INTERNAL", "internal error: RuntimeError: a bug"),
]


@pytest.mark.parametrize(("error", "status", "message"), MAPPING)
def test_unary_error_mapping(serve, error, status, message) -> None:
    fake = FakeOrchestrator(chunks=[TokenChunk([65], "A")], error=error)
    _, client = serve(fake)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, llm_inputs())
    assert info.value.status() == f"StatusCode.{status}"
    assert message in info.value.message()
    fake.error = None
    fake.chunks = [TokenChunk([66], "B", True, "stop")]
    assert text_of(client.infer(MODEL, llm_inputs())) == "B"  # still serving


@pytest.mark.parametrize(("error", "status", "message"), MAPPING[1:3])
def test_stream_error_after_tokens(serve, error, status, message) -> None:
    fake = FakeOrchestrator(chunks=[TokenChunk([65], "A")], error=error)
    _, client = serve(fake)
    first, failure = stream(client, llm_inputs(streaming=True), request_id="s1")
    assert text_of(first) == "A" and not is_final(first)
    assert isinstance(failure, InferenceServerException)
    assert message in failure.message() and "s1" in failure.message()


def test_request_fields_and_deadline_reach_the_orchestrator(serve) -> None:
    fake = FakeOrchestrator()
    _, client = serve(fake, request_timeout_s=30.0)
    client.infer(MODEL, llm_inputs("hey", 5, 0.25, 99))
    client.infer(MODEL, llm_inputs("hey", 5), client_timeout=2.0)
    first, second = fake.requests
    assert first.prompt_token_ids == [256, *b"hey"] and first.max_tokens == 5
    assert (first.temperature, first.seed) == (0.25, 99)
    assert first.streaming and first.deadline_s == 30.0  # per-token chunks, always
    assert 0 < second.deadline_s < 2.1  # the client's gRPC deadline wins (clock slack)
    assert first.request_id != second.request_id


def test_not_ready(serve) -> None:
    _, client = serve(FakeOrchestrator(ready=False))
    assert client.is_server_live() and not client.is_server_ready()
    assert not client.is_model_ready(MODEL)


def test_custom_model_name(serve) -> None:
    _, client = serve(FakeOrchestrator(model_name="llama"))
    assert client.is_model_ready("llama") and not client.is_model_ready(MODEL)
    assert ids_of(client.infer("llama", llm_inputs())) == [72, 105]


def test_unary_cancellation_reaches_orchestrator(serve) -> None:
    fake = FakeOrchestrator(chunks=[], hang=True)
    _, client = serve(fake)
    done: queue.Queue = queue.Queue()
    call = client.async_infer(MODEL, llm_inputs(), callback=lambda result, error: done.put(error))
    assert fake.started.wait(5)
    call.cancel()
    assert fake.cancelled_event.wait(5)
    assert isinstance(done.get(timeout=5), InferenceServerException)


def test_stream_cancellation_reaches_orchestrator(serve) -> None:
    fake = FakeOrchestrator(chunks=[TokenChunk([65], "A")], hang=True)
    _, client = serve(fake)
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put(error or result))
    try:
        client.async_stream_infer(MODEL, llm_inputs(streaming=True))
        assert text_of(received.get(timeout=5)) == "A"
    finally:
        client.stop_stream(cancel_requests=True)
    assert fake.cancelled_event.wait(5)


def test_server_shutdown_cancels_in_flight_requests(serve) -> None:
    fake = FakeOrchestrator(chunks=[], hang=True)
    door, client = serve(fake, shutdown_grace_s=0.1)
    client.async_infer(MODEL, llm_inputs(), callback=lambda result, error: None)
    assert fake.started.wait(5)
    door.close()
    assert fake.cancelled_event.wait(5)


def test_port_in_use_is_a_config_error(serve) -> None:
    door, _ = serve(FakeOrchestrator())
    second = FrontDoor(FakeOrchestrator(), FrontDoorConfig(port=door.port))
    with pytest.raises(ConfigError, match=str(door.port)):
        second.start()
    second.close()
