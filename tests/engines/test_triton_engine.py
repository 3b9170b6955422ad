"""TritonEngine against a fake Triton serving TensorRT-LLM's ``llmapi`` model
(``tests/fakes/llmapi_triton.py``, rebuilt from upstream's source) on 127.0.0.1 (port 0).

The prefill model is non-decoupled (unary), the decode model decoupled (streamed, cumulative
``text_output``). Tokens must equal what the served model generated, re-encoded with the model's
own tokenizer; finish reasons must be the model's; requests must carry only the model's declared
inputs. Every server and engine is closed in ``finally`` / ``with``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferResult

from tests.fakes import tokenizer as fake_tokenizer
from tests.fakes.llmapi_triton import INPUTS, FakeLlmapiTriton
from trtllm_prfaas.connector.plans import Plan, PlanBook, PlanServer, tokens_digest
from trtllm_prfaas.engines.base import Engine
from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.engines.triton import TritonEngine, TritonEngineConfig
from trtllm_prfaas.errors import DeadlineExceeded, EngineError
from trtllm_prfaas.transport import InboundStatus
from trtllm_prfaas.transport.config import RelaySecurity

hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture
PROMPT_TEXT = "Prefill-as-a-Service streams KV across datacenters: 東京 🚀 naïve"


def make_engine(server: FakeLlmapiTriton, model_dir: Path, **config: Any) -> TritonEngine:
    """A TritonEngine on ``server`` that knows the served model's directory."""
    cfg = TritonEngineConfig(server.address, tokenizer_dir=str(model_dir), **config)
    return TritonEngine(cfg)


@pytest.fixture
def tokenizer(hf_model_dir: Path) -> HfTokenizer:
    return HfTokenizer.from_dir(hf_model_dir)


@pytest.fixture(params=[False, True], ids=["prefill-unary", "decode-decoupled"])
def triton(request: pytest.FixtureRequest, hf_model_dir: Path) -> Iterator[FakeLlmapiTriton]:
    with FakeLlmapiTriton(hf_model_dir, decoupled=request.param) as server:
        yield server


def _run(engine: TritonEngine, timeout_s: float = 20.0) -> dict[int, list[RequestOutput]]:
    outputs: dict[int, list[RequestOutput]] = {}
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "TritonEngine did not finish"
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def test_tokens_and_finish_reasons_are_the_models(
    triton: FakeLlmapiTriton,
    hf_model_dir: Path,
    tokenizer: HfTokenizer,
) -> None:
    prompt = tokenizer.encode(PROMPT_TEXT)
    greedy, sampled = SamplingParams(12), SamplingParams(9, temperature=0.8, seed=1234)
    with make_engine(triton, hf_model_dir) as engine:
        assert isinstance(engine, Engine)
        a = engine.add_request(prompt, greedy)
        b = engine.add_request(prompt[:9], sampled, request_id=77)
        assert b == 77 and len(engine.running) == 2
        outputs = _run(engine)
        assert not engine.running
    for rid, ids, sampling in ((a, prompt, greedy), (b, prompt[:9], sampled)):
        temperature = sampling.temperature or None
        ref = triton.llm.reference(
            tokenizer.decode(ids), sampling.max_tokens, temperature, sampling.seed
        )
        streamed = outputs[rid]
        assert [o.finished for o in streamed] == [False] * (len(streamed) - 1) + [True]
        assert streamed[-1].finish_reason == ref.finish_reason == "length"
        assert streamed[-1].error is None
        assert _tokens(streamed) == tokenizer.encode(ref.text, add_special_tokens=False)
        if "\ufffd" not in ref.text:  # whole characters: text I/O carries the exact ids
            assert _tokens(streamed) == ref.token_ids


