"""The disaggregated orchestrator over three real worker processes (PrfaaS prefill, PD-P, PD-D):
long prompts go remote and short ones local by the threshold, tokens equal a single-engine run
either way, cancellation and deadlines free every worker's blocks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.harness import WorkerProcess, spawn_worker
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import InvalidRequestError, TransferTimeout
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.worker.client import WorkerClient

COMMON = ["--model-preset", "tiny", "--plaintext", "--num-blocks", "512", "--chunk-size", "64"]
THRESHOLD = 100


@pytest.fixture(scope="module")
def testbed() -> Iterator[dict[str, WorkerProcess]]:
    procs: dict[str, WorkerProcess] = {}
    try:
        procs["decode"] = spawn_worker("decode", "dc-local", *COMMON)
        procs["pd-prefill"] = spawn_worker("prefill", "dc-local", *COMMON)
        procs["prfaas"] = spawn_worker("prefill", "dc-remote", *COMMON)
        yield procs
    finally:
        codes = {name: proc.stop() for name, proc in procs.items()}
        assert all(code == 0 for code in codes.values()), codes


@contextlib.asynccontextmanager
async def orchestrator(procs: dict[str, WorkerProcess]) -> AsyncIterator[DisaggregatedOrchestrator]:
    specs = tuple(WorkerSpec(name, proc.control, name == "prfaas") for name, proc in procs.items())
    orch = DisaggregatedOrchestrator(RouterConfig(specs, threshold_tokens=THRESHOLD))
    await orch.start()
    try:
        yield orch
    finally:
        await orch.close()


def _request(rid: str, prompt: list[int], max_tokens: int = 6, **kw: Any) -> GenerateRequest:
    fields: dict[str, Any] = dict(temperature=0.7, seed=9, streaming=True, deadline_s=60.0)
    fields.update(kw)
    return GenerateRequest(rid, prompt, max_tokens, **fields)


async def _tokens(orch: DisaggregatedOrchestrator, request: GenerateRequest) -> list[int]:
    tokens: list[int] = []
    async for chunk in orch.generate(request):
        tokens += chunk.token_ids
    return tokens


def _reference(prompt: list[int], max_tokens: int = 6) -> list[int]:
    engine = ReferenceEngine(EngineConfig(model=model_preset("tiny"), num_blocks=512))
    sampling = SamplingParams(max_tokens, 0.7, 9, ignore_eos=False)
    return engine.generate([prompt], sampling)[0]


def _prompt(n: int) -> list[int]:
    return [256] + [(i * 131 + n) % 256 for i in range(n - 1)]


def test_routes_by_threshold_and_tokens_match_single_engine(testbed: Any) -> None:
    async def scenario() -> None:
        async with orchestrator(testbed) as orch:
            for length in (5, 60, 101, 400, 1500):
                got = await _tokens(orch, _request(f"r{length}", _prompt(length)))
                assert got == _reference(_prompt(length)), length
            remote = [d.is_remote for d in orch.decisions]
            assert remote == [False, False, True, True, True]
            assert orch.counters["prefill_fallback"] == 0  # every request got t1 from its prefill
            assert orch.counters["relay_recomputed"] == 0  # every remote decode used the relay

    asyncio.run(scenario())


def test_concurrent_requests(testbed: Any) -> None:
    async def scenario() -> None:
        async with orchestrator(testbed) as orch:
            lengths = [30, 700, 120, 9, 2000, 64]
            results = await asyncio.gather(
                *(_tokens(orch, _request(f"c{i}", _prompt(n))) for i, n in enumerate(lengths))
            )
            assert results == [_reference(_prompt(n)) for n in lengths]

    asyncio.run(scenario())


def _assert_idle(procs: dict[str, WorkerProcess]) -> None:
    for proc in procs.values():
        with WorkerClient(proc.control) as client:
            info = client.ping(10)
            from tests.harness import wait_for
            from trtllm_prfaas.worker import protocol as p

            report = wait_for(client, p.LoadReport, lambda m: m.num_running == 0, timeout_s=10)
            assert report.num_free_blocks == info.num_blocks


def test_cancellation_and_deadline_free_every_worker(testbed: Any) -> None:
    async def scenario() -> None:
        async with orchestrator(testbed) as orch:
            stream = orch.generate(_request("cancel-me", _prompt(800), max_tokens=500))
            async for _chunk in stream:
                break
            await stream.aclose()
            with pytest.raises(TransferTimeout, match="deadline"):
                await _tokens(orch, _request("late", _prompt(900), 500, deadline_s=0.3))
            with pytest.raises(InvalidRequestError, match="max sequence length"):
                await _tokens(orch, _request("huge", _prompt(9000)))
            await asyncio.sleep(0.5)

    asyncio.run(scenario())
    _assert_idle(testbed)
