"""The router's live view of its workers: who they are, how loaded, which slots are reserved.

Plain data updated from worker messages (``WorkerInfo``, ``LoadReport``), turned into the
``policy.route`` input (``ClusterView``) on demand. Decode slots the router has promised but the
worker has not yet reported as taken are subtracted, so bursts do not oversubscribe a node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from trtllm_prfaas.policy.placement import NodeView
from trtllm_prfaas.policy.route import ClusterView
from trtllm_prfaas.worker import protocol as p

__all__ = ["ClusterState", "WorkerState"]

# A worker that has not reported for this long is taken out of routing.
STALE_AFTER_S = 5.0


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

    @property
    def role(self) -> str:
        return self.info.role

    def view(self, prefix_tokens: int = 0) -> NodeView:
        report = self.report
        queue = report.queue_depth if report else 0
        free = (report.num_free_slots if report else self.info.max_num_seqs) - self.reserved_slots
        return NodeView(self.name, prefix_tokens, queue, 0.0, max(0, free), self.is_draining)

    def is_live(self, now: float) -> bool:
        return now - self.reported_at < STALE_AFTER_S


@dataclass
class ClusterState:
    workers: dict[str, WorkerState] = field(default_factory=dict)

    def add(self, worker: WorkerState) -> None:
        self.workers[worker.name] = worker

    def on_report(self, name: str, report: p.LoadReport) -> None:
        worker = self.workers.get(name)
        if worker is not None:
            worker.report, worker.reported_at = report, time.monotonic()

    def view(self, now: float) -> ClusterView:
        live = [w for w in self.workers.values() if w.is_live(now)]
        return ClusterView(
            prfaas=tuple(w.view() for w in live if w.is_prfaas and w.role == "prefill"),
            pd_prefill=tuple(w.view() for w in live if not w.is_prfaas and w.role == "prefill"),
            pd_decode=tuple(w.view() for w in live if not w.is_prfaas and w.role == "decode"),
        )

    def decode_capacity(self) -> int:
        return sum(w.view().free_decode_slots for w in self.workers.values() if w.role == "decode")