def test_eos_ends_with_stop(hf_model_dir: Path, tokenizer: HfTokenizer) -> None:
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=True, eos_rate=0.3) as triton,
        make_engine(triton, hf_model_dir) as engine,
    ):
        prompts = [tokenizer.encode(f"{PROMPT_TEXT} {i}") for i in range(6)]
        rids = [engine.add_request(p, SamplingParams(40)) for p in prompts]
        outputs = _run(engine)
        for rid, prompt in zip(rids, prompts, strict=True):
            ref = triton.llm.reference(tokenizer.decode(prompt), 40)
            assert outputs[rid][-1].finish_reason == ref.finish_reason == "stop"
            assert _tokens(outputs[rid]) == ref.token_ids


def test_streamed_outputs_carry_only_new_tokens(
    hf_model_dir: Path,
    tokenizer: HfTokenizer,
) -> None:
    with FakeLlmapiTriton(hf_model_dir, decoupled=True) as triton:
        prompt = tokenizer.encode(PROMPT_TEXT)
        with make_engine(triton, hf_model_dir) as engine:
            rid = engine.add_request(prompt, SamplingParams(40))
            streamed = _run(engine)[rid]
        ref = triton.llm.reference(tokenizer.decode(prompt), 40)
    assert len(streamed) > 3  # streamed, not one unary answer
    assert _tokens(streamed) == ref.token_ids  # no token repeated from a cumulative text
    assert tokenizer.decode(_tokens(streamed)) == ref.text


def test_requests_follow_the_llmapi_contract(
    triton: FakeLlmapiTriton,
    hf_model_dir: Path,
    tokenizer: HfTokenizer,
) -> None:
    prompt = tokenizer.encode(PROMPT_TEXT)
    with make_engine(triton, hf_model_dir) as engine:
        engine.add_request(prompt, SamplingParams(3, temperature=0.5, seed=9))
        _run(engine)
    (request,) = triton.stats.requests
    declared = {name: dtype for name, dtype, _, _ in INPUTS}
    sent = {t.name: t for t in request.inputs}
    assert set(sent) <= set(declared)
    assert not request.parameters  # llmapi's model.py never reads request parameters
    values = {name: _input(request, name) for name in sent}
    assert values["text_input"] == [tokenizer.decode(prompt).encode()]
    assert values["sampling_param_max_tokens"] == [3]
    assert values["sampling_param_seed"] == [9] and values["return_finish_reason"] == [True]
    decoupled = triton.config.model_transaction_policy.decoupled
    assert values.get("streaming", [False]) == [decoupled]


def _input(request: Any, name: str) -> list[Any]:
    """One input's values, decoded as Triton would."""
    response = InferResult(_as_response(request)).as_numpy(name)
    assert response is not None
    return [v.item() if isinstance(v, np.generic) else v for v in response.reshape(-1)]


def _as_response(request: Any) -> Any:
    """A ModelInferResponse holding the request's inputs (to reuse tritonclient's decoder)."""
    from tritonclient.grpc import service_pb2

    response = service_pb2.ModelInferResponse()
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(raw)
    return response


def test_abort_cancels_on_the_server(hf_model_dir: Path, tokenizer: HfTokenizer) -> None:
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=True, token_delay_s=0.01) as triton,
        make_engine(triton, hf_model_dir) as engine,
    ):
        rid = engine.add_request(tokenizer.encode(PROMPT_TEXT), SamplingParams(1500))
        deadline = time.monotonic() + 10
        while not any(o.new_token_ids for o in engine.step()):
            assert time.monotonic() < deadline
        assert engine.abort(rid) == RequestOutput(rid, [], True, "aborted")
        assert engine.abort(rid) is None and not engine.has_unfinished()
        time.sleep(0.1)
        assert all(o.request_id != rid for o in engine.step())
        deadline = time.monotonic() + 5
        while triton.stats.num_cancelled < 1:
            assert time.monotonic() < deadline, "the server never saw the cancel"
            time.sleep(0.02)


def test_request_deadline_ends_it_with_deadline_exceeded(
    triton: FakeLlmapiTriton,
    hf_model_dir: Path,
    tokenizer: HfTokenizer,
) -> None:
    triton.llm.token_delay_s = 0.01
    with make_engine(triton, hf_model_dir, request_timeout_s=0.3) as engine:
        rid = engine.add_request(tokenizer.encode(PROMPT_TEXT), SamplingParams(1500))
        started = time.monotonic()
        final = _run(engine)[rid][-1]
        assert time.monotonic() - started < 5
    assert final.finished and final.finish_reason == "error"
    assert isinstance(final.error, DeadlineExceeded)


