"""The simulator's modelled prefix caches, its token-level traces, and cache-aware DES runs."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from tests.builders import caching_engine_and_conversation
from tests.conftest import EngineFactory
from trtllm_prfaas.engines.prefix_cache import cache_key_for
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.controller import CachePolicy
from trtllm_prfaas.policy.model import Deployment, Workload
from trtllm_prfaas.policy.workload import TruncatedLogNormal
from trtllm_prfaas.router.prefix_index import PrefixIndex
from trtllm_prfaas.sim.caches import SIM_CACHE_KEY, CacheModel, NodePrefixCache, SimPrefixCaches
from trtllm_prfaas.sim.conversations import (
    ConversationModel,
    make_conversations,
    shared_documents,
)
from trtllm_prfaas.sim.des import DesConfig, simulate
from trtllm_prfaas.sim.fluid import case_study_system
from trtllm_prfaas.sim.link import LinkSchedule
from trtllm_prfaas.sim.traffic import PoissonArrivals, make_trace

TPB = 4
LENGTHS = TruncatedLogNormal(mu=math.log(8000), sigma=0.5, lo=1000, hi=30_000)


def chain(tag: int, n: int, base: tuple[int, ...] = ()) -> list[int]:
    """A chain extending ``base`` by ``n`` blocks (ids are unique per prefix by construction)."""
    return [*base, *(tag * 1000 + k for k in range(n))]


def test_lru_evicts_tails_first_and_the_index_follows() -> None:
    caches = SimPrefixCaches(CacheModel(max_blocks=6, tokens_per_block=TPB, is_hybrid=False))
    caches.add_node("n0", "prfaas")
    a = chain(1, 4)
    b = chain(2, 3, tuple(a[:2]))  # shares a's first two blocks
    caches.prefill_done("n0", a)
    caches.prefill_done("n0", b)  # 7 distinct blocks > 6: a's tail (a[3]) goes first
    node = caches.nodes["n0"]
    assert node.match_blocks(a) == 3 and node.match_blocks(b) == 5
    assert caches.prefix_tokens("n0", a, 0.0) == 3 * TPB  # the index says what the node holds
    assert caches.prefix_tokens("n0", b, 0.0) == 5 * TPB
    caches.prefill_done("n0", chain(3, 6))  # a newcomer fills the cache: everything else goes
    assert caches.prefix_tokens("n0", a, 0.0) == 0 and caches.num_evicted_blocks == 7
    assert list(node.blocks) == chain(3, 6)[::-1]  # head most recent: evicted last


def test_hybrid_match_ends_at_a_snapshot() -> None:
    model = CacheModel(max_blocks=100, tokens_per_block=TPB, is_hybrid=True, max_snapshots=2)
    caches = SimPrefixCaches(model)
    caches.add_node("n0", "pd")
    long = chain(1, 8)
    caches.prefill_done("n0", long)  # snapshot at block 8 only
    assert caches.prefix_tokens("n0", long, 0.0) == 8 * TPB
    # A prompt sharing 5 blocks: the blocks are there but no state after exactly 5 of them.
    assert caches.prefix_tokens("n0", chain(2, 2, tuple(long[:5])), 0.0) == 0
    short = long[:3]
    caches.prefill_done("n0", short)  # a snapshot at 3 now
    assert caches.prefix_tokens("n0", chain(2, 2, tuple(long[:5])), 0.0) == 3 * TPB
    caches.prefill_done("n0", chain(3, 1))  # a third snapshot evicts the oldest (long's end)
    assert caches.prefix_tokens("n0", long, 0.0) == 3 * TPB
    assert caches.nodes["n0"].match_blocks(long) == 3  # the node and the index agree


def test_node_events_rebuild_the_same_index() -> None:
    """Events drained from a node and applied to a fresh index give the node's own matches."""
    node = NodePrefixCache(CacheModel(max_blocks=10, tokens_per_block=TPB))
    index = PrefixIndex(SIM_CACHE_KEY, TPB, requires_states=True)
    index.add_node("n", "c")
    chains = [chain(1, 5), chain(2, 4, tuple(chain(1, 5)[:3])), chain(3, 7), chain(1, 6)]
    for c in chains:
        node.store(c)
        index.apply("n", node.drain())
        for probe in chains:
            assert index.match("n", probe, 0.0).num_blocks == node.match_blocks(probe)


