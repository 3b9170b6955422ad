"""A worker with block reuse publishes its engine's KV cache events to the routers it knows:
bounded messages with consecutive event ids, which a router's prefix index applies to find the
prompt it served; a lost message is a gap the index resyncs on (never an over-report)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.harness import serving_on_thread
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig
from trtllm_prfaas.kv.events import KvCacheCreated
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
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
    batches = [m.batch for m in messages if m.batch is not None]
    assert len(batches) == len(messages) >= 7 and all(len(b.events) == 1 for b in batches)
    ids = [e.event_id for b in batches for e in b.events]
    assert ids == list(range(len(ids)))  # the created event first, none lost
    hashes = cluster.prefix.hashes_for(prompt)
    for message in messages:
        assert cluster.on_kv_events("w0", message)
    assert cluster.prefix.prefix_tokens("w0", hashes, time.monotonic()) == 12 * 16
    # a router that lost one message (the first stored chain) sees the gap in the ids, clears
    # the node's view, and cannot reach the chains stored below the lost one: it reports
    # nothing held rather than a prefix with a hole
    lossy = ClusterState()
    lossy.add(WorkerState("w0", server.endpoint, info, True))
    assert isinstance(messages[0].batch.events[0].data, KvCacheCreated)  # type: ignore[union-attr]
    for message in [messages[0], *messages[2:]]:
        lossy.on_kv_events("w0", message)
    stats = lossy.prefix.stats()
    assert stats is not None and stats.num_resyncs == 1 and stats.num_unreachable_blocks > 0
    assert lossy.prefix.prefix_tokens("w0", hashes, time.monotonic()) == 0
