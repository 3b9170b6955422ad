"""The router's live prefix index (``router/prefix_tracker.py`` inside ``ClusterState``): who is
followed and how, membership with the cluster, real prefix lengths in ``ClusterState.view``,
approximate nodes fed by routing history, and the router's hashes equal to a worker engine's."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.kv.events import (
    KvCacheEvent,
    KvCacheStored,
    KvEventBatch,
    KvSnapshot,
    StoredBlock,
)
from trtllm_prfaas.policy.placement import NodeView, choose_decode_node
from trtllm_prfaas.policy.route import PolicyState, RequestView, route
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.prefix_tracker import PrefixTracker
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.worker import protocol as p

TINY = model_preset("tiny")
TPB = TINY.tokens_per_block  # 16


def _info(name: str, role: str, mode: str = "events", **kw: object) -> p.WorkerInfo:
    fields: dict[str, object] = dict(prefix_cache=mode, kv_layout="HND", kv_dtype=TINY.dtype)
    fields.update(kw)
    return p.WorkerInfo(name, role, "dc", TINY.model_id, 8192, TPB, 512, 4, **fields)  # type: ignore[arg-type]


def _cluster(*workers: tuple[str, str, str, bool]) -> ClusterState:
    cluster = ClusterState()
    for name, role, mode, is_prfaas in workers:
        cluster.add(WorkerState(name, "tcp://x", _info(name, role, mode), is_prfaas))
    return cluster


def _stored(event_id: int, parent: int | None, hashes: list[int]) -> KvCacheEvent:
    return KvCacheEvent(event_id, KvCacheStored(parent, [StoredBlock(h, TPB) for h in hashes]))


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 37 + salt) % 250 + 1 for i in range(n)]


def test_router_hashes_equal_the_worker_engines_events() -> None:
    """A real engine with block reuse: the hashes its events name are the ones the router
    computes for the same prompt under the WorkerInfo's key (so the index matches it)."""
    engine = ReferenceEngine(EngineConfig(model=TINY, num_blocks=64, enable_block_reuse=True))
    prompt = _prompt(100)
    engine.generate([prompt], SamplingParams(2, 0.0, 0, ignore_eos=True))
    batch = engine.drain_kv_events()
    stored = [b.block_hash for e in batch.events if isinstance(e.data, KvCacheStored)
              for b in e.data.blocks]  # fmt: skip
    cluster = ClusterState()  # a hybrid model: the index also wants the engine's snapshots
    info = _info("w", "prefill", kv_state_bytes=TINY.kv_spec.state_bytes)
    cluster.add(WorkerState("w", "tcp://x", info, True))
    assert cluster.prefix.index is not None and cluster.prefix.index.requires_states
    hashes = cluster.prefix.hashes_for(prompt)
    assert len(hashes) == (len(prompt) - 1) // TPB == 6
    assert stored[: len(hashes)] == hashes
    assert cluster.on_kv_events("w", p.KvEvents("w", batch=batch))
    assert cluster.prefix.prefix_tokens("w", hashes, time.monotonic()) == 6 * TPB


def test_view_gives_each_node_its_prefix_and_route_goes_cache_affine() -> None:
    cluster = _cluster(
        ("r0", "prefill", "events", True),
        ("r1", "prefill", "events", True),
        ("d0", "decode", "events", False),
        ("d1", "decode", "", False),  # block reuse off: never followed
    )
    prompt = _prompt(20 * TPB + 5)
    hashes = cluster.prefix.hashes_for(prompt)
    batch = KvEventBatch([_stored(0, None, hashes[:12])])
    assert cluster.on_kv_events("r1", p.KvEvents("r1", batch=batch))
    cluster.on_kv_events("d0", p.KvEvents("d0", batch=KvEventBatch([_stored(0, None, hashes[:4])])))
    assert not cluster.on_kv_events("d1", p.KvEvents("d1", batch=batch))  # not followed
    now = time.monotonic()
    view = cluster.view(now, hashes)
    assert [n.prefix_tokens for n in view.prfaas] == [0, 12 * TPB]
    assert [(n.node_id, n.prefix_tokens) for n in view.pd_decode] == [("d0", 4 * TPB), ("d1", 0)]
    decision = route(RequestView("q", len(prompt)), view, PolicyState(100.0), now)
    assert decision.prefill_node_id == "r1" and decision.prefix_tokens == 12 * TPB
    assert decision.incremental_tokens == len(prompt) - 12 * TPB
    assert decision.decode_node_id == "d0"  # its own cached prefix, both have free slots
    assert cluster.view(now).prfaas[1].prefix_tokens == 0  # no hashes: no prefix


