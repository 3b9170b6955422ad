"""The router's live view of its workers: who they are, how loaded, which slots are reserved.

Plain data updated from worker messages (``WorkerInfo``, ``LoadReport``), turned into the
``policy.route`` input (``ClusterView``) on demand. A worker is *draining* when the router
decided so (a rebalancer drain, a role change under way) or its own report says so; draining
workers get no new requests. After a role change the worker's new ``WorkerInfo`` replaces the
old one (``on_info``), which moves it to its new pool. Decode slots the router has promised but the
worker has not yet reported as taken are subtracted, so bursts do not oversubscribe a node.

Liveness: a worker is *lost* from the moment its connection dies (``mark_lost``, called by
``router/links.py`` on a socket-monitor disconnect: the process was killed, or its host missed
the ZMTP heartbeats) until it answers a ``Ping`` again (``rejoin``, with its new ``WorkerInfo``);
a lost worker is out of routing. With ``--discovery`` workers also come and go as a whole
(``add``/``remove``, driven by ``router/discovered.py``). Load-report silence for
``STALE_AFTER_S`` is the last resort (a worker whose connection stays up but that reports
nothing: a wedged process).

Prefix caches: ``prefix`` (``router/prefix_tracker.py``) follows the workers that keep one,
with the same membership (a worker is followed from ``add``/``on_info``/``rejoin``, its view
empty, until ``remove``/``mark_lost``). ``view(now, hashes)`` gives each node the prefix of
this request it holds (``hashes``: the prompt's block hashes, ``prefix.hashes_for``, computed
once per request), so ``policy.route`` places it by its incremental length.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from trtllm_prfaas.policy.placement import NodeView
from trtllm_prfaas.policy.route import ClusterView
from trtllm_prfaas.router.prefix_tracker import PrefixTracker
from trtllm_prfaas.vocabulary import ROLE_NAMES, Role
from trtllm_prfaas.worker import protocol as p

__all__ = ["ClusterState", "WorkerState"]

# Last resort: a worker that has not reported for this long is taken out of routing. Workers
# report every 0.1 s between engine steps, but one long step (a 16K prefill on a busy host) can
# take seconds: only a silence this long means the worker is gone. A dead process or host is
# found in seconds from its connection instead (``is_lost``).
STALE_AFTER_S = 30.0
# EWMA weight of one idle-node prefill leg in a cluster's seconds-per-token estimate (a ~5-leg
# memory, as the control loop's estimators).
_SPT_ALPHA = 0.2
_MAX_EARLY_KV_EVENTS = 64  # messages kept from a worker between its WorkerInfo and its join


@dataclass
class WorkerState:
    name: str
    endpoint: str
    info: p.WorkerInfo
    is_prfaas: bool  # a member of a PrfaaS (remote prefill) cluster
    report: p.LoadReport | None = None
    reported_at: float = field(default_factory=time.monotonic)
    reserved_slots: int = 0
    is_draining: bool = False
    is_lost: bool = False  # its connection died; set and cleared by ClusterState
    # Live prefill load, kept by the router itself (load reports lag by up to 0.1 s and count
    # only requests the engine has not admitted): prompt tokens of the prefill legs it sent
    # here that have not produced their first token yet (``ClusterState.on_prefill_*``).
    prefill_tokens_in_flight: int = 0

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def draining(self) -> bool:
        """No new work: the router is draining it, or the worker reports a role change."""
        return self.is_draining or bool(self.report and self.report.is_draining)

    def is_idle(self) -> bool:
        """Nothing queued, running or promised (a drained node)."""
        r = self.report
        busy = r is not None and (r.queue_depth or r.num_running or r.num_pending_decodes)
        return not busy and self.reserved_slots == 0

    def view(self, prefix_tokens: int = 0, prefill_s_per_token: float = 0.0) -> NodeView:
        """This node for one request; ``prefill_s_per_token`` is its cluster's estimate (its
        backlog in seconds is the prompt tokens in flight here at that speed)."""
        report = self.report
        queue = report.queue_depth if report else 0
        free = (report.num_free_slots if report else self.info.max_num_seqs) - self.reserved_slots
        spt = prefill_s_per_token
        backlog_s = self.prefill_tokens_in_flight * spt
        return NodeView(
            self.name, prefix_tokens, queue, backlog_s, max(0, free), self.draining, spt
        )

    def is_live(self, now: float) -> bool:
        """Routable: connected, and reported within ``STALE_AFTER_S``."""
        return not self.is_lost and now - self.reported_at < STALE_AFTER_S


@dataclass
class ClusterState:
    workers: dict[str, WorkerState] = field(default_factory=dict)
    prefix: PrefixTracker = field(default_factory=PrefixTracker)
    # Seconds per computed prompt token of a prefill node, per cluster (True: PrfaaS), an EWMA
    # over legs that found their node idle; 0 until the first. One figure per cluster: its
    # instances are alike (the paper's homogeneous clusters), and per-node estimates would
    # let noise, not load or prefix, pick between two idle nodes.
    prefill_s_per_token: dict[bool, float] = field(default_factory=dict)
    # KvEvents from a worker that answered Ping but has not joined yet (its snapshot can come
    # in the same read as its WorkerInfo, before add_worker resumes): replayed by add()
    early_kv_events: dict[str, list[p.KvEvents]] = field(default_factory=dict)

    def on_prefill_sent(self, worker: WorkerState, tokens: int) -> bool:
        """A prefill leg computing ``tokens`` was sent to ``worker``; True if it had none open
        (so the leg's time measures the cluster's speed, not a queue)."""
        was_idle = worker.prefill_tokens_in_flight == 0
        worker.prefill_tokens_in_flight += tokens
        return was_idle

    def on_prefill_done(self, worker: WorkerState, tokens: int, seconds: float | None) -> None:
        """That leg produced its first token (or ended without one): ``seconds`` from sending
        it, given only for a leg that found the node idle, updates its cluster's estimate."""
        worker.prefill_tokens_in_flight = max(worker.prefill_tokens_in_flight - tokens, 0)
        if seconds is None or tokens <= 0:
            return
        sample, old = seconds / tokens, self.prefill_s_per_token.get(worker.is_prfaas, 0.0)
        new = sample if old == 0 else old + _SPT_ALPHA * (sample - old)
        self.prefill_s_per_token[worker.is_prfaas] = new

    def add(self, worker: WorkerState) -> None:
        self.workers[worker.name] = worker
        self.prefix.add(worker.name, worker.info)
        for message in self.early_kv_events.pop(worker.name, []):
            self.prefix.apply(worker.name, message)

    def remove(self, name: str) -> WorkerState | None:
        """Forget worker ``name`` (it deregistered, or its lease expired); None if unknown.
        Requests already holding its state finish against the detached object."""
        self.prefix.remove(name)
        self.early_kv_events.pop(name, None)
        return self.workers.pop(name, None)

    def on_kv_events(self, name: str, message: p.KvEvents) -> bool:
        """A worker's KV cache events: applied to its view; False if it is not followed. From a
        worker not joined yet, a snapshot and what follows it are kept for ``add`` (at most
        ``_MAX_EARLY_KV_EVENTS`` messages; past that all go, and its view starts empty)."""
        if name not in self.workers:
            early = self.early_kv_events.get(name)
            if message.snapshot is not None:
                self.early_kv_events[name] = [message]
            elif early is not None and len(early) < _MAX_EARLY_KV_EVENTS:
                early.append(message)
            elif early is not None:
                del self.early_kv_events[name]
            return False
        return self.prefix.apply(name, message)

    def on_report(self, name: str, report: p.LoadReport) -> None:
        worker = self.workers.get(name)
        if worker is not None:
            worker.report, worker.reported_at = report, time.monotonic()

    def on_info(self, name: str, info: p.WorkerInfo) -> None:
        """A worker announced itself again (after a role change): new role, new relay endpoint.
        Its last load report is dropped: it described the old role."""
        worker = self.workers.get(name)
        if worker is not None:
            worker.info, worker.report, worker.reported_at = info, None, time.monotonic()
            self.prefix.add(name, info)  # a new engine (role change, restart): its cache is empty

    def mark_lost(self, name: str) -> bool:
        """Take worker ``name`` out of routing (its connection died); its last load report is
        dropped. True if it was not lost already."""
        worker = self.workers.get(name)
        if worker is None or worker.is_lost:
            return False
        worker.is_lost, worker.report = True, None
        self.prefix.remove(name)
        return True

    def rejoin(self, name: str, info: p.WorkerInfo) -> bool:
        """A lost worker answered ``Ping`` again (reconnected, or restarted at its endpoint): it
        is routable in the role ``info`` names, unless the router is draining it (a drain or
        role change under way stays the rebalancer's to end). True if it was lost."""
        worker = self.workers.get(name)
        if worker is None or not worker.is_lost:
            return False
        self.on_info(name, info)
        worker.is_lost = False
        return True

    def view(self, now: float, hashes: Sequence[int] = ()) -> ClusterView:
        """Live workers by pool, in ``workers`` order (one pass: it runs once per request),
        each with the prefix of the prompt whose block ``hashes`` are given that it holds."""
        prfaas: list[NodeView] = []
        pd_prefill: list[NodeView] = []
        pd_decode: list[NodeView] = []
        for w in self.workers.values():
            if not w.is_live(now):
                continue
            role = w.info.role
            if role not in ROLE_NAMES or (role == Role.DECODE and w.is_prfaas):
                continue
            spt = self.prefill_s_per_token.get(w.is_prfaas, 0.0) if role == Role.PREFILL else 0.0
            node = w.view(self.prefix.prefix_tokens(w.name, hashes, now), spt)
            if role == Role.PREFILL:
                (prfaas if w.is_prfaas else pd_prefill).append(node)
            else:
                pd_decode.append(node)
        return ClusterView(tuple(prfaas), tuple(pd_prefill), tuple(pd_decode))

    def decode_capacity(self) -> int:
        decodes = [w for w in self.workers.values() if w.role == Role.DECODE and not w.is_lost]
        return sum(w.view().free_decode_slots for w in decodes)
