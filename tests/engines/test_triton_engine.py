"""TritonEngine against the project's own KServe front door (a stand-in Triton server) over a
tiny reference engine on 127.0.0.1 (port 0): same tokens as a direct run, abort, deadlines, and
a clear error for an unreachable server. Every server and engine is closed in ``finally``."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.router.conftest import make_engine
from trtllm_prfaas.engines.base import Engine
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.engines.tokenizer import ByteTokenizer
from trtllm_prfaas.engines.triton import TritonEngine, TritonEngineConfig
from trtllm_prfaas.errors import DeadlineExceeded, EngineError
from trtllm_prfaas.router.frontdoor import FrontDoor, FrontDoorConfig
from trtllm_prfaas.router.local import LocalEngineOrchestrator

PROMPT = ByteTokenizer().encode("Prefill-as-a-Service streams KV across datacenters.")


@pytest.fixture
def server() -> Iterator[tuple[FrontDoor, LocalEngineOrchestrator]]:
    orchestrator = LocalEngineOrchestrator(make_engine())
    door = FrontDoor(orchestrator, FrontDoorConfig(port=0))
    try:
        door.start()
        yield door, orchestrator
        deadline = time.monotonic() + 5  # cancelled requests leave the engine on its next step
        while orchestrator.leak_report() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert orchestrator.leak_report() == []
    finally:
        door.close()
        orchestrator.close()


def _run(engine: TritonEngine, timeout_s: float = 20.0) -> dict[int, list[RequestOutput]]:
    outputs: dict[int, list[RequestOutput]] = {}
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "TritonEngine did not finish"
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def _direct(prompt: list[int], sampling: SamplingParams) -> list[int]:
    engine = make_engine()
    (tokens,) = engine.generate([prompt], sampling)
    return tokens


@pytest.mark.parametrize("send_token_ids", [True, False])
def test_tokens_equal_a_direct_engine_run(server, send_token_ids: bool) -> None:
    door, _ = server
    config = TritonEngineConfig(door.address, send_token_ids=send_token_ids)
    greedy, sampled = SamplingParams(12), SamplingParams(9, temperature=0.8, seed=1234)
    with TritonEngine(config, ByteTokenizer()) as engine:
        assert isinstance(engine, Engine)
        a = engine.add_request(PROMPT, greedy)
        b = engine.add_request(PROMPT[:20], sampled, request_id=77)
        assert b == 77 and len(engine.running) == 2
        outputs = _run(engine)
        assert not engine.running and engine.slots.num_free == config.max_batch_size
    for rid, prompt, sampling in ((a, PROMPT, greedy), (b, PROMPT[:20], sampled)):
        streamed = outputs[rid]
        assert [o.finished for o in streamed] == [False] * (len(streamed) - 1) + [True]
        assert streamed[-1].finish_reason in ("length", "stop") and streamed[-1].error is None
        assert [t for o in streamed for t in o.new_token_ids] == _direct(prompt, sampling)


def test_connector_params_are_sent_and_ignored_by_a_plain_server(server) -> None:
    door, _ = server
    params = {"transfer_uuid": "u1", "relay_endpoint": "tcp://127.0.0.1:7100"}
    with TritonEngine(TritonEngineConfig(door.address)) as engine:
        rid = engine.add_request(PROMPT, SamplingParams(4), connector_params=params)
        tokens = [t for o in _run(engine)[rid] for t in o.new_token_ids]
    assert tokens == _direct(PROMPT, SamplingParams(4))


def test_abort_cancels_on_the_server(server) -> None:
    door, _ = server
    with TritonEngine(TritonEngineConfig(door.address)) as engine:
        sampling = SamplingParams(1500, temperature=1.0, seed=3, ignore_eos=True)
        rid = engine.add_request(PROMPT, sampling)
        deadline = time.monotonic() + 10
        while not any(o.new_token_ids for o in engine.step()):
            assert time.monotonic() < deadline
        final = engine.abort(rid)
        assert final == RequestOutput(rid, [], True, "aborted")
        assert engine.abort(rid) is None and not engine.has_unfinished()
        time.sleep(0.1)
        assert all(o.request_id != rid for o in engine.step())


def test_request_deadline_ends_it_with_deadline_exceeded(server) -> None:
    door, _ = server
    config = TritonEngineConfig(door.address, request_timeout_s=0.3)
    with TritonEngine(config) as engine:
        rid = engine.add_request(PROMPT, SamplingParams(1500, temperature=1.0, ignore_eos=True))
        started = time.monotonic()
        final = _run(engine)[rid][-1]
        assert time.monotonic() - started < 5
    assert final.finished and final.finish_reason == "error"
    assert isinstance(final.error, DeadlineExceeded)


def test_server_side_refusal_is_an_error_output(server) -> None:
    door, _ = server
    with TritonEngine(TritonEngineConfig(door.address)) as engine:
        rid = engine.add_request([1, 2, 3], SamplingParams(10**6))  # longer than max_seq_len
        (final,) = _run(engine)[rid]
    assert final.finish_reason == "error" and isinstance(final.error, EngineError)
    assert "exceeds the max length" in str(final.error)


def test_unreachable_server_fails_fast_and_clearly() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(EngineError, match=rf"127\.0\.0\.1:{port} is unreachable within 0\.5s"):
        TritonEngine(TritonEngineConfig(f"127.0.0.1:{port}", connect_timeout_s=0.5))
    assert time.monotonic() - started < 3.0


def test_unknown_model_is_refused_at_start(server) -> None:
    door, _ = server
    with pytest.raises(EngineError, match="does not serve a ready 'nope'"):
        TritonEngine(TritonEngineConfig(door.address, model_name="nope"))