def test_conversation_hashes_are_the_routers() -> None:
    model = ConversationModel(5, 1.0, num_turns=3, num_system_prompts=2, system_prompt_tokens=64,
                              user_tokens=20, output_tokens=8, think_s=2.0)  # fmt: skip
    conv = make_conversations(model, seed=4)
    trace = conv.trace(tokens_per_block=TPB)
    assert trace.num_requests == 15 and np.all(np.diff(trace.arrival_s) >= 0)
    index = PrefixIndex(SIM_CACHE_KEY, TPB)
    assert trace.prompt_hashes is not None
    for prompt, hashes in zip(conv.prompts, trace.prompt_hashes, strict=True):
        assert hashes == index.hashes_for(prompt.tolist())
    # Each turn extends the conversation's last prompt; system prompts are shared across them.
    for c in range(5):
        turns = [p for p, cc in zip(conv.prompts, conv.conversation, strict=True) if cc == c]
        assert all(np.array_equal(b[: len(a)], a) for a, b in itertools.pairwise(turns))
    heads = {tuple(p[:64].tolist()) for p in conv.prompts}
    assert 1 <= len(heads) <= 2
    docs = make_conversations(shared_documents(12, 2.0, 3, 256, 16), seed=1)
    assert len({tuple(p[:256].tolist()) for p in docs.prompts}) <= 3 and len(docs.prompts) == 12
    with pytest.raises(ConfigError, match="num_turns"):
        ConversationModel(1, 1.0, num_turns=0)


