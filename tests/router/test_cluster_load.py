"""The router's own view of prefill load (``WorkerState.prefill_tokens_in_flight`` and
``prefill_s_per_token``) and what ``policy.route`` does with it."""

from __future__ import annotations

import pytest

from trtllm_prfaas.policy.placement import choose_prefill_node
from trtllm_prfaas.router.cluster import WorkerState
from trtllm_prfaas.worker import protocol as p


def _worker(name: str) -> WorkerState:
    info = p.WorkerInfo(name, "prefill", "dc", "tiny", 8192, 64, 512, 4)
    return WorkerState(name, "tcp://x", info, is_prfaas=True)


def test_a_leg_sent_to_an_idle_node_measures_its_speed() -> None:
    w = _worker("p0")
    assert w.on_prefill_sent(1000) is True  # idle: its leg time is a speed sample
    assert w.on_prefill_sent(500) is False  # queued behind the first: not a sample
    assert w.view().backlog_s == 0.0  # no estimate yet: load is not in seconds
    w.on_prefill_done(1000, 2.0)
    assert w.prefill_s_per_token == pytest.approx(0.002)
    assert w.view().backlog_s == pytest.approx(500 * 0.002)
    assert w.view().prefill_s_per_token == pytest.approx(0.002)
    w.on_prefill_done(500, None)
    assert w.prefill_tokens_in_flight == 0 and w.view().backlog_s == 0.0
    w.on_prefill_sent(100)
    w.on_prefill_done(100, 0.4)  # 0.004 s/token: the EWMA moves a fifth of the way
    assert w.prefill_s_per_token == pytest.approx(0.002 + 0.2 * 0.002)


def test_a_leg_that_never_produced_t1_still_leaves_the_backlog() -> None:
    w = _worker("p0")
    w.on_prefill_sent(300)
    w.on_prefill_done(300, None)  # failed or cancelled: no sample
    w.on_prefill_done(300, None)  # never below zero
    assert w.prefill_tokens_in_flight == 0 and w.prefill_s_per_token == 0.0


def test_a_loaded_cache_holder_loses_to_an_idle_node_once_its_queue_outweighs_the_prefix() -> None:
    hot, idle = _worker("p0"), _worker("p1")
    for w in (hot, idle):
        w.on_prefill_sent(1000)
        w.on_prefill_done(1000, 1.0)  # both 1 ms per token
    prompt, prefix = 4000, 3000  # the hot node holds 3000 tokens: it saves 3 s
    hot.on_prefill_sent(2000)  # 2 s of work ahead of the request: still the better node
    assert choose_prefill_node([hot.view(prefix), idle.view(0)], prompt).node_id == "p0"
    hot.on_prefill_sent(2000)  # 4 s ahead: the idle node finishes first
    assert choose_prefill_node([hot.view(prefix), idle.view(0)], prompt).node_id == "p1"
