"""Cache-aware routing over real reference workers with block reuse on (issue 15 items 2-3):
the router's prefix index follows each worker's KV cache events, a request sharing a long prefix
with an earlier one goes to the prefill node that holds it and gets single-engine tokens, the
index drops evicted blocks and departed workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.harness import WorkerProcess
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.router.prefix_index import PrefixIndexStats
from trtllm_prfaas.testbed.processes import start_workers
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.client import WorkerClient

COMMON = ["--model-preset", "tiny", "--plaintext", "--num-blocks", "512", "--chunk-size", "64"]
REUSE = [*COMMON, "--enable-block-reuse"]
TPB = model_preset("tiny").tokens_per_block  # 16
_NO_STATS = PrefixIndexStats()


@pytest.fixture(scope="module")
def testbed() -> Iterator[dict[str, WorkerProcess]]:
    """Two PrfaaS prefill nodes and one decode node, all with block reuse on."""
    procs: dict[str, WorkerProcess] = {}
    try:
        procs = start_workers(
            {
                "dec": ["--role", "decode", "--cluster", "dc-local", "--worker-id", "dec", *REUSE],
                "p0": ["--role", "prefill", "--cluster", "dc-remote", "--worker-id", "p0", *REUSE],
                "p1": ["--role", "prefill", "--cluster", "dc-remote", "--worker-id", "p1", *REUSE],
            }
        )
        yield procs
    finally:
        codes = {name: proc.stop() for name, proc in procs.items()}
        assert all(code == 0 for code in codes.values()), codes


@contextlib.asynccontextmanager
async def orchestrator(procs: dict[str, WorkerProcess]) -> AsyncIterator[DisaggregatedOrchestrator]:
    specs = tuple(WorkerSpec(name, proc.control, name != "dec") for name, proc in procs.items())
    orch = DisaggregatedOrchestrator(RouterConfig(specs, threshold_tokens=100, control=None))
    await orch.start()
    try:
        yield orch
    finally:
        await orch.close()


def _request(rid: str, prompt: list[int], max_tokens: int = 6) -> GenerateRequest:
    return GenerateRequest(
        rid, prompt, max_tokens, temperature=0.7, seed=9, streaming=True, deadline_s=60.0
    )


async def _tokens(orch: DisaggregatedOrchestrator, request: GenerateRequest) -> list[int]:
    tokens: list[int] = []
    async for chunk in orch.generate(request):
        tokens += chunk.token_ids
    return tokens


def _reference(prompt: list[int], max_tokens: int = 6) -> list[int]:
    """One cold engine, block reuse off: what every route must give bit for bit."""
    engine = ReferenceEngine(EngineConfig(model=model_preset("tiny"), num_blocks=512))
    return engine.generate([prompt], SamplingParams(max_tokens, 0.7, 9, ignore_eos=False))[0]


def _prompt(n: int, salt: int) -> list[int]:
    return [(i * 131 + salt) % 255 + 1 for i in range(n)]


async def _until(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


def test_shared_prefix_goes_to_the_node_holding_it(testbed: dict[str, WorkerProcess]) -> None:
    history = _prompt(600, salt=3)  # a conversation's first turn ...
    first = [*history, *_prompt(40, salt=7)]
    second = [*first, *_prompt(90, salt=11)]  # ... and its next turn, which extends it
    # turn 1's whole blocks (its prompt is block aligned, so all 40: the engine snapshots the
    # hybrid state there, a chunk end), all within turn 2's reusable blocks
    held = len(first) // TPB * TPB

    async def scenario() -> None:
        async with orchestrator(testbed) as orch:
            prefix = orch.cluster.prefix
            orch.cluster.workers["p0"].is_draining = True  # steer turn 1 to p1, the non-default
            got_first = await _tokens(orch, _request("turn1", first))
            orch.cluster.workers["p0"].is_draining = False
            assert orch.decisions[-1].prefill_node_id == "p1"
            hashes = prefix.hashes_for(second)
            await _until(lambda: prefix.prefix_tokens("p1", hashes, time.monotonic()) >= held)
            assert prefix.prefix_tokens("p0", hashes, time.monotonic()) == 0
            # the decode node's events come with its load reports too (every 0.1 s): turn 2's
            # slot pins only what the index already says it holds (a loaded host was slower)
            await _until(lambda: prefix.prefix_tokens("dec", hashes, time.monotonic()) >= held)
            got_second = await _tokens(orch, _request("turn2", second))
            decision = orch.decisions[-1]
            assert decision.prefill_node_id == "p1"  # cache-affine (p0 wins every tie)
            assert decision.prefix_tokens == held
            assert decision.incremental_tokens == len(second) - held
            assert got_first == _reference(first) and got_second == _reference(second)
            assert orch.counters["relay_recomputed"] == 0
            assert orch.counters["prefill_fallback"] == 0
            p1 = orch.cluster.workers["p1"]
            await _until(lambda: p1.report is not None and p1.report.num_prefix_reused_tokens > 0)
            assert p1.report is not None and p1.report.num_prefix_reused_tokens == held
            # the decode node keeps turn 1's relayed blocks and the states relayed with them
            # (issue 15 item 4; hybrid model): the prefill's snapshot at floor((L-1)/B)*B, and
            # the state after L, L being block aligned here. Turn 2's slot pinned that prefix
            # and the prefill relayed only what lies beyond it; the index (state events) now
            # says it holds turn 2 up to its own snapshot
            dec = orch.cluster.workers["dec"]
            pinned = len(first)
            assert orch.counters["relay_pinned"] == 1
            await _until(lambda: dec.report is not None and dec.report.num_prefix_reused_tokens)
            assert dec.report is not None and dec.report.num_prefix_reused_tokens == pinned
            held_dec = (len(second) - 1) // TPB * TPB
            await _until(lambda: prefix.prefix_tokens("dec", hashes, time.monotonic()) == held_dec)
            stats = prefix.stats()
            assert stats is not None and stats.num_resyncs == 0 and stats.num_events > 0
            # a worker that leaves takes its entries with it
            assert await orch.remove_worker("p1")
            assert "p1" not in prefix and "p1" not in (prefix.stats() or stats).blocks_per_node
            third = [*second, *_prompt(20, salt=5)]
            await _tokens(orch, _request("turn3", third))
            assert orch.decisions[-1].prefill_node_id == "p0"
            assert orch.decisions[-1].prefix_tokens == 0

    asyncio.run(scenario())


def _follow(client: WorkerClient, cluster: ClusterState, until_rid: str, quiet_s: float) -> int:
    """Apply every ``KvEvents`` the worker sends until ``until_rid`` finished and then
    ``quiet_s`` passed; returns the number of removed block hashes seen."""
    num_removed, finished_at = 0, None
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        if finished_at is not None and time.monotonic() - finished_at > quiet_s:
            return num_removed
        message = client.recv(0.1)
        if isinstance(message, p.KvEvents):
            assert cluster.on_kv_events("ev", message)
            # the first is the snapshot the ping earned (nothing held yet), then batches
            assert (message.batch is None) == (message.snapshot is not None)
            for event in message.batch.events if message.batch is not None else ():
                num_removed += len(getattr(event.data, "block_hashes", ()))
        elif isinstance(message, p.Tokens) and message.request_id == until_rid:
            assert not message.error_kind, message.error_message
            if message.finished:
                finished_at = time.monotonic()
    raise TimeoutError(f"{until_rid} did not finish")


def test_a_router_started_later_knows_what_the_workers_hold(
    testbed: dict[str, WorkerProcess],
) -> None:
    """Router A serves turn 1 on p1 and stops; router B starts afterwards and has sent nothing
    yet: each worker's snapshot (its answer to B's ping) tells B what p1 holds, so B routes
    turn 2 to p1 for its prefix, with single-engine tokens."""
    first = [*_prompt(600, salt=21), *_prompt(40, salt=23)]
    second = [*first, *_prompt(90, salt=29)]
    held = len(first) // TPB * TPB

    async def scenario() -> None:
        async with orchestrator(testbed) as a:
            a.cluster.workers["p0"].is_draining = True
            got_first = await _tokens(a, _request("late-1", first))
            assert a.decisions[-1].prefill_node_id == "p1"
            hashes = a.cluster.prefix.hashes_for(second)
            await _until(lambda: a.cluster.prefix.prefix_tokens("p1", hashes, time.monotonic())
                         >= held)  # fmt: skip
        async with orchestrator(testbed) as b:
            prefix = b.cluster.prefix
            await _until(lambda: (prefix.stats() or _NO_STATS).num_snapshots >= len(testbed))
            assert prefix.prefix_tokens("p1", hashes, time.monotonic()) >= held
            assert prefix.prefix_tokens("p0", hashes, time.monotonic()) == 0
            await _until(lambda: prefix.prefix_tokens("dec", hashes, time.monotonic()) >= held)
            got_second = await _tokens(b, _request("late-2", second))
            decision = b.decisions[-1]
            assert decision.prefill_node_id == "p1" and decision.prefix_tokens == held
            assert got_first == _reference(first) and got_second == _reference(second)
            stats = prefix.stats()
            assert stats is not None and stats.num_resyncs == 0

    asyncio.run(scenario())


def test_index_follows_stored_and_evicted_blocks() -> None:
    """One worker whose cache keeps at most 8 unreferenced blocks: its events add each prompt's
    6 blocks to the index, and LRU eviction takes the oldest prompt's out again (tail first)."""
    args = ["--role", "prefill", "--cluster", "dc", "--worker-id", "ev", *REUSE]
    procs = start_workers({"ev": [*args, "--max-cached-blocks", "8"]})
    try:
        with WorkerClient(procs["ev"].control) as client:
            info = client.ping(10)
            assert info.prefix_cache == "events" and info.kv_layout == "HND"
            cluster = ClusterState()
            cluster.add(WorkerState("ev", procs["ev"].control, info, True))
            prompts = {name: _prompt(100, salt) for name, salt in (("x", 1), ("y", 2), ("z", 4))}
            hashes = {name: cluster.prefix.hashes_for(prompt) for name, prompt in prompts.items()}
            removed = []
            for name, prompt in prompts.items():
                client.send(p.Submit(name, prompt, max_tokens=2))
                removed.append(_follow(client, cluster, name, quiet_s=0.4))
                if name == "x":
                    now = time.monotonic()
                    assert cluster.prefix.prefix_tokens("ev", hashes["x"], now) == 6 * TPB
            now = time.monotonic()
            held = {name: cluster.prefix.prefix_tokens("ev", h, now) for name, h in hashes.items()}
            # 8 blocks left: z's 6 and y's head, but y's state snapshot (at its last block) is
            # gone with its tail, so the hybrid engine could not resume y: the index says 0
            assert held == {"x": 0, "y": 0, "z": 6 * TPB}
            stats = cluster.prefix.stats()
            assert stats is not None and stats.blocks_per_node == {"ev": 8}
            assert removed == [0, 4, 6]
            report = None
            while report is None:  # the worker's own counters agree
                message = client.recv(2.0)
                report = message if isinstance(message, p.LoadReport) else None
            assert report.num_block_evictions == 10 and report.num_cached_blocks == 8
    finally:
        assert procs["ev"].stop() == 0