def test_a_cache_blind_cluster_follows_events_but_routes_as_if_nothing_were_cached() -> None:
    """``prefix_routing: false``: the index still follows r1's events (its metrics count), but
    every node's prefix is 0, so route takes the least-loaded tie-break (r0), not r1's cache."""
    cluster = ClusterState(prefix=PrefixTracker(is_blind=True))
    for name, role in (("r0", "prefill"), ("r1", "prefill"), ("d0", "decode")):
        cluster.add(WorkerState(name, "tcp://x", _info(name, role), role == "prefill"))
    prompt = _prompt(20 * TPB + 5)
    hashes = cluster.prefix.hashes_for(prompt)
    assert len(hashes) == 20
    for name in ("r1", "d0"):
        batch = KvEventBatch([_stored(0, None, hashes[:12])])
        assert cluster.on_kv_events(name, p.KvEvents(name, batch=batch))
    stats = cluster.prefix.stats()
    assert stats is not None and stats.blocks_per_node["r1"] == 12
    now = time.monotonic()
    view = cluster.view(now, hashes)
    assert [n.prefix_tokens for n in (*view.prfaas, *view.pd_decode)] == [0, 0, 0]
    decision = route(RequestView("q", len(prompt)), view, PolicyState(100.0), now)
    assert decision.prefill_node_id == "r0" and decision.prefix_tokens == 0
    assert decision.incremental_tokens == len(prompt)


def test_decode_choice_prefers_a_free_slot_over_a_cached_prefix() -> None:
    full = NodeView("a", prefix_tokens=900, free_decode_slots=0)
    free = NodeView("b", prefix_tokens=0, free_decode_slots=1)
    assert choose_decode_node([full, free]) is free
    plain = [NodeView("c", free_decode_slots=2), NodeView("d", free_decode_slots=5)]
    assert choose_decode_node(plain) is plain[1]  # no prefix anywhere: most free slots


def test_membership_follows_the_cluster() -> None:
    cluster = _cluster(("r0", "prefill", "events", True), ("r1", "prefill", "events", True))
    hashes = cluster.prefix.hashes_for(_prompt(5 * TPB))
    for name in ("r0", "r1"):
        cluster.on_kv_events(name, p.KvEvents(name, batch=KvEventBatch([_stored(0, None, hashes)])))
    now = time.monotonic()
    assert cluster.mark_lost("r0")  # lost: out of the index at once
    assert "r0" not in cluster.prefix and cluster.prefix.prefix_tokens("r0", hashes, now) == 0
    stats = cluster.prefix.stats()
    assert stats is not None and set(stats.blocks_per_node) == {"r1"}
    assert cluster.rejoin("r0", _info("r0", "prefill"))  # back, its view empty until events
    assert "r0" in cluster.prefix and cluster.prefix.prefix_tokens("r0", hashes, now) == 0
    cluster.remove("r1")
    stats = cluster.prefix.stats()
    assert stats is not None and set(stats.blocks_per_node) == {"r0"}
    cluster.on_info("r0", _info("r0", "decode"))  # a role change: a new engine, an empty view
    assert "r0" in cluster.prefix


