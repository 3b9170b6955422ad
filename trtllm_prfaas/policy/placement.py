"""Cache-aware placement (PAPER.md, "Routing") and the cache-affine node choice.

Pure functions over plain snapshots. The caller (live router or simulator) builds a
:class:`NodeView` per candidate node *for one request*: ``prefix_tokens`` is how much of this
request's prompt that node already caches (from the prefix index), ``backlog_s`` and
``queue_depth`` are its current load, ``free_decode_slots`` its free decode slots.

Placement rules, with ``t`` the threshold and ``l_total`` the prompt length:

- **scarce bandwidth** (``CachePolicy.SCARCE``): each cluster's cache is judged on its own. If
  ``l_total - l_pd <= t`` the request prefills locally (reusing the PD cluster's prefix), else on
  PrfaaS (reusing the PrfaaS cluster's prefix). Nothing is moved across the link.
- **abundant bandwidth** (``CachePolicy.ABUNDANT``): ``l_prefix = max(l_prfaas, l_pd)`` and the
  incremental length is ``l_total - l_prefix``; ``> t`` goes to PrfaaS. If the cluster holding the
  longer prefix is not the one chosen, that prefix is moved across first (:class:`CacheMove`:
  the full-attention KV of the tokens the target lacks plus the fixed recurrent state).
- a cluster with no usable (non-draining) prefill node is never chosen; if neither has one the
  request cannot be placed (:class:`~trtllm_prfaas.errors.AdmissionRejected`).

Node choice inside a cluster weighs the prefix against load, in seconds (as Dynamo's KV router
scores a worker by the blocks it must prefill plus its queued work, and SGLang's cache-aware
router falls back to the least loaded node when load is imbalanced): the node where this
request's prefill would *finish first*, ``backlog_s + (prompt - prefix) * prefill_s_per_token``,
then the longest prefix, then the fewest queued requests, then the smallest ``node_id``
(deterministic, so a replayed trace makes the same decisions). So at equal load the node holding
the prefix keeps it (cache affinity), and a node whose queue is longer than the prefix saves is
passed over for an idler one (a shared system prompt no longer sends every request to the node
that first cached it). A caller that has no per-token estimate leaves ``prefill_s_per_token`` 0:
then the least backlog wins and the prefix breaks ties (at equal backlog, as before: affinity).
Draining nodes are never chosen. The cluster's prefix in :func:`place` is the chosen node's:
what the request will actually reuse there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from trtllm_prfaas.errors import AdmissionRejected
from trtllm_prfaas.policy.controller import CachePolicy

__all__ = [
    "CacheMove",
    "Cluster",
    "NodeView",
    "Placement",
    "choose_decode_node",
    "choose_prefill_node",
    "cluster_prefix_tokens",
    "place",
    "prefill_finish_s",
]


class Cluster(Enum):
    """Where a request's prefill runs."""

    PRFAAS = "prfaas"  # remote prefill-only cluster; KV crosses the link
    PD = "pd"  # local PD cluster's prefill (PD-P) nodes


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as the router sees it for one request (a snapshot; never mutated).

    ``backlog_s`` is the estimated seconds of queued and running work before the node could start
    this request; ``queue_depth`` counts requests waiting (not running) on it;
    ``prefill_s_per_token`` the caller's estimate of the seconds this node takes per prompt token
    it computes for this request (0: unknown, then load alone decides and the prefix breaks ties).
    """

    node_id: str
    prefix_tokens: int = 0
    queue_depth: int = 0
    backlog_s: float = 0.0
    free_decode_slots: int = 0
    is_draining: bool = False
    prefill_s_per_token: float = 0.0


@dataclass(frozen=True, slots=True)
class CacheMove:
    """Move ``tokens`` of cached prefix from ``source`` to ``target`` before the prefill."""

    source: Cluster
    target: Cluster
    tokens: int


@dataclass(frozen=True, slots=True)
class Placement:
    """Which cluster prefills, how much is computed (``incremental_tokens``), how much of the
    prompt is reused there (``prefix_tokens``, after any move) and the move, if any."""

    cluster: Cluster
    incremental_tokens: int
    prefix_tokens: int
    cache_move: CacheMove | None


def _usable(nodes: Iterable[NodeView]) -> list[NodeView]:
    return [n for n in nodes if not n.is_draining]


def cluster_prefix_tokens(nodes: Iterable[NodeView]) -> int:
    """The longest prefix of this request cached on any usable node of a cluster (0 if none)."""
    return max((n.prefix_tokens for n in nodes if not n.is_draining), default=0)


def prefill_finish_s(node: NodeView, prompt_tokens: int) -> float:
    """Seconds from now until ``node`` would finish this request's prefill: its backlog plus
    the tokens it lacks (the last prompt token is always computed) at its per-token cost."""
    reused = min(node.prefix_tokens, max(prompt_tokens - 1, 0))
    return node.backlog_s + (prompt_tokens - reused) * node.prefill_s_per_token


def choose_prefill_node(nodes: Iterable[NodeView], prompt_tokens: int = 0) -> NodeView | None:
    """Prefix weighed against load (see the module doc): the earliest prefill finish for a
    ``prompt_tokens`` prompt, then the longest prefix, then fewest queued, then id."""
    usable = _usable(nodes)
    if not usable:
        return None
    return min(
        usable,
        key=lambda n: (
            prefill_finish_s(n, prompt_tokens),
            -n.prefix_tokens,
            n.queue_depth,
            n.node_id,
        ),
    )


def choose_decode_node(nodes: Iterable[NodeView]) -> NodeView | None:
    """Among nodes with a free slot the one caching the longest prefix of the request (its
    own cached prefix need not cross the link again), then most free decode slots, then fewest
    queued, then id; ``None`` if no usable node. With no prefix anywhere: most free slots."""
    usable = _usable(nodes)
    if not usable:
        return None
    return min(
        usable,
        key=lambda n: (
            n.free_decode_slots <= 0,
            -n.prefix_tokens,
            -n.free_decode_slots,
            n.queue_depth,
            n.node_id,
        ),
    )


def _scarce(prompt: int, pfx_prfaas: int, pfx_pd: int, t: float) -> Placement:
    if prompt - pfx_pd <= t:
        return Placement(Cluster.PD, prompt - pfx_pd, pfx_pd, None)
    return Placement(Cluster.PRFAAS, prompt - pfx_prfaas, pfx_prfaas, None)


def _abundant(prompt: int, pfx_prfaas: int, pfx_pd: int, t: float) -> Placement:
    best = max(pfx_prfaas, pfx_pd)
    cluster = Cluster.PRFAAS if prompt - best > t else Cluster.PD
    own = pfx_prfaas if cluster is Cluster.PRFAAS else pfx_pd
    move = None
    if best > own:
        other = Cluster.PD if cluster is Cluster.PRFAAS else Cluster.PRFAAS
        move = CacheMove(source=other, target=cluster, tokens=best - own)
    return Placement(cluster, prompt - best, best, move)


def _forced(cluster: Cluster, prompt: int, prefix: int) -> Placement:
    return Placement(cluster, prompt - prefix, prefix, None)


def place(
    prompt_tokens: int,
    prfaas_prefix_tokens: int,
    pd_prefix_tokens: int,
    threshold_tokens: float,
    policy: CachePolicy,
    *,
    has_prfaas: bool = True,
    has_pd: bool = True,
) -> Placement:
    """Choose the prefill cluster by the module's rules.

    ``has_prfaas`` / ``has_pd`` say whether the cluster has a usable prefill node; a cluster
    without one is never chosen. Raises ``AdmissionRejected`` when neither has one.
    Prefix lengths are clipped to ``prompt_tokens - 1`` (the last prompt token is always computed,
    as TensorRT-LLM requires).
    """
    if not (has_prfaas or has_pd):
        raise AdmissionRejected("no usable prefill node in either cluster")
    cap = max(prompt_tokens - 1, 0)
    pfx_prfaas, pfx_pd = min(prfaas_prefix_tokens, cap), min(pd_prefix_tokens, cap)
    if not has_prfaas:
        return _forced(Cluster.PD, prompt_tokens, pfx_pd)
    if not has_pd:
        return _forced(Cluster.PRFAAS, prompt_tokens, pfx_prfaas)
    if policy is CachePolicy.ABUNDANT:
        return _abundant(prompt_tokens, pfx_prfaas, pfx_pd, threshold_tokens)
    return _scarce(prompt_tokens, pfx_prfaas, pfx_pd, threshold_tokens)
