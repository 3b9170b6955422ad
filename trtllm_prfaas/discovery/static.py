"""The in-process membership store: a dict behind a lock, built from a ``--worker`` list.

``StaticMembership.from_workers(namespace, [(cluster, role, endpoint, is_prfaas), ...])`` holds one
record per listed worker, named ``CLUSTER-ROLE-i`` as ``prfaas router`` names a static list. It
keeps the :class:`~trtllm_prfaas.discovery.membership.Membership` contract in one process (a
registration lives until closed: there is no process to die apart from the store; watches see
every change at once, on the thread that made it), so code written against the interface runs
unchanged without etcd, and tests use it as the fake. It never disconnects.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from trtllm_prfaas.discovery.membership import (
    EventKind,
    MemberEvent,
    Membership,
    OnConnected,
    OnEvent,
    Registration,
    Watch,
    worker_key,
)
from trtllm_prfaas.discovery.records import WorkerRecord, encode_record
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.vocabulary import parse_role

__all__ = ["StaticMembership"]


class StaticMembership(Membership):
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._values: dict[str, bytes] = {}
        self._watches: list[_StaticWatch] = []

    @classmethod
    def from_workers(
        cls, namespace: str, workers: Iterable[tuple[str, str, str, bool]]
    ) -> StaticMembership:
        """One record per ``(cluster, role, control_endpoint, is_prfaas)``."""
        store, counts = cls(), dict[tuple[str, str], int]()
        for cluster, role, endpoint, is_prfaas in workers:
            i = counts[(cluster, role)] = counts.get((cluster, role), -1) + 1
            record = WorkerRecord(
                name=f"{cluster}-{role}-{i}",
                cluster=cluster,
                role=parse_role(role, f"worker {cluster}/{role}"),
                is_prfaas=is_prfaas,
                control_endpoint=endpoint,
            )
            store._put(worker_key(namespace, cluster, record.name), encode_record(record))
        return store

    def register(self, key: str, value: bytes, ttl_s: float) -> Registration:
        if not ttl_s > 0:
            raise ConfigError(f"lease ttl_s must be > 0, got {ttl_s}")
        with self._lock:
            if key in self._values:
                raise ConfigError(f"{key} is registered already")
            self._put(key, value)
        return _StaticRegistration(self, key)

    def list_prefix(self, prefix: str) -> dict[str, bytes]:
        with self._lock:
            return {k: v for k, v in self._values.items() if k.startswith(prefix)}

    def watch_prefix(
        self, prefix: str, on_event: OnEvent, on_connected: OnConnected | None = None
    ) -> Watch:
        with self._lock:
            watch = _StaticWatch(self, prefix, on_event)
            for key, value in self.list_prefix(prefix).items():
                on_event(MemberEvent(EventKind.PUT, key, value))
            self._watches.append(watch)
        if on_connected is not None:
            on_connected(True)
        return watch

    def close(self) -> None:
        with self._lock:
            self._watches.clear()

    def _put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._values[key] = value
            self._notify(MemberEvent(EventKind.PUT, key, value))

    def _delete(self, key: str) -> None:
        with self._lock:
            if self._values.pop(key, None) is not None:
                self._notify(MemberEvent(EventKind.DELETE, key))

    def _notify(self, event: MemberEvent) -> None:
        for watch in list(self._watches):
            if event.key.startswith(watch.prefix):
                watch.on_event(event)


class _StaticRegistration(Registration):
    def __init__(self, store: StaticMembership, key: str) -> None:
        self.store, self.key, self._closed = store, key, False

    def update(self, value: bytes) -> None:
        if not self._closed:
            self.store._put(self.key, value)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.store._delete(self.key)


class _StaticWatch(Watch):
    def __init__(self, store: StaticMembership, prefix: str, on_event: OnEvent) -> None:
        self.store, self.prefix, self.on_event = store, prefix, on_event

    def close(self) -> None:
        with self.store._lock:
            if self in self.store._watches:
                self.store._watches.remove(self)