def test_a_snapshot_that_comes_before_the_join_is_kept_for_it() -> None:
    """The worker's snapshot can be read in the same pass as its WorkerInfo, before the
    router's add_worker resumes: it and the batches after it are kept and applied at the join;
    messages from a worker that sent no snapshot first are not kept."""
    cluster = _cluster(("r1", "prefill", "events", True))
    hashes = cluster.prefix.hashes_for(_prompt(5 * TPB))
    assert len(hashes) == 4  # whole blocks of all but the last token
    snapshot = KvSnapshot([KvCacheStored(None, [StoredBlock(h, TPB) for h in hashes[:3]])], [], 7)
    after = KvEventBatch([_stored(7, hashes[2], hashes[3:])])
    assert not cluster.on_kv_events("r0", p.KvEvents("r0", batch=after))  # no snapshot: dropped
    assert not cluster.on_kv_events("r0", p.KvEvents("r0", snapshot=snapshot))
    assert not cluster.on_kv_events("r0", p.KvEvents("r0", batch=after))
    cluster.add(WorkerState("r0", "tcp://x", _info("r0", "prefill"), True))
    assert cluster.prefix.prefix_tokens("r0", hashes, time.monotonic()) == 4 * TPB  # all of it
    stats = cluster.prefix.stats()
    assert stats is not None and stats.num_snapshots == 1 and stats.num_resyncs == 0
    assert cluster.early_kv_events == {}


def test_a_worker_with_another_key_is_not_followed() -> None:
    cluster = _cluster(("r0", "prefill", "events", True))
    other = _info("r9", "prefill", kv_dtype="bfloat16" if TINY.dtype != "bfloat16" else "float32")
    cluster.add(WorkerState("r9", "tcp://x", other, True))
    assert "r9" not in cluster.prefix and "r0" in cluster.prefix
    assert not cluster.on_kv_events("r9", p.KvEvents("r9", batch=KvEventBatch([])))


def test_approximate_nodes_learn_from_routing_and_say_so() -> None:
    approx = "approximate"
    cluster = _cluster(("t0", "prefill", approx, True), ("t1", "prefill", approx, True))
    prompt = _prompt(10 * TPB + 3)
    hashes = cluster.prefix.hashes_for(prompt)
    now = time.monotonic()
    assert cluster.prefix.is_approximate("t1")
    assert [n.prefix_tokens for n in cluster.view(now, hashes).prfaas] == [0, 0]
    cluster.prefix.record_routed(["t1", "nobody"], hashes, now)
    assert [n.prefix_tokens for n in cluster.view(now, hashes).prfaas] == [0, 10 * TPB]
    later = now + cluster.prefix.ttl_s + 1  # entries expire
    assert cluster.prefix.prefix_tokens("t1", hashes, later) == 0
    stats = cluster.prefix.stats()
    assert stats is not None
    assert stats.num_approximate_lookups == 5 and stats.num_expired_blocks == 10
    # an exact worker joining afterwards fixes the key; approximate members stay, emptied
    cluster.add(WorkerState("r0", "tcp://x", _info("r0", "prefill"), True))
    assert cluster.prefix.is_approximate("t0") and not cluster.prefix.is_approximate("r0")


def test_metrics_say_approximate_and_count_prefixes() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    metrics.set_prefix_index({"r0": 7, "t0": 3}, {"t0"}, {"events": 5, "resyncs": 1})
    metrics.record_routed_prefix("remote", 400, 320, is_approximate=False)
    metrics.set_worker_prefix_cache("r0", 1000, 250, 30, 2)
    value = registry.get_sample_value
    assert value("prfaas_prefix_index_blocks", {"worker": "t0", "mode": "approximate"}) == 3
    assert value("prfaas_prefix_index_blocks", {"worker": "r0", "mode": "exact"}) == 7
    assert value("prfaas_prefix_index_count", {"what": "resyncs"}) == 1
    labels = {"route": "remote", "kind": "prefix", "mode": "exact"}
    assert value("prfaas_routed_prompt_tokens_total", labels) == 320
    assert value("prfaas_worker_prefix_hit_rate", {"worker": "r0"}) == 0.25
    metrics.forget_worker("r0")
    assert value("prfaas_worker_prefix_hit_rate", {"worker": "r0"}) is None
