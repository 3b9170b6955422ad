"""Discovered workers: the router follows the membership store (``prfaas router --discovery``).

A watch on ``/<namespace>/workers/`` (``discovery/membership.py``) delivers every registration
and deregistration; events hop from the watch thread to the router's event loop, where the
wanted set (``name -> WorkerRecord``) is updated and, per worker, one reconcile task makes the
orchestrator agree with it: a new record is connected and routed to once the worker answers
``Ping`` (``add_worker``: within milliseconds of the put), a deleted one (deregistered at
SIGTERM, or its lease expired after a SIGKILL) leaves routing (``remove_worker``), a record whose
control endpoint changed (a restart elsewhere) is removed and added again. A worker that does
not answer is retried every ``retry_s`` while its record stands.

A record that cannot be decoded or checked (``discovery/records.py``) is ignored, logged
(``discovery_bad_record`` with the key and why) and counted (``prfaas_discovery_bad_records``);
one that reuses a name another key holds (a static ``--worker`` included) is ignored the same way.

When the store goes away the router keeps routing to the last membership it saw, logs
``discovery_disconnected`` and sets ``prfaas_discovery_connected`` to 0; workers that die
meanwhile still leave routing through their connections (``router/links.py``). When it is back
the watch lists again and delivers the difference, so workers that joined or left meanwhile are
found, and the gauge returns to 1.
"""

from __future__ import annotations

import asyncio

from trtllm_prfaas.discovery.membership import EventKind, MemberEvent, Membership, Watch
from trtllm_prfaas.discovery.membership import worker_prefix as prefix_of
from trtllm_prfaas.discovery.records import BadRecord, WorkerRecord, decode_record
from trtllm_prfaas.errors import ConfigError, TransportError
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, WorkerSpec
from trtllm_prfaas.tasks import cancel_and_wait
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import DiscoveryMetrics

__all__ = ["DiscoveredWorkers"]

log = get_logger(__name__)


class DiscoveredWorkers:
    """Keeps the orchestrator's workers equal to the registered ones; runs on its loop."""

    def __init__(
        self,
        orchestrator: DisaggregatedOrchestrator,
        membership: Membership,
        namespace: str,
        metrics: DiscoveryMetrics | None = None,
        *,
        retry_s: float = 1.0,
    ) -> None:
        self.orchestrator, self.membership, self.metrics = orchestrator, membership, metrics
        self.prefix = prefix_of(namespace)
        self.retry_s = retry_s
        self.wanted: dict[str, WorkerRecord] = {}  # name -> its record, as the store has it
        self.applied: dict[str, WorkerRecord] = {}  # name -> the record the router routes by
        self.is_connected = False
        self._names: dict[str, str] = {}  # key -> name
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: Watch | None = None
        self._closed = False

    async def start(self, wait_s: float = 5.0) -> None:
        """Start watching; wait up to ``wait_s`` for the first listing and the workers it names
        to be connected (an unreachable store is logged, and the watch keeps trying)."""
        self._loop = asyncio.get_running_loop()
        if self.metrics is not None:
            self.metrics.connected.set(0)
        self._watch = await asyncio.to_thread(
            self.membership.watch_prefix, self.prefix, self._event_soon, self._state_soon
        )
        try:
            async with asyncio.timeout(wait_s):
                await self._connected.wait()
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        except TimeoutError:
            log.warning("discovery_start_incomplete", prefix=self.prefix, wait_s=wait_s,
                        is_connected=self.is_connected, workers=sorted(self.applied))  # fmt: skip

    async def close(self) -> None:
        """Stop watching and reconciling (the workers stay connected until the router closes)."""
        self._closed = True
        if self._watch is not None:
            await asyncio.to_thread(self._watch.close)
        await cancel_and_wait(list(self._tasks.values()), self.retry_s + 10.0, "discovery")

    # ------------------------------------------------------------ from the watch thread
    def _event_soon(self, event: MemberEvent) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.on_event, event)

    def _state_soon(self, is_connected: bool) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.on_connected, is_connected)

    # ------------------------------------------------------------------- on the loop
    def on_connected(self, is_connected: bool) -> None:
        self.is_connected = is_connected
        if self.metrics is not None:
            self.metrics.connected.set(1 if is_connected else 0)
        if is_connected:
            self._connected.set()
        else:
            log.warning("discovery_serving_last_membership", workers=sorted(self.applied))

    def on_event(self, event: MemberEvent) -> None:
        if self._closed:
            return
        if event.kind is EventKind.DELETE:
            name = self._names.pop(event.key, None)
            if name is not None:
                self.wanted.pop(name, None)
                self._kick(name)
            return
        try:
            record = decode_record(event.value, event.key)
            name = self._name_for(event.key, record)
        except BadRecord as exc:
            self._bad(event, str(exc))
            return
        self._names[event.key], self.wanted[name] = name, record
        self._kick(name)

    def _name_for(self, key: str, record: WorkerRecord) -> str:
        holder = next((k for k, n in self._names.items() if n == record.name), key)
        if holder != key:
            raise BadRecord(f"name {record.name} is taken by {holder}")
        known = self.orchestrator.cluster.workers
        if record.name in known and record.name not in self.wanted | self.applied:
            raise BadRecord(f"name {record.name} is taken by a --worker")
        return record.name

    def _bad(self, event: MemberEvent, why: str) -> None:
        log.warning("discovery_bad_record", key=event.key, error=why, num_bytes=len(event.value),
                    note="ignored")  # fmt: skip
        if self.metrics is not None:
            self.metrics.bad_records.inc()

    def _kick(self, name: str) -> None:
        if name not in self._tasks:
            self._tasks[name] = asyncio.get_running_loop().create_task(self._reconcile(name))

    async def _reconcile(self, name: str) -> None:
        """Make the orchestrator route by ``wanted[name]`` (or not at all), then return."""
        try:
            while not self._closed:
                want, have = self.wanted.get(name), self.applied.get(name)
                if want == have:
                    return
                if have is not None and (want is None or _moved(have, want)):
                    why = "deregistered" if want is None else "registered again elsewhere"
                    await self.orchestrator.remove_worker(name, why)
                    del self.applied[name]
                elif want is not None and have is None:
                    if not await self._add(name, want):
                        await asyncio.sleep(self.retry_s)
                elif want is not None:  # same endpoint: its role comes over ZeroMQ (WorkerInfo)
                    self.applied[name] = want
                self._export()
        finally:
            self._tasks.pop(name, None)

    async def _add(self, name: str, record: WorkerRecord) -> bool:
        spec = WorkerSpec(name, record.control_endpoint, record.is_prfaas)
        try:
            info = await self.orchestrator.add_worker(spec)
        except (TransportError, ConfigError) as exc:
            log.warning("discovered_worker_unreachable", worker=name, error=str(exc),
                        endpoint=record.control_endpoint, retry_s=self.retry_s)  # fmt: skip
            return False
        self.applied[name] = record
        if info.role != record.role:
            log.info("discovered_worker_role", worker=name, registered=record.role, role=info.role)
        return True

    def _export(self) -> None:
        if self.metrics is not None:
            self.metrics.workers.set(len(self.applied))


def _moved(have: WorkerRecord, want: WorkerRecord) -> bool:
    return (have.control_endpoint, have.is_prfaas) != (want.control_endpoint, want.is_prfaas)
