"""The disaggregated orchestrator: route, reserve a decode slot, prefill, relay, decode.

For each request: ``policy.route`` (pure) picks the cluster by the threshold ``t`` and the
cache-affine, least-loaded prefill node, and the decode node; the router reserves a slot on the
decode node (the worker grants or refuses it: it is the authority on its slots, which router
replicas share; a refusal is tried on the next best decode node, then answered UNAVAILABLE;
``_reserve_decode``), then runs the handoff TensorRT-LLM's own disaggregated serving uses, prompt
plus first token: the prefill worker runs the whole prompt (L tokens, ``max_tokens=1``), relays its
KV layer by layer to the decode node and returns t1, which is streamed to the client at once; the
decode worker then gets the prompt followed by t1 with ``max_tokens - 1`` (and one sampling draw
skipped, so seeded sampling continues exactly as one engine would), claims the L relayed tokens and
computes from t1. The output is t1 spliced before the decode's tokens; t1 = EOS or
``max_tokens == 1`` ends the request at t1 (``max_tokens == 1`` relays nothing).

Prefix caches (issue 15): the prompt is hashed once; the decode slot's ``Reserve`` names the
prefix the index says that node holds, the worker pins it and the prefill relays only what lies
beyond (``router/flight.py``); a ``cache_move`` decided under abundant bandwidth is carried out
before the prefill (``router/cache_move.py``: the source node relays the prefix into the chosen
prefill node's cache).

The threshold is live state: a :class:`~trtllm_prfaas.router.control.ControlLoop` on the same
event loop (started with the orchestrator when ``RouterConfig.control`` is set, the default)
moves it every second from what the router observes; ``threshold_tokens`` is its initial value.
``convert_role`` drains a local PD worker, switches its role (``SetRole``) and rejoins it.

Every request has a deadline; a cancelled or late request is cancelled on both workers. If the
prefill leg fails or returns no t1 within ``prefill_timeout_s``, the decode worker runs the whole
request itself, and if the relay fails after t1 the decode worker computes the prompt (its
``fallback`` policy), so the client still gets its tokens, or a clear error, never a hang.

A worker whose connection dies is lost within ``worker_lost_s`` (``router/links.py``: ZMTP
heartbeats and a socket monitor): it leaves routing at once, a request that lost its prefill
worker is computed on its decode node, and one that lost its decode node is routed again
(``rerouted``, at most ``_MAX_REROUTES`` times) if the client has no token yet, else fails with
``WorkerLost`` (UNAVAILABLE at the front door). Its decode-slot reservation is released and
both workers get ``Cancel`` either way. A lost worker that answers ``Ping`` again rejoins.

Module map: this module routes, reserves and composes; ``router/links.py`` owns the sockets (one
plain ZeroMQ DEALER per worker, ``NOBLOCK`` sends, a drain-all reader callback per socket) and
delivers worker messages; ``router/flight.py`` runs one request's handoff over them,
``router/cache_move.py`` a cache move. Workers
are the static list (``RouterConfig.workers``, connected in ``start``) and, with
``--discovery``, those ``add_worker``/``remove_worker`` bring and take at run time
(``router/discovered.py`` follows the membership store).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace

from trtllm_prfaas import errors
from trtllm_prfaas.engines.tokenizer import eos_id_of, load_tokenizer
from trtllm_prfaas.errors import (
    InvalidRequestError,
    PrfaasError,
    TransferTimeout,
    TransportError,
    WorkerLost,
)
from trtllm_prfaas.policy.placement import Cluster, choose_decode_node, choose_prefill_node
from trtllm_prfaas.policy.route import RequestView, RouteDecision, route
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator, TokenChunk
from trtllm_prfaas.router.cache_move import PrefixMover
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.control import ControlConfig, ControlLoop, RouteRecord
from trtllm_prfaas.router.flight import Flight, Handoff
from trtllm_prfaas.router.links import WorkerLinks
from trtllm_prfaas.router.prefix_tracker import PrefixTracker
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.transport import RelaySecurity
from trtllm_prfaas.worker import protocol as p

__all__ = ["DisaggregatedOrchestrator", "RouterConfig", "WorkerSpec"]

log = get_logger(__name__)

_NO_LIMIT_YET = 2**31 - 1  # max_seq_len while no worker has joined
_MAX_REROUTES = 2  # a request whose decode node died before its first token is routed again
_INDEX_EXPORT_S = 1.0  # the prefix index's size gauges: O(workers) each, so at most this often
_RESERVE_SLACK_S = 10.0  # a decode slot's unused TTL beyond prefill_timeout_s (see _reserve_decode)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    endpoint: str  # the worker's control endpoint
    is_prfaas: bool  # member of a PrfaaS (remote prefill) cluster


@dataclass(frozen=True)
class RouterConfig:
    workers: tuple[WorkerSpec, ...]
    model_name: str = "tensorrt_llm"
    threshold_tokens: int = 1024  # initial t: l > t prefills in the PrfaaS cluster
    announce_timeout_s: float = 30.0  # decode waits this long for the transfer to be announced
    prefill_timeout_s: float = 120.0  # no t1 by then: the decode node runs the whole request
    worker_silence_s: float = 10.0  # a prefill worker silent this long (no report) is given up
    # A worker whose connection died is lost (out of routing, its requests ended) within this:
    # a killed process at once (its kernel closes the TCP connection), a host that stopped
    # answering after ZMTP heartbeats every worker_lost_s / 3 went unanswered for the rest.
    # 3 s: well under any request deadline and the 30 s stale rule, yet 15x a cross-DC RTT
    # (~0.2 s), and heartbeats are answered by libzmq's I/O thread, not the engine loop, so a
    # long engine step never looks like a death.
    worker_lost_s: float = 3.0
    connect_timeout_s: float = 30.0
    control: ControlConfig | None = field(default_factory=ControlConfig)  # None: t stays fixed
    # The served model's Hugging Face directory (tokenizer.json, tokenizer_config.json): prompts
    # are tokenized, routed and detokenized with its tokenizer. "": the reference engine's bytes.
    tokenizer_dir: str = ""
    # The control sockets to workers: Curve (the router's key pair and the workers' control
    # public key, config.load_control_security) or, when None, plaintext with a warning.
    control_security: RelaySecurity | None = None
    # False: route cache-blind, as if no node held any prefix (the index still follows the
    # workers' events and their caches stay on); bench/prefix.py compares the two.
    prefix_routing: bool = True


class DisaggregatedOrchestrator(Orchestrator):
    """Talks to workers over their control endpoints; implements the Orchestrator contract."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.cluster = ClusterState(prefix=PrefixTracker(is_blind=not config.prefix_routing))
        self.tokenizer = load_tokenizer(config.tokenizer_dir)
        self.decisions: list[RouteDecision] = []  # recent decisions (for tests and parity)
        # The inputs of each recent decision (replay, parity). 1000, not more: each record holds
        # a cluster snapshot (~10 objects a node), and every object here is walked by each full
        # garbage collection, which pauses the router's loop (10K records: ~100K objects, pauses
        # of 13-50 ms measured with bench/router.py, the doors' p99 tail).
        self.route_log: deque[RouteRecord] = deque(maxlen=1_000)
        self.control = ControlLoop(
            config.control or ControlConfig(),
            self.cluster,
            float(config.threshold_tokens),
            metrics,
            converter=self.convert_role,
        )
        self.counters: dict[str, int] = {
            "remote": 0,
            "local": 0,
            "prefill_fallback": 0,
            "relay_recomputed": 0,
            "rerouted": 0,
            "slot_refused": 0,  # decode slots a worker refused (another node was asked)
            "cache_move_skipped": 0,  # abundant-bandwidth moves decided but not tried (item 5)
            "cache_move_done": 0,  # ... moved (the target prefill reuses the moved prefix)
            "cache_move_failed": 0,  # ... tried and failed (the target computed what it lacks)
            "relay_pinned": 0,  # decode slots granted with a pinned prefix (relay [D, L))
            "relay_pin_fallback": 0,  # ... whose decode computed the prompt itself after all
        }
        self._links = WorkerLinks(
            self.cluster,
            metrics,
            worker_lost_s=config.worker_lost_s,
            security=config.control_security,
        )
        self._handoff = Handoff(
            links=self._links,
            control=self.control,
            counters=self.counters,
            metrics=metrics,
            eos_id=eos_id_of(self.tokenizer),  # t1 == EOS ends the request at t1
            tokenizer=self.tokenizer,
            announce_timeout_s=config.announce_timeout_s,
            prefill_timeout_s=config.prefill_timeout_s,
            worker_silence_s=config.worker_silence_s,
        )
        self._mover = PrefixMover(
            links=self._links,
            counters=self.counters,
            metrics=metrics,
            announce_timeout_s=config.announce_timeout_s,
            timeout_s=config.prefill_timeout_s,
        )
        self._max_seq_len = 0
        self._ready = False
        self._next_index_export = 0.0  # monotonic s: the prefix index's gauges, at most 1/s

    # ------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect to every listed worker and learn its role; raises TransportError if one is
        silent. The list may be empty when workers are discovered (``add_worker``): the router
        then answers UNAVAILABLE until one has joined."""
        for spec in self.config.workers:
            self._links.connect(spec.name, spec.endpoint)
            info = await self._await_info(spec)
            self._join(spec, info)
        self._update_max_seq_len()
        if self.config.control is not None:
            self.control.start()
        self._ready = True
        log.info("router_ready", workers=sorted(self.cluster.workers))

    async def add_worker(self, spec: WorkerSpec) -> p.WorkerInfo:
        """Connect to a worker that joined (it registered) and route to it once it answered
        ``Ping``; returns its ``WorkerInfo``. Raises ``TransportError`` if it does not answer
        within ``connect_timeout_s`` (its socket is closed again), ``ConfigError`` if a worker
        of that name is known already."""
        if spec.name in self.cluster.workers:
            raise errors.ConfigError(f"worker {spec.name} is known already")
        self._links.connect(spec.name, spec.endpoint)
        try:
            info = await self._await_info(spec)
        except BaseException:
            self._links.disconnect(spec.name)
            raise
        self._join(spec, info)
        self._update_max_seq_len()
        log.info("worker_added", worker=spec.name, endpoint=spec.endpoint, role=info.role,
                 prfaas=spec.is_prfaas, relay=info.relay_endpoint)  # fmt: skip
        return info

    async def remove_worker(self, name: str, why: str = "it left the membership") -> bool:
        """Stop routing to worker ``name`` and close its socket (it deregistered, or its lease
        expired). Requests in flight on it end as on a lost worker: prefill legs fall back to
        their decode node, decode legs are routed again before their first token, else fail
        UNAVAILABLE. False if the worker was unknown."""
        if name not in self.cluster.workers:
            return False
        self._links.on_lost(name, why)
        self._links.disconnect(name)
        self.cluster.remove(name)
        self._update_max_seq_len()
        if self.metrics is not None:
            self.metrics.forget_worker(name)
        log.info("worker_removed", worker=name, why=why, workers=sorted(self.cluster.workers))
        return True

    def _update_max_seq_len(self) -> None:
        workers = self.cluster.workers.values()
        self._max_seq_len = min((w.info.max_seq_len for w in workers), default=0)

    def _join(self, spec: WorkerSpec, info: p.WorkerInfo) -> None:
        self.cluster.add(WorkerState(spec.name, spec.endpoint, info, spec.is_prfaas))
        if self.metrics is not None:
            self.metrics.record_worker_up(spec.name, True)

    async def _await_info(self, spec: WorkerSpec) -> p.WorkerInfo:
        """Ping the worker and wait for its ``WorkerInfo`` (delivered by the links)."""
        future: asyncio.Future[p.WorkerInfo] = asyncio.get_running_loop().create_future()
        self._links.info_waiters[spec.name] = future
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await self._links.send(spec.name, p.Ping())
                return await future
        except TimeoutError:
            raise TransportError(f"worker {spec.name} at {spec.endpoint} did not answer") from None
        finally:
            self._links.info_waiters.pop(spec.name, None)

    async def close(self) -> None:
        self._ready = False
        await self.control.stop()
        self._links.close()

    async def convert_role(self, name: str, role: str, timeout_s: float = 120.0) -> p.WorkerInfo:
        """Drain local PD worker ``name``, switch it to ``role`` and rejoin it; returns its new
        ``WorkerInfo``. No new request goes to it meanwhile; its in-flight requests finish (the
        worker aborts those still running after ``timeout_s``). Raises ``TransportError`` if
        the worker does not come back in ``timeout_s`` + 10 s (it stays drained then), or came
        back in its old role (it could not build the new one, e.g. no relay receiver keys)."""
        worker = self.cluster.workers[name]
        if worker.is_prfaas:
            raise errors.ConfigError(f"{name} is a PrfaaS worker: only PD workers change role")
        future: asyncio.Future[p.WorkerInfo] = asyncio.get_running_loop().create_future()
        self._links.info_waiters[name] = future
        worker.is_draining = True
        log.info("role_change_started", worker=name, role=role)
        try:
            await self._links.send(name, p.SetRole(role, drain_timeout_s=timeout_s))
            async with asyncio.timeout(timeout_s + 10.0):
                info = await future
        except TimeoutError as exc:
            raise TransportError(f"worker {name} did not rejoin as {role}") from exc
        finally:
            self._links.info_waiters.pop(name, None)
        self.cluster.on_info(name, info)
        worker.is_draining = False
        if info.role != role:
            raise TransportError(f"worker {name} stayed {info.role}: it could not become {role}")
        if self.metrics is not None:
            self.metrics.record_role_conversion(role)
        log.info("role_change_done", worker=name, role=role, relay=info.relay_endpoint)
        return info

    # ----------------------------------------------------------------------- Orchestrator
    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def max_seq_len(self) -> int:
        """The shortest of the workers' limits. Before any worker joined (discovery) no limit
        is known: no length is refused here, and ``generate`` answers UNAVAILABLE instead."""
        return self._max_seq_len if self.cluster.workers else _NO_LIMIT_YET

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def is_ready(self) -> bool:
        """Started, with at least one worker (a discovering router may have none yet)."""
        return self._ready and bool(self.cluster.workers)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        self._validate(request)
        started, attempt = time.monotonic(), request
        for num_reroutes in range(_MAX_REROUTES + 1):
            has_tokens = False
            try:
                async for chunk in self._generate_once(attempt):
                    has_tokens = True
                    yield chunk
                return
            except WorkerLost as exc:
                if has_tokens or num_reroutes == _MAX_REROUTES:
                    raise
                attempt = self._reroute(request, started, num_reroutes + 1, exc)

    def _reroute(
        self, request: GenerateRequest, started: float, num: int, exc: WorkerLost
    ) -> GenerateRequest:
        """The request again, under the id ``<id>~<num>`` with what is left of its deadline
        (its decode node died before the client got a token)."""
        remaining_s = request.deadline_s - (time.monotonic() - started)
        if remaining_s <= 0:
            raise TransferTimeout(f"request {request.request_id} missed its deadline") from exc
        self.counters["rerouted"] += 1
        log.warning("rerouted", request_id=request.request_id, why=str(exc))
        return replace(request, request_id=f"{request.request_id}~{num}", deadline_s=remaining_s)

    async def _generate_once(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        """One routing of ``request``: reserve, hand off, release (see the module doc)."""
        hashes = self.cluster.prefix.hashes_for(request.prompt_token_ids)  # once per request
        decision = self._route(request, hashes)
        prefill = self.cluster.workers[decision.prefill_node_id]
        rid = request.request_id
        flight = self._links.flights[rid] = Flight(decision, len(request.prompt_token_ids))
        flight.prefix_hashes = hashes
        flight.reservation_id = reservation = f"{rid}~slot"
        self._links.flights[reservation] = flight
        decode: WorkerState | None = None
        finished, status = False, "cancelled"
        # The node's prefill load as the router sees it (``WorkerState.view``): the leg's work
        # counts from now until its t1; a leg that found the node idle (and moved no prefix
        # first) measures the node's seconds per token.
        computed = decision.incremental_tokens
        is_sample = self.cluster.on_prefill_sent(prefill, computed) and decision.cache_move is None
        is_prefilling = True
        try:
            async with asyncio.timeout(request.deadline_s):
                flight.submitted_at = time.monotonic()
                if decision.cache_move is not None:
                    await self._move_prefix(request, flight)
                decode = await self._reserve_decode(request, flight)
                decode.reserved_slots += 1  # a routing hint until its next load report
                async for chunk in self._handoff.run(request, flight, decode, prefill):
                    if is_prefilling:  # t1 came: the prefill leg's work is done
                        is_prefilling = False
                        leg_s = _leg_s(flight) if is_sample else None
                        self.cluster.on_prefill_done(prefill, computed, leg_s)
                    finished = chunk.is_final
                    status = "ok" if finished else status
                    yield chunk
        except TimeoutError as exc:
            status = "TransferTimeout"
            message = f"request {rid} missed its {request.deadline_s}s deadline"
            raise TransferTimeout(message) from exc
        except PrfaasError as exc:
            status = type(exc).__name__
            raise
        finally:
            if is_prefilling:
                self.cluster.on_prefill_done(prefill, computed, None)
            if decode is not None:
                decode.reserved_slots -= 1
            for leg_id in (rid, reservation, *flight.leg_ids):
                self._links.flights.pop(leg_id, None)
            if self.metrics is not None:
                self.metrics.record_request("remote" if decision.is_remote else "local", status)
            decode_name = flight.decision.decode_node_id or ""
            if not finished:  # cancelled, failed or late: free both workers' blocks
                for leg_id in (rid, *flight.leg_ids):
                    await self._links.cancel(leg_id, decode_name, prefill.name)
            if decode is not None:  # free the slot (a no-op if the decode leg finished there)
                await self._links.cancel(reservation, decode_name)

    async def _reserve_decode(self, request: GenerateRequest, flight: Flight) -> WorkerState:
        """A decode slot granted by the decode worker itself (the authority, as other router
        replicas reserve there too): the routed decode node first, then the next best live ones
        (``choose_decode_node``); ``AdmissionRejected`` (UNAVAILABLE) when every one refused."""
        tried: list[str] = []
        why = ""
        # Unused, the slot is freed after the decode leg would have come at the latest (no t1
        # by prefill_timeout_s sends the whole request there), so a router that dies in
        # between leaves no slot held for long; a late leg takes a free slot if there is one.
        ttl_s = min(request.deadline_s, self.config.prefill_timeout_s + _RESERVE_SLACK_S)
        while True:
            name = flight.decision.decode_node_id or ""
            decode = self.cluster.workers.get(name)
            if decode is not None and not decode.is_lost:
                num_blocks = self._held_prefix_blocks(flight, decode)
                refusal = await self._handoff.reserve(flight, decode, ttl_s, num_blocks)
                if refusal is None:
                    return decode
                why = refusal
                self.counters["slot_refused"] += 1
                if self.metrics is not None:
                    self.metrics.record_slot_refusal(name)
                log.info("decode_slot_refused", request_id=request.request_id, decode=name,
                         why=refusal)  # fmt: skip
                assert flight.reservation_id is not None
                await self._links.cancel(flight.reservation_id, name)  # a late grant is freed
            tried.append(name)
            flight.forget(name)
            view = self.cluster.view(time.monotonic()).pd_decode
            node = choose_decode_node(n for n in view if n.node_id not in tried)
            if node is None:
                raise errors.AdmissionRejected(
                    f"no decode slot for request {request.request_id}: "
                    f"{', '.join(tried)} refused ({why or 'lost'})"
                )
            flight.decision = replace(flight.decision, decode_node_id=node.node_id)

    async def _move_prefix(self, request: GenerateRequest, flight: Flight) -> None:
        """The routed ``cache_move``: the source cluster's node holding the prefix (the one
        ``route`` weighed) moves it into the chosen prefill node (``router/cache_move.py``).
        Skipped (counted, logged) when no source node holds a prefix or the target takes no
        moves (no relay receiver in its ``WorkerInfo``)."""
        move, prompt = flight.decision.cache_move, request.prompt_token_ids
        assert move is not None
        target = self.cluster.workers[flight.decision.prefill_node_id]
        view = self.cluster.view(time.monotonic(), flight.prefix_hashes)
        nodes = view.prfaas if move.source is Cluster.PRFAAS else view.pd_prefill
        node = choose_prefill_node(nodes, len(prompt))
        source = self.cluster.workers.get(node.node_id) if node is not None else None
        num_tokens = node.prefix_tokens if node is not None else 0
        why = ""
        if source is None or num_tokens <= 0 or source is target:
            why = "no other node holds the prefix now"
        elif not target.info.relay_endpoint:
            why = f"{target.name} accepts no cache moves (no relay receiver)"
        if why:
            self.counters["cache_move_skipped"] += 1
            log.info("cache_move_skipped", request_id=request.request_id, why=why,
                     tokens=move.tokens, source=move.source.value)  # fmt: skip
            return
        assert source is not None
        left_s = request.deadline_s - (time.monotonic() - flight.submitted_at)
        await self._mover.move(
            request.request_id, prompt, flight, source, target, num_tokens, max(left_s, 0.001)
        )

    def _held_prefix_blocks(self, flight: Flight, decode: WorkerState) -> int:
        """How many of the prompt's blocks the index says ``decode`` holds: its slot is asked
        to pin them, and the prefill then relays only what lies beyond (issue 15 item 4)."""
        tpb = decode.info.tokens_per_block
        if not flight.prefix_hashes or not tpb:
            return 0
        held = self.cluster.prefix.prefix_tokens(
            decode.name, flight.prefix_hashes, time.monotonic()
        )
        return held // tpb

    def _validate(self, request: GenerateRequest) -> None:
        if not self.is_ready():
            why = "no worker has joined yet" if self._ready else "router is not ready"
            raise errors.AdmissionRejected(why)
        total = len(request.prompt_token_ids) + request.max_tokens
        if total > self._max_seq_len:
            raise InvalidRequestError(
                f"prompt of {len(request.prompt_token_ids)} tokens + max_tokens "
                f"{request.max_tokens} exceeds the max sequence length {self._max_seq_len}"
            )

    def _route(self, request: GenerateRequest, hashes: list[int]) -> RouteDecision:
        now = time.monotonic()
        view = RequestView(request.request_id, len(request.prompt_token_ids))
        state, snapshot = self.control.policy, self.cluster.view(now, hashes)
        decision = route(view, snapshot, state, now)
        if decision.decode_node_id is None:
            raise errors.AdmissionRejected("no decode node is available")
        self._note_prefix(decision, hashes, now)
        self.route_log.append(RouteRecord(now, view, snapshot, state, decision))
        # The controller's workload is the work prefill does: the incremental (uncached) length,
        # which is also what routing compares with t (PAPER.md); without caches, the prompt.
        self.control.on_routed(decision, decision.incremental_tokens, request.max_tokens)
        self.counters["remote" if decision.is_remote else "local"] += 1
        self.decisions.append(decision)
        del self.decisions[:-1000]
        log.info(
            "routed",
            request_id=request.request_id,
            remote=decision.is_remote,
            prefill=decision.prefill_node_id,
            decode=decision.decode_node_id,
            tokens=len(request.prompt_token_ids),
            prefix=decision.prefix_tokens,
            threshold=decision.threshold_tokens,
        )
        return decision

    def _note_prefix(self, decision: RouteDecision, hashes: list[int], now: float) -> None:
        """After a decision: approximate nodes remember the prompt (both legs cache it), and
        the metrics count the prefix reused (a ``cache_move``'s is counted by the move)."""
        prefix = self.cluster.prefix
        names = (decision.prefill_node_id, decision.decode_node_id or "")
        prefix.record_routed(names, hashes, now)
        if self.metrics is None:
            return
        route_name = "remote" if decision.is_remote else "local"
        prompt = decision.incremental_tokens + decision.prefix_tokens
        own = prompt - decision.incremental_tokens if decision.cache_move is None else 0
        is_approximate = prefix.is_approximate(decision.prefill_node_id)
        self.metrics.record_routed_prefix(route_name, prompt, own, is_approximate)
        if now < self._next_index_export:
            return
        self._next_index_export = now + _INDEX_EXPORT_S
        stats = prefix.stats()
        if stats is not None:
            approximate = {name for name in stats.blocks_per_node if prefix.is_approximate(name)}
            counts = {
                "events": stats.num_events,
                "resyncs": stats.num_resyncs,
                "snapshots": stats.num_snapshots,
                "lookups": stats.num_lookups,
                "approximate_lookups": stats.num_approximate_lookups,
                "unreachable_blocks": stats.num_unreachable_blocks,
                "expired_blocks": stats.num_expired_blocks,
            }
            self.metrics.set_prefix_index(stats.blocks_per_node, approximate, counts)


def _leg_s(flight: Flight) -> float | None:
    """Seconds from sending the prefill leg to its t1; None if t1 did not come from it (the
    decode node computed the prompt after the prefill leg failed)."""
    if flight.prefill_first_at is None:
        return None
    return flight.prefill_first_at - flight.submitted_at
