"""LocalEngineOrchestrator on its own: tokens equal the engine's, errors and deadlines surface,
cancellation and close() leave the engine with nothing held."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.router.conftest import make_engine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import (
    AdmissionRejected,
    EngineError,
    InvalidRequestError,
    TransferTimeout,
)
from trtllm_prfaas.router.api import GenerateRequest, TokenChunk
from trtllm_prfaas.router.local import LocalEngineOrchestrator

PROMPT = [256, *b"The seam between the front door and the engines."]


def request(**overrides) -> GenerateRequest:
    fields = dict(request_id="r1", prompt_token_ids=PROMPT, max_tokens=12, temperature=0.0,
                  seed=0, streaming=True, deadline_s=20.0)  # fmt: skip
    fields.update(overrides)
    return GenerateRequest(**fields)


def token_ids(chunks: list[TokenChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


async def collect(orch: LocalEngineOrchestrator, req: GenerateRequest) -> list[TokenChunk]:
    return [chunk async for chunk in orch.generate(req)]


@pytest.mark.parametrize("streaming", [True, False])
def test_tokens_equal_engine(orchestrator, streaming) -> None:
    chunks = asyncio.run(collect(orchestrator, request(streaming=streaming, temperature=0.7)))
    (expected,) = make_engine().generate([PROMPT], SamplingParams(12, 0.7, 0))
    assert token_ids(chunks) == expected
    assert len(chunks) == (12 if streaming else 1)
    assert [c.is_final for c in chunks][-1] and not any(c.is_final for c in chunks[:-1])
    assert chunks[-1].finish_reason in ("length", "stop")
    assert "".join(c.text for c in chunks) == make_engine().tokenizer.decode(expected)


def test_concurrent_requests_each_equal_engine(orchestrator) -> None:
    prompts = [PROMPT, PROMPT[:20], [*PROMPT, 66, 67]]

    async def run_all() -> list[list[TokenChunk]]:
        reqs = [request(request_id=f"r{i}", prompt_token_ids=p) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(collect(orchestrator, r) for r in reqs))

    results = asyncio.run(run_all())
    expected = make_engine().generate(prompts, SamplingParams(12))
    assert [token_ids(chunks) for chunks in results] == expected


def test_errors_surface(orchestrator) -> None:
    with pytest.raises(InvalidRequestError, match="max sequence length"):
        asyncio.run(collect(orchestrator, request(max_tokens=5000)))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        asyncio.run(collect(orchestrator, request(prompt_token_ids=[256, 4000])))
    with pytest.raises(InvalidRequestError, match="temperature"):
        asyncio.run(collect(orchestrator, request(temperature=-1.0)))
    with pytest.raises(AdmissionRejected, match="KV blocks"):
        asyncio.run(collect(orchestrator, request(max_tokens=2100)))
    assert len(asyncio.run(collect(orchestrator, request(max_tokens=2)))) == 2


def test_deadline_fails_clearly_and_frees_blocks(orchestrator) -> None:
    with pytest.raises(TransferTimeout, match=r"deadline of 0\.2s"):
        asyncio.run(collect(orchestrator, request(max_tokens=1500, deadline_s=0.2)))
    # the fixture's teardown checks the engine holds nothing


def test_consumer_leaving_aborts_request(orchestrator) -> None:
    async def take_two() -> list[TokenChunk]:
        got = []
        async with contextlib.aclosing(orchestrator.generate(request(max_tokens=1500))) as gen:
            async for chunk in gen:
                got.append(chunk)
                if len(got) == 2:
                    break
        return got

    assert len(asyncio.run(take_two())) == 2
    assert orchestrator.leak_report() == []  # the abort was queued before the report
    assert orchestrator.call(lambda engine: engine.stats.num_generated_tokens) < 1500


def test_task_cancellation_aborts_request(orchestrator) -> None:
    async def cancel_midway() -> None:
        task = asyncio.create_task(collect(orchestrator, request(max_tokens=1500)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    assert orchestrator.leak_report() == []


def test_close_fails_in_flight_requests_and_joins() -> None:
    engine = make_engine()
    orch = LocalEngineOrchestrator(engine)

    async def close_midway() -> None:
        gen = orch.generate(request(max_tokens=1500))
        await gen.__anext__()
        await asyncio.to_thread(orch.close)
        with pytest.raises(EngineError, match="closed"):  # after the tokens already handed over
            async for _ in gen:
                pass

    try:
        asyncio.run(close_midway())
    finally:
        orch.close()
    assert not orch.is_ready() and engine.leak_report() == []
    with pytest.raises(EngineError, match="closed"):
        asyncio.run(collect(orch, request()))