def _config(caches: CacheModel | None, **kw: object) -> DesConfig:
    return DesConfig(
        case_study_system(), Workload(LENGTHS, 200), Deployment(2, 2, 2),
        LinkSchedule.constant(100.0), 6000.0, caches=caches, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_cache_aware_des_computes_less_and_keeps_conversations_on_their_node() -> None:
    model = ConversationModel(40, 0.5, num_turns=4, system_prompt_tokens=4096)
    conv = make_conversations(model, seed=2)
    trace = conv.trace(32)
    blind = simulate(_config(None), trace)
    aware = simulate(_config(CacheModel(max_blocks=200_000)), trace)
    assert blind.computed_tokens.sum() == trace.prompt_tokens.sum()
    assert aware.computed_tokens.sum() < 0.5 * blind.computed_tokens.sum()
    assert (aware.prefix_tokens + aware.computed_tokens == trace.prompt_tokens).all()
    assert not np.isnan(aware.ttft_s).any()
    with pytest.raises(ConfigError, match="prompt_hashes"):
        plain = make_trace(PoissonArrivals(1.0), LENGTHS, 5, 0)
        simulate(_config(CacheModel(max_blocks=10)), plain)
    with pytest.raises(ConfigError, match="blocks of 16"):
        simulate(_config(CacheModel(max_blocks=10, tokens_per_block=16)), trace)


def test_abundant_policy_moves_caches_in_the_des() -> None:
    """A turn whose history is cached on PrfaaS but whose new part is short: under scarce
    bandwidth it prefills remotely again (the local cluster holds nothing); under abundant
    bandwidth it goes local and its prefix is moved across first. Same work either way."""
    model = ConversationModel(30, 0.5, num_turns=4, system_prompt_tokens=8192)
    trace = make_conversations(model, seed=5).trace(32)
    scarce = simulate(_config(CacheModel(max_blocks=200_000)), trace)
    abundant = simulate(
        _config(CacheModel(max_blocks=200_000), cache_policy=CachePolicy.ABUNDANT), trace
    )
    assert scarce.num_cache_moves == 0 < abundant.num_cache_moves
    assert abundant.is_remote.sum() < scarce.is_remote.sum()
    assert abundant.computed_tokens.sum() <= scarce.computed_tokens.sum()


def test_a_shared_document_overflows_its_hot_node() -> None:
    """Questions over one long document, faster than one node prefills them: the node that
    cached it first keeps it while its queue is shorter than what the cache saves, then the
    others take a copy; the work is shared and each node computes the document about once."""
    model = shared_documents(200, 4.0, num_documents=1, document_tokens=16_384, question_tokens=400)
    trace = make_conversations(model, seed=3).trace(32)
    config = DesConfig(
        case_study_system(), Workload(LENGTHS, 200), Deployment(4, 1, 4),
        LinkSchedule.constant(100.0), 1000.0, caches=CacheModel(max_blocks=200_000),
    )  # fmt: skip
    result = simulate(config, trace)
    nodes = [n for n in result.prefill_node_ids if n.startswith("prfaas")]
    counts = {n: nodes.count(n) for n in set(nodes)}
    assert len(counts) >= 2 and max(counts.values()) < 0.9 * len(nodes), counts
    cold = int((result.computed_tokens > 16_000).sum())  # computed the document itself
    assert len(counts) <= cold <= 2 * len(counts), (cold, counts)


@pytest.mark.parametrize("max_blocks", [1000, 12], ids=["roomy", "evicting"])
def test_the_model_matches_the_reference_engines_cache(
    make_engine: EngineFactory, max_blocks: int
) -> None:
    """The same conversation through the reference engine (block reuse on, hybrid tiny model)
    and through ``NodePrefixCache``: before every request the index fed by the engine's own KV
    events and the model agree on the prefix, and the engine reuses exactly that much."""
    model, engine, conv = caching_engine_and_conversation(make_engine, max_blocks)
    tpb = model.tokens_per_block
    index = PrefixIndex(cache_key_for(model), tpb, requires_states=True)
    index.add_node("engine", "pd")
    node = NodePrefixCache(CacheModel(max_blocks, tpb, is_hybrid=True, max_snapshots=64,
                                      chunk_tokens=64))  # fmt: skip
    trace = conv.trace(tpb, cache_key_for(model))
    assert trace.prompt_hashes is not None
    reused = []
    for prompt, chain in zip(conv.prompts, trace.prompt_hashes, strict=True):
        index.apply("engine", engine.drain_kv_events())
        expected = index.match("engine", chain, 0.0).num_tokens
        assert node.match_blocks(chain) * tpb == expected
        before = engine.stats.num_reused_tokens
        engine.generate([prompt.tolist()], SamplingParams(max_tokens=2, ignore_eos=True))
        assert engine.stats.num_reused_tokens - before == expected
        reused.append(expected)
        node.store(chain)
    assert sum(r > 0 for r in reused) >= 3, reused
    assert (node.num_evicted_blocks > 0) == (max_blocks < 100)


def test_caches_with_the_controller_and_the_rebalancer() -> None:
    """Dynamic t (and cache policy) and role conversions on a cache-aware run: a node the
    rebalancer adds to the PD prefill pool joins the index and serves cache hits; every request
    is served."""
    from trtllm_prfaas.policy.rebalancer import RebalancerConfig
    from trtllm_prfaas.sim.des import ThresholdMode

    model = ConversationModel(200, 1.0, num_turns=3, system_prompt_tokens=4096)
    trace = make_conversations(model, seed=9).trace(32)
    rebalancer = RebalancerConfig(period_s=5.0, persist_s=10.0, cooldown_s=20.0)
    config = replace(
        _config(CacheModel(max_blocks=50_000)), mode=ThresholdMode.DYNAMIC,
        rebalancer=rebalancer, deployment=Deployment(1, 1, 6),
    )  # fmt: skip
    result = simulate(config, trace)
    assert result.num_conversions >= 1
    assert not np.isnan(result.ttft_s).any()
    assert (result.prefix_tokens + result.computed_tokens == trace.prompt_tokens).all()
    on_new = [k for k, n in enumerate(result.prefill_node_ids) if n == "pd-p-1"]
    assert on_new and result.prefix_tokens[on_new].sum() > 0
