"""The router's prompt-plus-first-token handoff, over the real orchestrator and fake workers.

The prefill leg runs the prompt with ``max_tokens=1`` and a transfer; its token t1 is streamed
at once; the decode leg is then the prompt followed by t1, ``max_tokens - 1`` tokens, one
sampling draw skipped, the same transfer. t1 = EOS or ``max_tokens == 1`` end the request at t1
(the latter without any transfer); a failed prefill leaves the decode node to run the whole
request. Stream and unary answers are the same tokens, and equal every other route's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from trtllm_prfaas.engines.tokenizer import EOS_ID
from trtllm_prfaas.router.api import GenerateRequest, TokenChunk
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.worker.fake import FakeWorkerPool, FakeWorkerSpec, fake_tokens

PROMPT = [(i * 37 + 11) % 256 for i in range(300)]  # above the threshold: remote


def _pool(**prefill: Any) -> FakeWorkerPool:
    return FakeWorkerPool(
        [
            FakeWorkerSpec("prfaas", "prefill", "dc-remote", **prefill),
            FakeWorkerSpec("pd-p", "prefill"),
            FakeWorkerSpec("decode", "decode"),
        ]
    )


async def _run(pool: FakeWorkerPool, max_tokens: int, rid: str = "r1") -> list[TokenChunk]:
    specs = tuple(WorkerSpec(n, w.endpoint, n == "prfaas") for n, w in pool.workers.items())
    orch = DisaggregatedOrchestrator(RouterConfig(specs, threshold_tokens=100, control=None))
    await orch.start()
    try:
        request = GenerateRequest(rid, PROMPT, max_tokens, 0.7, 3, True, 10.0)
        chunks = [chunk async for chunk in orch.generate(request)]
        assert orch.counters["relay_recomputed"] == 0
        return chunks
    finally:
        await orch.close()


def _tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


def test_decode_leg_is_prompt_plus_t1_and_output_splices_t1() -> None:
    async def scenario() -> None:
        async with _pool() as pool:
            chunks = await _run(pool, 6)
            prefill, decode = pool["prfaas"].submits, pool["decode"].submits
        assert _tokens(chunks) == fake_tokens(PROMPT, 6)  # what one engine would answer
        assert chunks[0].token_ids == fake_tokens(PROMPT, 1) and not chunks[0].is_final
        assert chunks[-1].is_final and chunks[-1].finish_reason == "length"
        (p_leg,), (d_leg,) = prefill, decode
        t1 = chunks[0].token_ids[0]
        assert (p_leg.prompt_token_ids, p_leg.max_tokens) == (PROMPT, 1)
        assert p_leg.transfer_uuid and p_leg.relay_endpoint
        assert d_leg.prompt_token_ids == [*PROMPT, t1]
        assert (d_leg.max_tokens, d_leg.num_skipped_draws) == (5, 1)
        assert d_leg.transfer_uuid == p_leg.transfer_uuid
        assert (d_leg.temperature, d_leg.seed) == (p_leg.temperature, p_leg.seed) == (0.7, 3)

    asyncio.run(scenario())


def test_one_token_answer_is_t1_alone_and_relays_nothing() -> None:
    async def scenario() -> None:
        async with _pool() as pool:
            chunks = await _run(pool, 1)
            (p_leg,) = pool["prfaas"].submits
            assert pool["decode"].submits == []
        assert _tokens(chunks) == fake_tokens(PROMPT, 1)
        assert len(chunks) == 1 and chunks[0].is_final and chunks[0].finish_reason == "length"
        assert p_leg.transfer_uuid is None and p_leg.relay_endpoint is None

    asyncio.run(scenario())


def test_eos_as_t1_stops_without_a_decode_leg() -> None:
    async def scenario() -> None:
        async with _pool(first_token=EOS_ID) as pool:
            chunks = await _run(pool, 8)
            assert pool["decode"].submits == []
        assert _tokens(chunks) == [EOS_ID]
        assert chunks[-1].is_final and chunks[-1].finish_reason == "stop"

    asyncio.run(scenario())


def test_silent_prefill_worker_is_given_up() -> None:
    """A wedged prefill worker (its connection up, so its libzmq still answers the router's
    heartbeats and it is never *lost*, but it sends nothing, not even load reports): after
    ``worker_silence_s`` the decode node runs the whole request (long before the request's
    deadline or ``prefill_timeout_s``). A dead one is found sooner: test_lost_workers.py."""

    async def scenario() -> None:
        async with _pool(prefill_s_per_token=1.0) as pool:  # t1 would take 300 s
            specs = tuple(WorkerSpec(n, w.endpoint, n == "prfaas") for n, w in pool.workers.items())
            config = RouterConfig(specs, threshold_tokens=100, control=None, worker_silence_s=1.0)
            orch = DisaggregatedOrchestrator(config)
            await orch.start()
            try:
                pool["prfaas"].silent = True  # as a wedged worker: no reports any more
                started = time.monotonic()
                request = GenerateRequest("s1", PROMPT, 4, 0.0, 0, False, 30.0)
                chunks = [chunk async for chunk in orch.generate(request)]
                assert 1.0 <= time.monotonic() - started < 5.0
                assert orch.counters["prefill_fallback"] == 1
                assert not orch.cluster.workers["prfaas"].is_lost  # silent is not dead
            finally:
                await orch.close()
        assert _tokens(chunks) == fake_tokens(PROMPT, 4)

    asyncio.run(scenario())


def test_failed_prefill_leaves_the_whole_request_to_the_decode_node() -> None:
    async def scenario() -> None:
        async with _pool(prefill_error="EngineError") as pool:
            specs = tuple(WorkerSpec(n, w.endpoint, n == "prfaas") for n, w in pool.workers.items())
            orch = DisaggregatedOrchestrator(
                RouterConfig(specs, threshold_tokens=100, control=None)
            )
            await orch.start()
            try:
                request = GenerateRequest("f1", PROMPT, 4, 0.0, 0, False, 10.0)
                chunks = [chunk async for chunk in orch.generate(request)]
                assert orch.counters["prefill_fallback"] == 1
                assert orch.counters["relay_recomputed"] == 1  # offloaded, computed locally
            finally:
                await orch.close()
            (d_leg,) = pool["decode"].submits
        assert _tokens(chunks) == fake_tokens(PROMPT, 4)
        assert d_leg.prompt_token_ids == PROMPT and d_leg.max_tokens == 4
        assert d_leg.transfer_uuid is None and d_leg.num_skipped_draws == 0

    asyncio.run(scenario())
