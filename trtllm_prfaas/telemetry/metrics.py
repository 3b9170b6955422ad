"""Prometheus metrics of the router, on a ``CollectorRegistry`` passed in (never the global one).

Who records what:

- the front door: ``prfaas_frontdoor_requests_total{model, rpc, status}`` (status is the gRPC
  status code name, ``OK`` included), ``prfaas_ttft_seconds{model}`` (request received to first
  token) and ``prfaas_tpot_seconds{model}`` (mean time per output token after the first);
- orchestrators: ``prfaas_requests_total{route, status}`` (route ``local``, ``remote``, ...);
- the disaggregated router: ``prfaas_relay_bytes_total{link}``, ``prfaas_relay_goodput_gbps{link}``,
  ``prfaas_worker_queue_depth{worker}``, ``prfaas_worker_free_decode_slots{worker}``;
- its control loop (``router/control.py``, once per period): ``prfaas_threshold_tokens`` (the
  live ``t``), ``prfaas_threshold_opt_tokens`` (the solver's ``t_opt``), ``prfaas_offload_share``
  (share of recent requests routed remote), ``prfaas_egress_estimate_gbps`` (PrfaaS relay egress
  over the last period), ``prfaas_link_estimate_gbps`` (the live link capacity estimate),
  ``prfaas_threshold_min_tokens`` (the floor ``t_min`` the live link sets),
  ``prfaas_controller_decisions_total{reason}``, ``prfaas_rebalance_actions_total{action}`` and
  ``prfaas_role_conversions_total{role}`` (role is the new role);
- membership (``router/discovered.py``, with ``--discovery``): ``prfaas_discovery_connected``
  (1 while the router's watch on the store is live, 0 while it serves the last membership it
  saw), ``prfaas_discovery_workers`` (registered workers it knows) and
  ``prfaas_discovery_bad_records_total`` (registrations refused as malformed).

``MetricsServer`` serves ``/metrics`` over HTTP on a thread (port 8002 by default, like Triton);
it is a context manager whose ``close()`` shuts the server down and joins the thread.
"""

from __future__ import annotations

import contextlib
import threading
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["DEFAULT_METRICS_PORT", "DiscoveryMetrics", "MetricsServer", "RouterMetrics"]

DEFAULT_METRICS_PORT = 8002

# Seconds; TTFT spans short local prefills to long remote ones, TPOT one decode iteration.
_TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _child(cache: dict[tuple[str, ...], Any], family: Any, *values: str) -> Any:
    """``family.labels(*values)``, looked up once per label set (the per-request paths)."""
    child = cache.get(values)
    if child is None:
        child = cache[values] = family.labels(*values)
    return child


