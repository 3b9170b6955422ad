"""Mutable resource pools of the discrete-event simulator (not policy: simulation state only).

Service times are known at dispatch (prefill latency of the routed length), so a FIFO node's
start time is ``max(now, free_at)`` and the least-loaded node is the top of a heap keyed by
``free_at``: O(log n) per request for any number of nodes. Heap entries go stale when a node is
updated out of heap order (a cache-affine pick) or leaves the pool; stale entries are skipped.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

__all__ = ["DecodeSlots", "PrefillPool", "StageCounters"]


@dataclass
class StageCounters:
    """Per-period accumulators read by the controllers, and a heap of future start times from
    which the number of requests still waiting at ``now`` is counted."""

    busy_s: float = 0.0  # service seconds dispatched this period (offered load)
    waiting_starts: list[float] = field(default_factory=list)

    def add(self, now_s: float, start_s: float, service_s: float) -> None:
        """Record one dispatch."""
        self.busy_s += service_s
        if start_s > now_s:
            heapq.heappush(self.waiting_starts, start_s)

    def waiting(self, now_s: float) -> int:
        """Requests dispatched but not yet started at ``now_s``."""
        heap = self.waiting_starts
        while heap and heap[0] <= now_s:
            heapq.heappop(heap)
        return len(heap)

    def take_busy_s(self) -> float:
        """Service seconds since the last call (resets the accumulator)."""
        busy, self.busy_s = self.busy_s, 0.0
        return busy


class PrefillPool:
    """Prefill nodes with per-node FIFO queues; ``free_at[k]`` is when node ``k`` is idle."""

    def __init__(self, prefix: str, num_nodes: int) -> None:
        self.prefix = prefix
        self.node_ids: list[str] = []
        self.free_at: list[float] = []
        self.is_member: list[bool] = []
        self._heap: list[tuple[float, int]] = []
        self.counters = StageCounters()
        for _ in range(num_nodes):
            self.add_node(0.0)

    @property
    def num_active(self) -> int:
        """Nodes that take new work."""
        return sum(self.is_member)

    def add_node(self, ready_s: float) -> int:
        """A new (or converted) node, idle from ``ready_s``; returns its index."""
        k = len(self.node_ids)
        self.node_ids.append(f"{self.prefix}-{k}")
        self.free_at.append(ready_s)
        self.is_member.append(True)
        heapq.heappush(self._heap, (ready_s, k))
        return k

    def least_loaded(self) -> int | None:
        """Index of the member node that frees first (``None`` if the pool is empty)."""
        heap = self._heap
        while heap:
            free, k = heap[0]
            if self.is_member[k] and free == self.free_at[k]:
                return k
            heapq.heappop(heap)
        return None

    def dispatch(self, k: int, now_s: float, ready_s: float, service_s: float) -> float:
        """Queue ``service_s`` of work on node ``k`` (not before ``ready_s``); returns its start."""
        start = max(now_s, ready_s, self.free_at[k])
        self.free_at[k] = start + service_s
        heapq.heappush(self._heap, (start + service_s, k))
        self.counters.add(now_s, start, service_s)
        return start

    def remove(self, k: int) -> float:
        """Stop giving node ``k`` work; returns when it will have drained."""
        self.is_member[k] = False
        return self.free_at[k]


class DecodeSlots:
    """The PD-D tier as one FCFS pool of slots (``slots_per_node`` per node)."""

    def __init__(self, num_nodes: int, slots_per_node: int) -> None:
        self.slots_per_node = slots_per_node
        self.is_member: list[bool] = []
        self.busy_until: list[float] = []
        self._heap: list[tuple[float, int]] = []
        self.counters = StageCounters()
        for _ in range(num_nodes):
            self.add_node(0.0)

    @property
    def num_active(self) -> int:
        """Nodes that admit new requests."""
        return sum(self.is_member)

    def add_node(self, ready_s: float) -> int:
        """A node whose slots are free from ``ready_s``; returns its index."""
        k = len(self.is_member)
        self.is_member.append(True)
        self.busy_until.append(ready_s)
        for _ in range(self.slots_per_node):
            heapq.heappush(self._heap, (ready_s, k))
        return k

    def admit(self, now_s: float, hold_s: float) -> float:
        """Take the earliest free slot of a member node for ``hold_s``; returns the start."""
        heap = self._heap
        while not self.is_member[heap[0][1]]:
            heapq.heappop(heap)  # slots of a removed node vanish as they come up
        free, k = heap[0]
        start = max(now_s, free)
        heapq.heapreplace(heap, (start + hold_s, k))
        self.busy_until[k] = max(self.busy_until[k], start + hold_s)
        self.counters.add(now_s, start, hold_s)
        return start

    def remove(self, k: int) -> float:
        """Stop admitting on node ``k``; returns when its last request ends."""
        self.is_member[k] = False
        return self.busy_until[k]

    def drain_candidate(self) -> int:
        """The member node whose last request ends first (fastest drain)."""
        members = [k for k, m in enumerate(self.is_member) if m]
        return min(members, key=lambda k: (self.busy_until[k], k))
