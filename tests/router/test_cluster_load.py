"""The router's own view of prefill load (``WorkerState.prefill_tokens_in_flight``, the cluster's
``prefill_s_per_token``) and what ``choose_prefill_node`` does with it."""

from __future__ import annotations

import pytest

from trtllm_prfaas.policy.placement import NodeView, choose_prefill_node
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.worker import protocol as p


def _cluster(*names: str, is_prfaas: bool = True) -> ClusterState:
    cluster = ClusterState()
    for name in names:
        info = p.WorkerInfo(name, "prefill", "dc", "tiny", 8192, 64, 512, 4)
        cluster.add(WorkerState(name, "tcp://x", info, is_prfaas=is_prfaas))
    return cluster


def _node(cluster: ClusterState, name: str) -> NodeView:
    return next(n for n in cluster.view(0.0).prfaas if n.node_id == name)


def test_a_leg_sent_to_an_idle_node_measures_its_clusters_speed() -> None:
    cluster = _cluster("p0", "p1")
    p0 = cluster.workers["p0"]
    assert cluster.on_prefill_sent(p0, 1000) is True  # idle: its leg time is a speed sample
    assert cluster.on_prefill_sent(p0, 500) is False  # queued behind the first: no sample
    assert _node(cluster, "p0").backlog_s == 0.0  # no estimate yet: no load in seconds
    cluster.on_prefill_done(p0, 1000, 2.0)
    assert cluster.prefill_s_per_token[True] == pytest.approx(0.002)
    assert _node(cluster, "p0").backlog_s == pytest.approx(500 * 0.002)
    assert _node(cluster, "p1").prefill_s_per_token == pytest.approx(0.002)  # one per cluster
    cluster.on_prefill_done(p0, 500, None)
    assert p0.prefill_tokens_in_flight == 0 and _node(cluster, "p0").backlog_s == 0.0
    cluster.on_prefill_sent(p0, 100)
    cluster.on_prefill_done(p0, 100, 0.4)  # 0.004 s/token: the EWMA moves a fifth of the way
    assert cluster.prefill_s_per_token[True] == pytest.approx(0.002 + 0.2 * 0.002)
    assert False not in cluster.prefill_s_per_token  # the PD cluster has its own, unmeasured


def test_a_leg_that_never_produced_t1_still_leaves_the_backlog() -> None:
    cluster = _cluster("p0")
    p0 = cluster.workers["p0"]
    cluster.on_prefill_sent(p0, 300)
    cluster.on_prefill_done(p0, 300, None)  # failed or cancelled: no sample
    cluster.on_prefill_done(p0, 300, None)  # never below zero
    assert p0.prefill_tokens_in_flight == 0 and not cluster.prefill_s_per_token


def test_a_loaded_cache_holder_loses_to_an_idle_node_once_its_queue_outweighs_the_prefix() -> None:
    cluster = _cluster("p0", "p1")
    hot = cluster.workers["p0"]
    cluster.on_prefill_sent(hot, 1000)
    cluster.on_prefill_done(hot, 1000, 1.0)  # 1 ms per token
    prompt, prefix = 4000, 3000  # the hot node holds 3000 tokens: it saves 3 s

    def pick() -> str:
        views = [cluster.workers["p0"].view(prefix, 0.001), cluster.workers["p1"].view(0, 0.001)]
        chosen = choose_prefill_node(views, prompt)
        assert chosen is not None
        return chosen.node_id

    cluster.on_prefill_sent(hot, 2000)  # 2 s of work ahead of the request: still the better node
    assert pick() == "p0"
    cluster.on_prefill_sent(hot, 2000)  # 4 s ahead: the idle node finishes first
    assert pick() == "p1"