class RouterMetrics:
    """The router's metric families, registered on ``registry``; every method is thread-safe."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # label values -> child, per family recorded per request or per load report
        self._frontdoor_children: dict[tuple[str, ...], Any] = {}
        self._request_children: dict[tuple[str, ...], Any] = {}
        self._ttft_children: dict[tuple[str, ...], Any] = {}
        self._tpot_children: dict[tuple[str, ...], Any] = {}
        self._load_children: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self.workers_lost = Counter(
            "prfaas_workers_lost",
            "Times a worker's connection died and it left routing (process gone or heartbeats "
            "missed); it rejoins when it answers again",
            ["worker"],
            registry=registry,
        )
        self.worker_up = Gauge(
            "prfaas_worker_up",
            "1 while the worker's control connection is up and it is routable, 0 while lost",
            ["worker"],
            registry=registry,
        )
        self.frontdoor_requests = Counter(
            "prfaas_frontdoor_requests",
            "Inference requests answered by the front door, by gRPC status",
            ["model", "rpc", "status"],
            registry=registry,
        )
        self.requests = Counter(
            "prfaas_requests",
            "Requests finished by an orchestrator, by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.ttft = Histogram(
            "prfaas_ttft_seconds",
            "Time to first token, request received to first token sent",
            ["model"],
            buckets=_TTFT_BUCKETS_S,
            registry=registry,
        )
        self.tpot = Histogram(
            "prfaas_tpot_seconds",
            "Mean time per output token after the first, per request",
            ["model"],
            buckets=_TPOT_BUCKETS_S,
            registry=registry,
        )
        self._init_relay_and_workers(registry)
        self._init_control(registry)
        self._init_replicas(registry)
        self._init_prefix(registry)

    def _init_prefix(self, registry: CollectorRegistry) -> None:
        """Prefix caches: the workers' own counters (from their load reports, totals since
        their engine started) and the router's prefix index and routing."""
        self.worker_prefix_hit_rate = Gauge(
            "prfaas_worker_prefix_hit_rate",
            "Share of a worker's prompt tokens served from its prefix cache (block reuse on)",
            ["worker"],
            registry=registry,
        )
        self.worker_prefix_reused_tokens = Gauge(
            "prfaas_worker_prefix_reused_tokens",
            "Prompt tokens a worker served from its prefix cache since its engine started",
            ["worker"],
            registry=registry,
        )
        self.worker_prefix_cached_blocks = Gauge(
            "prfaas_worker_prefix_cached_blocks",
            "Named (reusable) KV blocks in a worker's pool",
            ["worker"],
            registry=registry,
        )
        self.worker_prefix_evictions = Gauge(
            "prfaas_worker_prefix_evictions",
            "Cached blocks a worker evicted (LRU) since its engine started",
            ["worker"],
            registry=registry,
        )
        self.prefix_index_blocks = Gauge(
            "prfaas_prefix_index_blocks",
            "Blocks the router's prefix index holds per worker; mode=approximate: guessed from "
            "the router's own routing (the worker reports no KV cache events)",
            ["worker", "mode"],
            registry=registry,
        )
        self.prefix_index_counts = Gauge(
            "prfaas_prefix_index_count",
            "Prefix index totals since the router started: events applied, resyncs (a worker's "
            "view cleared after lost events), snapshots (a worker's view loaded whole, when the "
            "router joined it late or reconnected), lookups and approximate lookups",
            ["what"],
            registry=registry,
        )
        self.routed_prompt_tokens = Counter(
            "prfaas_routed_prompt_tokens",
            "Prompt tokens routed, by route, and how many of them the chosen prefill node held "
            "(kind=prefix; mode=approximate when that node's holding was guessed)",
            ["route", "kind", "mode"],
            registry=registry,
        )

    def set_worker_prefix_cache(
        self,
        worker: str,
        query_tokens: int,
        reused_tokens: int,
        cached_blocks: int,
        evictions: int,
    ) -> None:
        """A worker's prefix-cache counters from its load report."""
        rate = reused_tokens / query_tokens if query_tokens else 0.0
        self.worker_prefix_hit_rate.labels(worker=worker).set(rate)
        self.worker_prefix_reused_tokens.labels(worker=worker).set(reused_tokens)
        self.worker_prefix_cached_blocks.labels(worker=worker).set(cached_blocks)
        self.worker_prefix_evictions.labels(worker=worker).set(evictions)

    def set_prefix_index(
        self, blocks_per_node: dict[str, int], approximate: set[str], counts: dict[str, int]
    ) -> None:
        """The prefix index's size per followed worker and its totals (``counts`` by name)."""
        self.prefix_index_blocks.clear()  # a worker no longer followed leaves no stale gauge
        for worker, num_blocks in blocks_per_node.items():
            mode = "approximate" if worker in approximate else "exact"
            self.prefix_index_blocks.labels(worker=worker, mode=mode).set(num_blocks)
        for what, value in counts.items():
            self.prefix_index_counts.labels(what=what).set(value)

    def record_routed_prefix(
        self, route: str, prompt_tokens: int, prefix_tokens: int, is_approximate: bool
    ) -> None:
        mode = "approximate" if is_approximate else "exact"
        self.routed_prompt_tokens.labels(route=route, kind="prompt", mode=mode).inc(prompt_tokens)
        self.routed_prompt_tokens.labels(route=route, kind="prefix", mode=mode).inc(prefix_tokens)

    def _init_relay_and_workers(self, registry: CollectorRegistry) -> None:
        self.relay_bytes = Counter(
            "prfaas_relay_bytes", "KV bytes relayed, per link", ["link"], registry=registry
        )
        self.relay_bytes_saved = Counter(
            "prfaas_relay_bytes_saved",
            "KV bytes not relayed because the decode node held the prefix itself (pinned with "
            "its slot): D x kv_bytes_per_token per request whose decode used it",
            registry=registry,
        )
        self.relay_prefix = Counter(
            "prfaas_relay_prefix",
            "Requests whose decode slot came with a pinned prefix (relay only [D, L)): pinned, "
            "or fallback when the decode worker computed the prompt itself after all",
            ["outcome"],
            registry=registry,
        )
        self.cache_moves = Counter(
            "prfaas_cache_moves",
            "Cached prefixes moved to the chosen prefill node before its prefill (abundant "
            "bandwidth): done, or failed (the prefill computed what it lacked)",
            ["outcome"],
            registry=registry,
        )
        self.cache_moved_tokens = Counter(
            "prfaas_cache_moved_tokens", "Prompt tokens of the prefixes moved", registry=registry
        )
        self.relay_outcomes = Counter(
            "prfaas_relay_outcomes",
            "Offloaded requests by how their decode got the prompt's KV: relayed, or recomputed "
            "by the decode worker after a failed or late relay (its fallback policy)",
            ["outcome"],
            registry=registry,
        )
        self.relay_goodput_gbps = Gauge(
            "prfaas_relay_goodput_gbps",
            "Recent KV relay goodput in Gbit/s, per link",
            ["link"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "prfaas_worker_queue_depth",
            "Requests queued at a worker",
            ["worker"],
            registry=registry,
        )
        self.free_decode_slots = Gauge(
            "prfaas_worker_free_decode_slots",
            "Free decode slots at a worker",
            ["worker"],
            registry=registry,
        )

    def _init_control(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=registry)

        self.threshold_tokens = gauge("prfaas_threshold_tokens", "Live offload threshold t")
        self.threshold_opt_tokens = gauge(
            "prfaas_threshold_opt_tokens", "Threshold the solver proposes on live profiles"
        )
        self.offload_share = gauge("prfaas_offload_share", "Share of recent requests offloaded")
        self.egress_estimate_gbps = gauge(
            "prfaas_egress_estimate_gbps", "PrfaaS relay egress over the last control period"
        )
        self.link_estimate_gbps = gauge(
            "prfaas_link_estimate_gbps",
            "Live PrfaaS link capacity estimate (relay link-bound rate; provisioned when idle)",
        )
        self.threshold_min_tokens = gauge(
            "prfaas_threshold_min_tokens",
            "Floor t_min of the threshold: least t the live link estimate can carry",
        )
        self.controller_decisions = Counter(
            "prfaas_controller_decisions",
            "Control ticks, by the controller's reason",
            ["reason"],
            registry=registry,
        )
        self.rebalance_actions = Counter(
            "prfaas_rebalance_actions", "Rebalancer actions", ["action"], registry=registry
        )
        self.role_conversions = Counter(
            "prfaas_role_conversions", "Worker role conversions, by new role", ["role"],
            registry=registry,
        )  # fmt: skip

    def _init_replicas(self, registry: CollectorRegistry) -> None:
        self.is_leader = Gauge(
            "prfaas_router_is_leader",
            "1 while this router replica is the leader (runs the threshold and role conversions)",
            registry=registry,
        )
        self.elections = Counter(
            "prfaas_router_elections",
            "Leader campaigns this replica ran (the leader key was free), by result",
            ["result"],
            registry=registry,
        )
        self.slot_refusals = Counter(
            "prfaas_decode_slot_refusals",
            "Decode slots a worker refused this router (full, draining, not decode); the request "
            "went to another decode node or was answered UNAVAILABLE",
            ["worker"],
            registry=registry,
        )
        self.leader_step_downs = Counter(
            "prfaas_router_leader_step_downs",
            "Times this replica stopped leading, by reason (resigned, lease_not_renewed, ...)",
            ["reason"],
            registry=registry,
        )

    def record_slot_refusal(self, worker: str) -> None:
        self.slot_refusals.labels(worker=worker).inc()

    def set_leader(self, is_leader: bool) -> None:
        self.is_leader.set(1 if is_leader else 0)

    def record_election(self, result: str) -> None:
        self.elections.labels(result=result).inc()

    def record_step_down(self, reason: str) -> None:
        self.leader_step_downs.labels(reason=reason).inc()

    def set_control(
        self,
        threshold: float,
        t_opt: float,
        share: float,
        egress_gbps: float,
        link_gbps: float,
        t_min: float | None = None,
    ) -> None:
        """The control loop's state after one tick."""
        if t_min is not None:
            self.threshold_min_tokens.set(t_min)
        self.threshold_tokens.set(threshold)
        self.threshold_opt_tokens.set(t_opt)
        self.offload_share.set(share)
        self.egress_estimate_gbps.set(egress_gbps)
        self.link_estimate_gbps.set(link_gbps)

    def record_control_decision(self, reason: str) -> None:
        self.controller_decisions.labels(reason=reason).inc()

    def record_rebalance(self, action: str) -> None:
        self.rebalance_actions.labels(action=action).inc()

    def record_role_conversion(self, role: str) -> None:
        self.role_conversions.labels(role=role).inc()

    def record_frontdoor(self, model: str, rpc: str, status: str) -> None:
        _child(self._frontdoor_children, self.frontdoor_requests, model, rpc, status).inc()

    def record_request(self, route: str, status: str) -> None:
        _child(self._request_children, self.requests, route, status).inc()

    def observe_latency(self, model: str, ttft_s: float | None, tpot_s: float | None) -> None:
        """Record a request's TTFT and TPOT; ``None`` skips one (no token, or only one)."""
        if ttft_s is not None:
            _child(self._ttft_children, self.ttft, model).observe(ttft_s)
        if tpot_s is not None:
            _child(self._tpot_children, self.tpot, model).observe(tpot_s)

    def record_relay_outcome(self, outcome: str) -> None:
        self.relay_outcomes.labels(outcome=outcome).inc()

    def record_cache_move(self, outcome: str, num_tokens: int = 0) -> None:
        self.cache_moves.labels(outcome=outcome).inc()
        self.cache_moved_tokens.inc(num_tokens)

    def record_relay_prefix(self, outcome: str, bytes_saved: int = 0) -> None:
        """A pinned-prefix relay ended: ``pinned`` (its decode used the prefix, ``bytes_saved``
        not sent) or ``fallback``."""
        self.relay_prefix.labels(outcome=outcome).inc()
        self.relay_bytes_saved.inc(bytes_saved)

    def add_relay_bytes(self, link: str, num_bytes: int, goodput_gbps: float | None = None) -> None:
        self.relay_bytes.labels(link=link).inc(num_bytes)
        if goodput_gbps is not None:
            self.relay_goodput_gbps.labels(link=link).set(goodput_gbps)

    def set_worker_load(self, worker: str, queue_depth: int, free_decode_slots: int) -> None:
        children = self._load_children.get((worker,))
        if children is None:
            children = self._load_children[(worker,)] = (
                self.queue_depth.labels(worker=worker),
                self.free_decode_slots.labels(worker=worker),
            )
        children[0].set(queue_depth)
        children[1].set(free_decode_slots)

    def record_worker_up(self, worker: str, is_up: bool) -> None:
        """A worker joined or rejoined (``is_up``), or its connection died (counted)."""
        self.worker_up.labels(worker=worker).set(1 if is_up else 0)
        if not is_up:
            self.workers_lost.labels(worker=worker).inc()

    def forget_worker(self, worker: str) -> None:
        """A worker left the membership: drop its gauges (its last queue depth, free slots and
        relay goodput would otherwise be scraped forever); its counters keep their totals."""
        if self._load_children.pop((worker,), None) is not None:
            self.queue_depth.remove(worker)
            self.free_decode_slots.remove(worker)
        with contextlib.suppress(KeyError):
            self.relay_goodput_gbps.remove(worker)
        with contextlib.suppress(KeyError):
            self.worker_up.remove(worker)
        for gauge in (
            self.worker_prefix_hit_rate,
            self.worker_prefix_reused_tokens,
            self.worker_prefix_cached_blocks,
            self.worker_prefix_evictions,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(worker)


class DiscoveryMetrics:
    """Membership as one router sees it (``router/discovered.py``); thread-safe."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "prfaas_discovery_connected",
            "1 while the membership watch is live; 0 while serving the last membership seen",
            registry=registry,
        )
        self.workers = Gauge(
            "prfaas_discovery_workers", "Registered workers this router knows", registry=registry
        )
        self.bad_records = Counter(
            "prfaas_discovery_bad_records",
            "Worker registrations ignored because they could not be decoded or checked",
            registry=registry,
        )


class MetricsServer:
    """Serves ``registry`` at ``http://host:port/metrics`` from a background thread.

    ``port=0`` binds a free port; ``self.port`` is the real one. Starts in ``__init__``.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        port: int = DEFAULT_METRICS_PORT,
        host: str = "127.0.0.1",
    ) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = self._server.server_port
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout_s)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
