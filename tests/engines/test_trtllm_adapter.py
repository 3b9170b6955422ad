"""TrtllmEngine on CPU against a fake ``tensorrt_llm`` package injected into ``sys.modules``: the
exact ``LLM(...)`` arguments, PrfaaS plans posted to the connector's plan server before the
request (the only carrier that exists on 1.2: ``opaque_state`` of a context request never reaches
the connector, so the fake has no ``DisaggregatedParams`` and ``generate_async`` records any it is
given as a failure), streaming, abort, failures, and the DependencyMissing message when
TensorRT-LLM is absent."""

from __future__ import annotations

import asyncio
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from tests.deploy.llm_api_fields import LLM_API_FIELDS
from trtllm_prfaas.connector.plans import Plan, PlanBook, PlanServer, tokens_digest
from trtllm_prfaas.engines.base import Engine
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.engines.trtllm import TrtllmEngine, TrtllmEngineConfig
from trtllm_prfaas.errors import (
    ConfigError,
    DeadlineExceeded,
    DependencyMissing,
    EngineError,
    InvalidRequestError,
)
from trtllm_prfaas.transport import InboundStatus
from trtllm_prfaas.transport.config import RelaySecurity

PLAIN = RelaySecurity.insecure_plaintext()


@dataclass
class _Model:  # stands in for TensorRT-LLM's pydantic config models
    kwargs: dict[str, Any]


def _model(name: str) -> type:
    return type(name, (_Model,), {"__init__": lambda self, **kw: _Model.__init__(self, kw)})


@dataclass
class FakeResult:
    """A streaming GenerationResult: cumulative token ids, then finished."""

    prompt: list[int]
    max_tokens: int
    fail_after: int | None = None
    final_reason: str = "length"
    aborted: bool = False
    outputs: list[Any] = field(default_factory=list)
    finished: bool = False

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self) -> FakeResult:
        self.outputs = [types.SimpleNamespace(token_ids=[], finish_reason=None)]
        return self

    async def __anext__(self) -> FakeResult:
        await asyncio.sleep(0.001)
        out = self.outputs[0]
        if self.finished:
            raise StopAsyncIteration
        if self.aborted:
            out.finish_reason, self.finished = "cancelled", True
            return self
        if self.fail_after is not None and len(out.token_ids) == self.fail_after:
            raise RuntimeError("CUDA error: an illegal memory access")
        out.token_ids = [*out.token_ids, (sum(self.prompt) + len(out.token_ids)) % 256]
        if len(out.token_ids) == self.max_tokens:
            out.finish_reason, self.finished = self.final_reason, True
        return self


class FakeLLM:
    instances: ClassVar[list[FakeLLM]] = []

    on_generate: ClassVar[Any] = None  # called with the inputs when a request is submitted

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.calls, self.results, self.is_shut_down = kwargs, [], [], False
        self.fail_after: int | None = None
        self.final_reason = "length"
        FakeLLM.instances.append(self)

    def generate_async(self, inputs: list[int], sampling_params: Any = None,
                       streaming: bool = False, **options: Any) -> FakeResult:  # fmt: skip
        """``LLM.generate_async(inputs, sampling_params, ..., streaming, ...)``; ``options`` are
        the other keyword arguments upstream takes (recorded: the engine must pass none)."""
        asyncio.get_running_loop()  # TensorRT-LLM's async queue needs a running loop
        if any(t >= 256 for t in inputs):
            raise ValueError("token id out of vocabulary")
        if FakeLLM.on_generate is not None:
            FakeLLM.on_generate(inputs)
        self.calls.append(dict(inputs=inputs, sampling_params=sampling_params,
                               streaming=streaming, options=options))  # fmt: skip
        result = FakeResult(inputs, sampling_params.kwargs["max_tokens"], self.fail_after,
                            self.final_reason)  # fmt: skip
        self.results.append(result)
        return result

    def shutdown(self) -> None:
        self.is_shut_down = True


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    root, llmapi = types.ModuleType("tensorrt_llm"), types.ModuleType("tensorrt_llm.llmapi")
    llm_args = types.ModuleType("tensorrt_llm.llmapi.llm_args")
    root.LLM = FakeLLM  # type: ignore[attr-defined]
    llmapi.KvCacheConfig = _model("KvCacheConfig")  # type: ignore[attr-defined]
    llmapi.SamplingParams = _model("SamplingParams")  # type: ignore[attr-defined]
    llm_args.KvCacheConnectorConfig = _model("KvCacheConnectorConfig")  # type: ignore[attr-defined]
    for module in (root, llmapi, llm_args):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    FakeLLM.instances = []
    FakeLLM.on_generate = None
    return FakeLLM


