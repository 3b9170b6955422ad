"""Placement rules (PAPER.md, Routing) and route() decisions."""

from __future__ import annotations

import pytest

from trtllm_prfaas.errors import AdmissionRejected
from trtllm_prfaas.policy.controller import CachePolicy
from trtllm_prfaas.policy.placement import (
    CacheMove,
    Cluster,
    NodeView,
    choose_decode_node,
    choose_prefill_node,
    place,
)
from trtllm_prfaas.policy.route import ClusterView, PolicyState, RequestView, route

T = 20_000.0


def node(node_id: str, *, prefix: int = 0, backlog: float = 0.0, **kw: object) -> NodeView:
    return NodeView(node_id, prefix_tokens=prefix, backlog_s=backlog, **kw)  # type: ignore[arg-type]


def test_scarce_judges_each_cluster_on_its_own() -> None:
    # 30K prompt, 15K cached locally: 15K incremental <= t -> local, reusing the local prefix.
    p = place(30_000, 0, 15_000, T, CachePolicy.SCARCE)
    assert (p.cluster, p.incremental_tokens, p.cache_move) == (Cluster.PD, 15_000, None)
    # Cached remotely only: local would compute 30K > t, so PrfaaS, with its own prefix.
    p = place(30_000, 25_000, 0, T, CachePolicy.SCARCE)
    assert (p.cluster, p.incremental_tokens, p.cache_move) == (Cluster.PRFAAS, 5_000, None)


def test_abundant_uses_the_longer_prefix_and_moves_it() -> None:
    # l_prefix = max(25K remote, 0 local) = 25K: 5K incremental <= t -> local; move 25K over.
    p = place(30_000, 25_000, 0, T, CachePolicy.ABUNDANT)
    assert p.cluster is Cluster.PD and p.incremental_tokens == 5_000
    assert p.cache_move == CacheMove(Cluster.PRFAAS, Cluster.PD, 25_000)
    # Longer prefix already where the compute goes: no move.
    p = place(60_000, 30_000, 10_000, T, CachePolicy.ABUNDANT)
    assert (p.cluster, p.incremental_tokens, p.cache_move) == (Cluster.PRFAAS, 30_000, None)
    # Only the missing part moves: local holds 10K, remote 35K, 45K prompt -> 10K incremental.
    p = place(45_000, 35_000, 10_000, T, CachePolicy.ABUNDANT)
    assert p.cache_move == CacheMove(Cluster.PRFAAS, Cluster.PD, 25_000)


def test_threshold_is_exclusive_and_unavailable_clusters_are_skipped() -> None:
    assert place(20_000, 0, 0, T, CachePolicy.SCARCE).cluster is Cluster.PD
    assert place(20_001, 0, 0, T, CachePolicy.SCARCE).cluster is Cluster.PRFAAS
    assert place(90_000, 0, 0, T, CachePolicy.SCARCE, has_prfaas=False).cluster is Cluster.PD
    assert place(100, 0, 0, T, CachePolicy.SCARCE, has_pd=False).cluster is Cluster.PRFAAS
    with pytest.raises(AdmissionRejected):
        place(100, 0, 0, T, CachePolicy.SCARCE, has_pd=False, has_prfaas=False)


def test_full_prefix_hit_still_computes_the_last_token() -> None:
    p = place(1000, 0, 1000, T, CachePolicy.SCARCE)
    assert p.incremental_tokens == 1 and p.prefix_tokens == 999


def test_cache_affine_node_then_least_loaded() -> None:
    # 1 ms per token: b's 800 cached tokens save 0.8 s of its 1,000-token prefill.
    nodes = [
        node("a", backlog=5.0, prefill_s_per_token=1e-3),
        node("b", prefix=800, backlog=1.5, prefill_s_per_token=1e-3),
        node("c", backlog=1.0, prefill_s_per_token=1e-3),
    ]
    assert choose_prefill_node(nodes, 1000).node_id == "b"  # type: ignore[union-attr]
    nodes = [node("a", backlog=5.0), node("c", backlog=1.0), node("d", backlog=1.0)]
    assert choose_prefill_node(nodes, 1000).node_id == "c"  # type: ignore[union-attr]
    assert choose_prefill_node([node("x", prefix=9, is_draining=True)]) is None
    dec = [node("d1", free_decode_slots=3), node("d2", free_decode_slots=7)]
    assert choose_decode_node(dec).node_id == "d2"  # type: ignore[union-attr]


