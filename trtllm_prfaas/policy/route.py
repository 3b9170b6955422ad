"""One routing decision: the single pure function the live router and the simulator both call.

``route(request, cluster, state, now_s)`` takes plain snapshots and returns a
:class:`RouteDecision`; it reads no clock (``now_s`` is only recorded in the decision), keeps no
state and has no side effects, so a recorded trace of its inputs replays to the same decisions.

Contract for :class:`ClusterView`: each tuple holds *candidate* nodes of one pool, not
necessarily all of them. A caller must include at least the least-loaded usable node of every
pool (least ``backlog_s``, then ``queue_depth``, then ``node_id``) and every node with a non-zero
prefix match for this request (a small router may simply pass every node). With that contract,
and one ``prefill_s_per_token`` for the nodes of a pool that hold no prefix, the decision equals
the one over the full pool (the prefill node is the one that would finish first, see
:mod:`~trtllm_prfaas.policy.placement`), and a 1,250-instance simulation stays O(log n) per
request.

Decode: if ``pd_decode`` is non-empty the decision names the decode node (a free slot and the
longest cached prefix, then most free slots, see
:func:`~trtllm_prfaas.policy.placement.choose_decode_node`); the router reserves a slot there
before prefill. An empty ``pd_decode`` means the caller assigns decode slots itself (the
simulator models the decode tier as one pool of slots) and ``decode_node_id`` is ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtllm_prfaas.errors import AdmissionRejected
from trtllm_prfaas.policy.controller import CachePolicy, ControllerState
from trtllm_prfaas.policy.placement import (
    CacheMove,
    Cluster,
    NodeView,
    choose_decode_node,
    choose_prefill_node,
    place,
)

__all__ = ["ClusterView", "PolicyState", "RequestView", "RouteDecision", "route"]


@dataclass(frozen=True, slots=True)
class RequestView:
    """What routing needs of a request: its id and prompt length in tokens."""

    request_id: str
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Candidate nodes per pool for one request (see the module's contract)."""

    prfaas: tuple[NodeView, ...]
    pd_prefill: tuple[NodeView, ...]
    pd_decode: tuple[NodeView, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyState:
    """The knobs in force: the threshold ``t`` (tokens) and the cache policy."""

    threshold_tokens: float
    cache_policy: CachePolicy = CachePolicy.SCARCE

    @classmethod
    def from_controller(cls, state: ControllerState) -> PolicyState:
        """The routing knobs of a short-timescale controller state."""
        return cls(state.threshold_tokens, state.cache_policy)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where the request goes and why.

    ``incremental_tokens`` is the prefill work (prompt minus reused prefix); ``cache_move`` is a
    prefix move to do before the prefill (abundant policy only); ``is_remote`` means the KV
    crosses the link to the PD cluster after prefill.
    """

    request_id: str
    cluster: Cluster
    prefill_node_id: str
    decode_node_id: str | None
    incremental_tokens: int
    prefix_tokens: int
    cache_move: CacheMove | None
    threshold_tokens: float
    decided_at_s: float

    @property
    def is_remote(self) -> bool:
        """True when prefill runs on the PrfaaS cluster."""
        return self.cluster is Cluster.PRFAAS


def route(
    request: RequestView, cluster: ClusterView, state: PolicyState, now_s: float
) -> RouteDecision:
    """Place one request: cluster by threshold and cache policy, then the cache-affine node.

    Raises ``AdmissionRejected`` when neither cluster has a usable prefill node, or when decode
    candidates were given but none is usable.
    """
    remote_node = choose_prefill_node(cluster.prfaas, request.prompt_tokens)
    local_node = choose_prefill_node(cluster.pd_prefill, request.prompt_tokens)
    placement = place(
        request.prompt_tokens,
        remote_node.prefix_tokens if remote_node else 0,  # what the chosen node reuses
        local_node.prefix_tokens if local_node else 0,
        state.threshold_tokens,
        state.cache_policy,
        has_prfaas=remote_node is not None,
        has_pd=local_node is not None,
    )
    node = remote_node if placement.cluster is Cluster.PRFAAS else local_node
    assert node is not None  # place() never picks a cluster without a usable node
    decode_id = None
    if cluster.pd_decode:
        decode = choose_decode_node(cluster.pd_decode)
        if decode is None:
            raise AdmissionRejected("no usable decode node")
        decode_id = decode.node_id
    return RouteDecision(
        request_id=request.request_id,
        cluster=placement.cluster,
        prefill_node_id=node.node_id,
        decode_node_id=decode_id,
        incremental_tokens=placement.incremental_tokens,
        prefix_tokens=placement.prefix_tokens,
        cache_move=placement.cache_move,
        threshold_tokens=state.threshold_tokens,
        decided_at_s=now_s,
    )