def _run(engine: TrtllmEngine, timeout_s: float = 10.0) -> dict[int, list[RequestOutput]]:
    outputs: dict[int, list[RequestOutput]] = {}
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def test_llm_kwargs_are_exact(fake_trtllm) -> None:
    extra = {"max_input_len": 131072}
    config = TrtllmEngineConfig("/models/hf", tokens_per_block=64, tensor_parallel_size=8,
                                max_seq_len=132096, extra_llm_args=extra)  # fmt: skip
    with TrtllmEngine(config) as engine:
        (llm,) = fake_trtllm.instances
        kwargs = dict(llm.kwargs)
        kv, connector = kwargs.pop("kv_cache_config"), kwargs.pop("kv_connector_config")
        assert kwargs == dict(
            model="/models/hf", backend="pytorch", tensor_parallel_size=8,
            pipeline_parallel_size=1, max_batch_size=20, max_num_tokens=8192, max_beam_width=1,
            enable_chunked_prefill=True, trust_remote_code=False, cuda_graph_config=None,
            max_seq_len=132096, max_input_len=131072,
        )  # fmt: skip
        assert type(kv).__name__ == "KvCacheConfig" and kv.kwargs == dict(
            enable_block_reuse=True, tokens_per_block=64, free_gpu_memory_fraction=0.9
        )
        assert type(connector).__name__ == "KvCacheConnectorConfig" and connector.kwargs == dict(
            connector_module="trtllm_prfaas.connector.prfaas",
            connector_scheduler_class="PrfaasConnectorScheduler",
            connector_worker_class="PrfaasConnectorWorker",
        )
        assert set(llm.kwargs) <= set(LLM_API_FIELDS)  # documented LLM-API fields only
        assert set(kv.kwargs) <= set(LLM_API_FIELDS["kv_cache_config"] or {})
        assert isinstance(engine, Engine) and engine.connector is None
    assert llm.is_shut_down


def test_config_refuses_overriding_what_the_connector_needs() -> None:
    with pytest.raises(ConfigError, match="cuda_graph_config"):
        TrtllmEngineConfig("/m", extra_llm_args={"cuda_graph_config": {}})
    with pytest.raises(ConfigError, match="tokens_per_block"):
        TrtllmEngineConfig("/m", tokens_per_block=0)


def test_streams_tokens_and_sampling_params(fake_trtllm) -> None:
    with TrtllmEngine(TrtllmEngineConfig("/m", num_blocks_hint=100, tokens_per_block=4)) as engine:
        a = engine.add_request([1, 2, 3], SamplingParams(5))
        b = engine.add_request([9, 9], SamplingParams(3, temperature=0.7, seed=11), request_id=42)
        assert b == 42 and engine.blocks.num_available == 100 - 2 - 2
        assert engine.slots.num_free == 18 and sorted(engine.running) == [a, b]
        # ``waiting`` is "no token seen yet": the consumer on the engine's loop thread may have
        # seen a's first token already (it raced on a loaded host: [42] instead of [1, 42]).
        assert set(engine.waiting) <= {a, b}
        outputs = _run(engine)
        (llm,) = fake_trtllm.instances
    assert [t for o in outputs[a] for t in o.new_token_ids] == [6, 7, 8, 9, 10]
    assert outputs[a][-1] == RequestOutput(a, [10], True, "length")
    assert [o.finished for o in outputs[b]] == [False, False, True]
    greedy, sampled = (call["sampling_params"].kwargs for call in llm.calls)
    assert greedy == dict(max_tokens=5, ignore_eos=False)  # no temperature: greedy
    assert sampled == dict(max_tokens=3, ignore_eos=False, temperature=0.7, seed=11)
    assert all(call["streaming"] and call["options"] == {} for call in llm.calls)