def test_equal_load_keeps_affinity_and_a_hot_node_overflows() -> None:
    rate = 1e-3  # s per computed token
    # A shared 4K system prompt cached on h only; an 8K prompt. At equal load h wins (its
    # prefill finishes 4 s earlier); with 3 s of queued work it still does (4 s saved > 3 s).
    for backlog in (0.0, 3.0):
        hot = node("h", prefix=4096, backlog=backlog, prefill_s_per_token=rate)
        idle = node("i", prefill_s_per_token=rate)
        assert choose_prefill_node([idle, hot], 8192).node_id == "h"  # type: ignore[union-attr]
    # Once its queue is longer than what the prefix saves, the idle node takes the request.
    hot = node("h", prefix=4096, backlog=5.0, prefill_s_per_token=rate)
    assert choose_prefill_node([hot, idle], 8192).node_id == "i"  # type: ignore[union-attr]
    # Without a per-token estimate load decides, and the prefix breaks a tie of load.
    assert choose_prefill_node([node("h", prefix=4096, backlog=0.1), node("i")], 8192) == node("i")
    assert choose_prefill_node([node("i"), node("h", prefix=4096)], 8192) == node("h", prefix=4096)


def test_route_reuses_only_the_chosen_nodes_prefix() -> None:
    # r1 holds 30K of a 50K prompt but is 40 s behind: r0 (idle) recomputes all of it sooner.
    rate = 1e-3
    view = ClusterView(
        prfaas=(node("r0", prefill_s_per_token=rate),
                node("r1", prefix=30_000, backlog=40.0, prefill_s_per_token=rate)),
        pd_prefill=(node("p0", prefill_s_per_token=rate),),
    )  # fmt: skip
    d = route(RequestView("q", 50_000), view, PolicyState(T), now_s=1.0)
    assert (d.prefill_node_id, d.prefix_tokens, d.incremental_tokens) == ("r0", 0, 50_000)
    # Under abundant bandwidth the move is judged from the chosen nodes' prefixes as well.
    d = route(RequestView("q", 50_000), view, PolicyState(T, CachePolicy.ABUNDANT), now_s=1.0)
    assert (d.prefill_node_id, d.cache_move) == ("r0", None)


def test_route_picks_cluster_node_and_decode() -> None:
    view = ClusterView(
        prfaas=(node("r0", backlog=2.0, prefill_s_per_token=1e-3),
                node("r1", prefix=30_000, backlog=4.0, prefill_s_per_token=1e-3)),
        pd_prefill=(node("p0"),),
        pd_decode=(node("d0", free_decode_slots=1), node("d1", free_decode_slots=5)),
    )  # fmt: skip
    d = route(RequestView("q1", 50_000), view, PolicyState(T), now_s=12.5)
    assert (d.cluster, d.prefill_node_id, d.decode_node_id) == (Cluster.PRFAAS, "r1", "d1")
    assert d.incremental_tokens == 20_000 and d.is_remote and d.decided_at_s == 12.5
    d = route(RequestView("q2", 8_000), view, PolicyState(T), now_s=13.0)
    assert (d.cluster, d.prefill_node_id) == (Cluster.PD, "p0")


def test_route_is_deterministic_and_rejects_without_nodes() -> None:
    view = ClusterView((node("r0"),), (node("p0"),))
    a = route(RequestView("q", 40_000), view, PolicyState(T), 1.0)
    assert a == route(RequestView("q", 40_000), view, PolicyState(T), 1.0)
    assert a.decode_node_id is None
    with pytest.raises(AdmissionRejected):
        route(RequestView("q", 10), ClusterView((), ()), PolicyState(T), 1.0)