def test_model_refusal_is_an_error_output(
    triton: FakeLlmapiTriton,
    hf_model_dir: Path,
    tokenizer: HfTokenizer,
) -> None:
    with make_engine(triton, hf_model_dir) as engine:
        rid = engine.add_request(tokenizer.encode("hi"), SamplingParams(10**6))
        (final,) = _run(engine)[rid]
    assert final.finish_reason == "error" and isinstance(final.error, EngineError)
    assert "should not exceed max_seq_len" in str(final.error)


def test_unreachable_server_fails_fast_and_clearly(hf_model_dir: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    config = TritonEngineConfig(f"127.0.0.1:{port}", connect_timeout_s=0.5,
                                tokenizer_dir=str(hf_model_dir))  # fmt: skip
    with pytest.raises(EngineError, match=rf"127\.0\.0\.1:{port} is unreachable within 0\.5s"):
        TritonEngine(config)
    assert time.monotonic() - started < 3.0


def test_unknown_model_is_refused_at_start(
    triton: FakeLlmapiTriton,
    hf_model_dir: Path,
) -> None:
    with pytest.raises(EngineError, match="does not serve a ready 'nope'"):
        make_engine(triton, hf_model_dir, model_name="nope")


# ------------------------------------------------------------------------------- plans
PLAIN = RelaySecurity.insecure_plaintext()


@pytest.fixture
def plan_servers() -> Iterator[tuple[PlanBook, dict[tuple[str, int], list[str]], list[str]]]:
    """Two connector ranks' plan servers (rank 0 holds the book); statuses[(uuid, n)] lists each
    rank's answer. Yields (book, statuses, endpoints in rank order)."""
    book, statuses = PlanBook(), {}

    def status_of(rank: int) -> Any:
        return lambda uuid, n: statuses.get((uuid, n), ["", ""])[rank]

    with (
        PlanServer("tcp://127.0.0.1:0", PLAIN, 0, book=book, status_of=status_of(0)) as s0,
        PlanServer("tcp://127.0.0.1:0", PLAIN, 1, book=None, status_of=status_of(1)) as s1,
    ):
        yield book, statuses, [s0.endpoint, s1.endpoint]


def _plan_engine(server: FakeLlmapiTriton, model_dir: Path, endpoints: list[str]) -> TritonEngine:
    return make_engine(server, model_dir, plan_endpoints=tuple(endpoints), plan_security=PLAIN)


def test_plans_are_posted_before_the_request_on_the_tokens_triton_sees(
    hf_model_dir: Path, tokenizer: HfTokenizer, plan_servers: Any
) -> None:
    book, _, endpoints = plan_servers
    prompt = tokenizer.encode(PROMPT_TEXT)  # canonical ids: Triton re-encodes them alike
    prefill = Plan(
        "u-prefill", len(prompt), tokens_digest(prompt), ["tcp://d:7100", "tcp://d:7101"]
    )
    decode = Plan("u-decode", len(prompt), tokens_digest(prompt))
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=False) as triton,
        _plan_engine(triton, hf_model_dir, endpoints) as engine,
    ):
        engine.add_request(prompt, SamplingParams(1), plan=prefill)
        assert book.counts().posted == 1  # acknowledged before add_request returned
        _run(engine)
        words = [tokenizer.encode(w, add_special_tokens=False) for w in (" the", " and", " t")]
        t1 = next(ids[0] for ids in words if len(ids) == 1)  # a whole-word first token
        engine.add_request([*prompt, t1], SamplingParams(4), plan=decode)
        _run(engine)
        assert dict(engine.plans.counts) == {"plans_posted": 2}
    # What the connector's scheduler looks up: prefill all tokens, decode all but t1.
    assert book.take(prompt) == prefill and book.take(prompt) == decode
    assert len(triton.stats.requests) == 2