def test_plans_are_posted_and_acknowledged_before_the_request(fake_trtllm) -> None:
    book, statuses = PlanBook(), {("u1", 3): "complete"}
    seen_at_submit: list[int] = []
    fake_trtllm.on_generate = lambda inputs: seen_at_submit.append(book.counts().posted)
    prefill = Plan("u1", 3, tokens_digest([5, 6, 7]), ["tcp://10.0.0.2:7100"])
    decode = Plan("u1", 3, tokens_digest([5, 6, 7]))
    status_of = lambda uuid, n: statuses.get((uuid, n), "")  # noqa: E731
    with PlanServer("tcp://127.0.0.1:0", PLAIN, 0, book=book, status_of=status_of) as server:
        config = TrtllmEngineConfig("/m", plan_endpoints=(server.endpoint,), plan_security=PLAIN)
        with TrtllmEngine(config) as engine:
            engine.add_request([5, 6, 7], SamplingParams(1), plan=prefill)
            engine.add_request([5, 6, 7, 9], SamplingParams(2), plan=decode)
            engine.add_request([5, 6], SamplingParams(2), plan=decode)  # not its tokens: skipped
            _run(engine)
            assert engine.transfer_status("u1", 3) is InboundStatus.COMPLETE
            assert engine.transfer_status("u2", 3) is None
            assert dict(engine.plans.counts) == {"plans_posted": 2, "plans_skipped": 1}
    assert seen_at_submit == [1, 2, 2]  # each plan was stored before its request started
    assert book.take([5, 6, 7]) == prefill and book.take([5, 6, 7]) == decode
    assert all(call["options"] == {} for call in fake_trtllm.instances[0].calls)


def test_a_plan_without_a_plan_endpoint_is_counted(fake_trtllm) -> None:
    with TrtllmEngine(TrtllmEngineConfig("/m")) as engine:
        rid = engine.add_request([5, 6, 7], SamplingParams(1), plan=Plan("u", 2, "00"))
        assert _run(engine)[rid][-1].finish_reason == "length"
        assert dict(engine.plans.counts) == {"plans_skipped": 1}
        plan = Plan("u", 2, tokens_digest([5, 6]))
        engine.add_request([5, 6, 7], SamplingParams(1), plan=plan)
        _run(engine)
        assert engine.plans.counts["plans_unconfigured"] == 1
    with pytest.raises(ConfigError, match="plan_security"):
        TrtllmEngineConfig("/m", plan_endpoints=("tcp://127.0.0.1:1",))


def test_timeout_and_unknown_finish_reasons_are_errors(fake_trtllm) -> None:
    with TrtllmEngine(TrtllmEngineConfig("/m")) as engine:
        fake_trtllm.instances[0].final_reason = "timeout"
        rid = engine.add_request([1, 2], SamplingParams(2))
        final = _run(engine)[rid][-1]
        assert final.finish_reason == "error" and isinstance(final.error, DeadlineExceeded)
        fake_trtllm.instances[0].final_reason = "bogus"
        rid = engine.add_request([1, 2], SamplingParams(2))
        final = _run(engine)[rid][-1]
        assert final.finish_reason == "error" and "bogus" in str(final.error)


def test_abort_stops_the_request(fake_trtllm) -> None:
    with TrtllmEngine(TrtllmEngineConfig("/m")) as engine:
        rid = engine.add_request([1], SamplingParams(10_000))
        deadline = time.monotonic() + 5
        while not engine.step():
            assert time.monotonic() < deadline
        assert engine.abort(rid) == RequestOutput(rid, [], True, "aborted")
        assert engine.abort(rid) is None and not engine.has_unfinished()
        time.sleep(0.05)
        assert engine.step() == []
        assert fake_trtllm.instances[0].results[0].aborted


def test_failures_end_the_request_and_bad_input_raises(fake_trtllm) -> None:
    with TrtllmEngine(TrtllmEngineConfig("/m")) as engine:
        with pytest.raises(InvalidRequestError, match="out of vocabulary"):
            engine.add_request([1, 999], SamplingParams(2))
        with pytest.raises(InvalidRequestError, match="empty"):
            engine.add_request([], SamplingParams(2))
        fake_trtllm.instances[0].fail_after = 2
        rid = engine.add_request([1, 2], SamplingParams(8))
        with pytest.raises(InvalidRequestError, match="already in use"):
            engine.add_request([1, 2], SamplingParams(8), request_id=rid)
        final = _run(engine)[rid][-1]
    assert final.finish_reason == "error" and isinstance(final.error, EngineError)
    assert "illegal memory access" in str(final.error)


def test_missing_tensorrt_llm_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import raises ImportError
    with pytest.raises(DependencyMissing) as info:
        TrtllmEngine(TrtllmEngineConfig("/m"))
    assert str(info.value) == (
        "optional dependency 'tensorrt_llm' is not installed; run: pip install "
        "tensorrt-llm  (GPU machines only; see docs/deployment.md)"
    )


def test_importing_the_module_never_imports_tensorrt_llm() -> None:
    import subprocess

    code = ("import sys, trtllm_prfaas.engines.trtllm, trtllm_prfaas.engines.triton; "
            "assert 'tensorrt_llm' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
