"""A worker with block reuse publishes its engine's KV cache events to the routers it knows:
bounded messages with consecutive event ids, which a router's prefix index applies to find the
prompt it served; a lost message is a gap the index resyncs on (never an over-report)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import structlog

from tests.harness import serving_on_thread
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig
from trtllm_prfaas.kv.events import KvCacheStored
from trtllm_prfaas.router import links as links_module
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.links import WorkerLinks
from trtllm_prfaas.transport import RelayConfig, RelaySecurity
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.client import WorkerClient
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer

TINY = model_preset("tiny")
ENGINE = EngineConfig(model=TINY, num_blocks=128, chunk_size=64, enable_block_reuse=True)


@contextmanager
def serving(engine: EngineConfig) -> Iterator[WorkerServer]:
    """An in-process prefill worker serving on a thread; stopped and joined even on failure."""
    relay = RelayConfig(RelaySecurity.insecure_plaintext())
    config = WorkerConfig("w0", WorkerRole.PREFILL, "dc", relay, engine)
    with WorkerServer(config) as server, serving_on_thread(server):
        yield server


def _events_until_done(client: WorkerClient, rid: str, quiet_s: float = 0.5) -> list[p.KvEvents]:
    got: list[p.KvEvents] = []
    finished_at, deadline = None, time.monotonic() + 60.0
    while time.monotonic() < deadline:
        if finished_at is not None and time.monotonic() - finished_at > quiet_s:
            return got
        message = client.recv(0.1)
        if isinstance(message, p.KvEvents):
            got.append(message)
        elif isinstance(message, p.Tokens) and message.request_id == rid and message.finished:
            assert not message.error_kind, message.error_message
            finished_at = time.monotonic()
    raise TimeoutError(f"{rid} did not finish")


def test_events_are_bounded_consecutive_and_index_the_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(p, "MAX_KV_EVENTS_PER_MESSAGE", 1)  # a drain has 2+
    prompt = [(i * 5) % 200 + 1 for i in range(200)]  # 12 reusable blocks, chunks of 64
    with serving(ENGINE) as server, WorkerClient(server.endpoint) as client:
        info = client.ping(10)
        assert (info.prefix_cache, info.kv_layout, info.kv_dtype) == ("events", "HND", TINY.dtype)
        client.send(p.Submit("r", prompt, max_tokens=2))
        messages = _events_until_done(client, "r")
    cluster = ClusterState()
    cluster.add(WorkerState("w0", server.endpoint, info, True))
    # the ping made this client a router new to the worker: its first message is the engine's
    # snapshot (taken after a drain: at most the first chunk is in it), then the batches, their
    # ids consecutive from the snapshot's next_event_id
    snapshot, batches = messages[0].snapshot, [m.batch for m in messages[1:]]
    assert snapshot is not None and messages[0].batch is None
    assert all(b is not None and len(b.events) == 1 for b in batches) and len(batches) >= 4
    ids = [e.event_id for b in batches for e in b.events]  # type: ignore[union-attr]
    assert ids == list(range(snapshot.next_event_id, snapshot.next_event_id + len(ids)))
    hashes = cluster.prefix.hashes_for(prompt)
    for message in messages:
        assert cluster.on_kv_events("w0", message)
    assert cluster.prefix.prefix_tokens("w0", hashes, time.monotonic()) == 12 * 16
    # a router that lost one message (the first stored chain after the snapshot) sees the gap
    # in the ids, clears the node's view, and cannot reach the chains stored below the lost
    # one: it reports nothing held rather than a prefix with a hole
    lossy = ClusterState()
    lossy.add(WorkerState("w0", server.endpoint, info, True))
    lost = 1 + next(i for i, b in enumerate(batches)
                    if isinstance(b.events[0].data, KvCacheStored))  # type: ignore[union-attr]  # fmt: skip
    for message in [*messages[:lost], *messages[lost + 1 :]]:
        lossy.on_kv_events("w0", message)
    stats = lossy.prefix.stats()
    assert stats is not None and stats.num_resyncs == 1 and stats.num_unreachable_blocks > 0
    assert lossy.prefix.prefix_tokens("w0", hashes, time.monotonic()) == 0


def _kv_events(client: WorkerClient, wait_s: float) -> list[p.KvEvents]:
    got, deadline = [], time.monotonic() + wait_s
    while time.monotonic() < deadline:
        message = client.recv(0.05)
        if isinstance(message, p.KvEvents):
            got.append(message)
    return got


def test_a_router_that_joins_late_gets_the_snapshot_then_the_events() -> None:
    """Router A serves two prompts; router B pings the worker only after the first: B's
    first KvEvents is the engine's snapshot, and from then on B's index agrees with A's
    (which followed every event) with no resync; a second ping of A resyncs A the same way."""
    first = [(i * 5) % 200 + 1 for i in range(200)]
    second = [*first[:120], *[(i * 7) % 190 + 3 for i in range(100)]]  # shares 7 blocks
    with serving(ENGINE) as server, WorkerClient(server.endpoint) as a:
        info = a.ping(10)
        a.send(p.Submit("r1", first, max_tokens=2))
        early = _events_until_done(a, "r1")
        with WorkerClient(server.endpoint) as b:
            assert b.ping(10) == info
            late = _kv_events(b, 0.5)
            a.send(p.Submit("r2", second, max_tokens=2))
            early += _events_until_done(a, "r2")
            late += _kv_events(b, 0.5)
            a.ping(10)  # A asks again (as after a reconnect): a snapshot, not a batch
            again = _kv_events(a, 0.5)
    assert early[0].snapshot is not None  # A's first ping
    assert late[0].snapshot is not None and late[0].snapshot.stored
    assert all(m.snapshot is None for m in [*early[1:], *late[1:]])
    assert again and again[0].snapshot is not None
    views = {}
    for name, messages in (("a", early), ("b", late), ("again", again)):
        cluster = ClusterState()
        cluster.add(WorkerState("w0", server.endpoint, info, True))
        for message in messages:
            assert cluster.on_kv_events("w0", message)
        stats = cluster.prefix.stats()
        assert stats is not None and stats.num_resyncs == 0, name
        now = time.monotonic()
        views[name] = [cluster.prefix.prefix_tokens("w0", cluster.prefix.hashes_for(prompt), now)
                       for prompt in (first, second)]  # fmt: skip
        views[name + " blocks"] = stats.blocks_per_node
    assert views["a"] == views["b"] == views["again"] == [12 * 16, 13 * 16], str(views)
    assert views["a blocks"] == views["b blocks"] == views["again blocks"]


def test_a_router_that_lost_events_asks_for_the_snapshot_and_is_exact_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine whose event buffer holds 1 event drops some at every report of a prefill (each
    chunk records a stored chain and a state): the router's view resyncs (cleared), its links
    ping the worker for a snapshot (at most one ask per limit, logged), and once the request is
    done the view is exact again: the whole prompt, as a router that lost nothing would say."""
    monkeypatch.setattr(links_module, "_SNAPSHOT_ASK_S", 0.3)
    prompt = [(i * 5) % 200 + 1 for i in range(200)]  # 12 reusable blocks, chunks of 64

    async def scenario() -> tuple[ClusterState, list[dict[str, object]]]:
        cluster = ClusterState()
        links = WorkerLinks(cluster)
        with serving(replace(ENGINE, max_kv_events=1)) as server:
            try:
                links.connect("w0", server.endpoint)
                answer = asyncio.get_running_loop().create_future()
                links.info_waiters["w0"] = answer
                await links.send("w0", p.Ping())
                info = await asyncio.wait_for(answer, 10)
                cluster.add(WorkerState("w0", server.endpoint, info, True))
                hashes = cluster.prefix.hashes_for(prompt)
                with structlog.testing.capture_logs() as logs:
                    await links.send("w0", p.Submit("r", prompt, max_tokens=2))
                    deadline = time.monotonic() + 30
                    while cluster.prefix.prefix_tokens("w0", hashes, time.monotonic()) < 12 * 16:
                        assert time.monotonic() < deadline, cluster.prefix.stats()
                        await asyncio.sleep(0.05)
            finally:
                links.close()
        return cluster, logs

    cluster, logs = asyncio.run(scenario())
    stats = cluster.prefix.stats()
    assert stats is not None and stats.num_resyncs >= 1 and stats.num_snapshots >= 2, stats
    assert stats.blocks_per_node == {"w0": 12}
    # a warning (``prfaas`` logs at WARNING by default, and an in-process cli.main call earlier
    # in the test run sets that level, which capture_logs does not lower)
    asked = [e for e in logs if e["event"] == "prefix_snapshot_asked"]
    assert asked and all(e["worker"] == "w0" for e in asked)