def test_a_plan_whose_tokens_triton_would_see_differently_is_skipped_and_counted(
    hf_model_dir: Path, tokenizer: HfTokenizer, plan_servers: Any
) -> None:
    book, _, endpoints = plan_servers
    word = tokenizer.encode(" datacenters", add_special_tokens=False)
    assert len(word) > 1
    spelled = [tokenizer.bos_id or 0] + [t for c in " datacenters" for t in _char_ids(tokenizer, c)]
    assert tokenizer.decode(spelled) == " datacenters" and spelled != tokenizer.encode(
        " datacenters"
    )
    plan = Plan("u1", len(spelled), tokens_digest(spelled), ["tcp://d:7100", "tcp://d:7101"])
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=True) as triton,
        _plan_engine(triton, hf_model_dir, endpoints) as engine,
    ):
        rid = engine.add_request(spelled, SamplingParams(2), plan=plan)
        final = _run(engine)[rid][-1]
        assert dict(engine.plans.counts) == {"plans_skipped": 1}
    assert final.error is None  # the request still runs, without its plan
    assert book.counts().posted == 0


def _char_ids(tokenizer: HfTokenizer, char: str) -> list[int]:
    return tokenizer.encode(char, add_special_tokens=False)


def test_a_plan_without_a_plan_endpoint_is_counted_not_silent(
    hf_model_dir: Path, tokenizer: HfTokenizer
) -> None:
    prompt = tokenizer.encode(PROMPT_TEXT)
    plan = Plan("u1", len(prompt) - 1, tokens_digest(prompt[:-1]))
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=True) as triton,
        make_engine(triton, hf_model_dir) as engine,
    ):
        rid = engine.add_request(prompt, SamplingParams(2), plan=plan)
        assert _run(engine)[rid][-1].error is None
        assert dict(engine.plans.counts) == {"plans_unconfigured": 1}
        assert engine.transfer_status("u1", len(prompt) - 1) is None


def test_transfer_status_is_complete_only_on_every_rank(
    hf_model_dir: Path, plan_servers: Any
) -> None:
    _, statuses, endpoints = plan_servers
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=True) as triton,
        _plan_engine(triton, hf_model_dir, endpoints) as engine,
    ):
        assert engine.transfer_status("u", 40) is None  # announced nowhere yet
        statuses[("u", 40)] = ["complete", ""]
        assert engine.transfer_status("u", 40) is InboundStatus.RECEIVING
        statuses[("u", 40)] = ["complete", "receiving"]
        assert engine.transfer_status("u", 40) is InboundStatus.RECEIVING
        statuses[("u", 40)] = ["complete", "complete"]
        assert engine.transfer_status("u", 40) is InboundStatus.COMPLETE
        assert engine.transfer_status("u", 41) is None  # another claim length
        statuses[("u", 40)] = ["complete", "failed"]
        assert engine.transfer_status("u", 40) is InboundStatus.FAILED


def test_a_plan_server_that_does_not_answer_is_counted(
    hf_model_dir: Path, tokenizer: HfTokenizer
) -> None:
    with socket.socket() as sock:  # nothing listens here
        sock.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    prompt = tokenizer.encode(PROMPT_TEXT)
    plan = Plan("u1", len(prompt), tokens_digest(prompt), ["tcp://d:7100"])
    with FakeLlmapiTriton(hf_model_dir, decoupled=False) as triton:
        engine = make_engine(triton, hf_model_dir, plan_endpoints=(endpoint,),
                             plan_security=PLAIN, plan_timeout_s=0.2)  # fmt: skip
        with engine:
            started = time.monotonic()
            rid = engine.add_request(prompt, SamplingParams(1), plan=plan)
            assert time.monotonic() - started < 2.0
            assert _run(engine)[rid][-1].error is None
            assert dict(engine.plans.counts) == {"plans_failed": 1}
            assert engine.transfer_status("u1", len(prompt)) is None
            assert engine.plans.counts["status_failed"] == 1
