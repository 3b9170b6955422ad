"""The etcd v3 membership store (``--discovery etcd://HOST:PORT[,HOST:PORT]``).

Client: ``etcd-sdk-python`` 0.0.7 (imports as ``pyetcd``), the client TensorRT-LLM itself pins
(its ``requirements.txt`` has ``etcd-sdk-python==0.0.7`` since "replace etcd3 with
etcd-sdk-python", NVIDIA/TensorRT-LLM#10886, January 2026), so a worker process that also loads
TensorRT-LLM's disaggregated serving shares one etcd client. The alternatives do not fit:
``etcd3`` (python-etcd3) does not import with today's protobuf (its generated stubs predate
protobuf 4), ``aetcd`` ships its own ``etcdrpc`` modules under the same protobuf names and
cannot share a process with ``pyetcd``; and ``protobuf<7`` stays for tritonclient.

``pyetcd`` is synchronous (gRPC): every call here runs on a thread of its own (never on an
asyncio loop) and carries ``call_timeout_s``. Two of its defaults are overridden because they
would keep a router blind long after etcd is back: a failed endpoint is normally not retried for
300 s (``Endpoint.time_retry``; here ``retry_s``), and gRPC's reconnect backoff grows to 120 s
(here at most 1 s). After a failure each thread also starts over on a fresh client. gRPC
keepalives (every 10 s, above etcd's 5 s ``--grpc-keepalive-min-time``) find a watch stream
whose peer vanished without closing its connection.

Threads: one per registration (grant a lease, put, keep it alive every ``ttl_s / 3``, put again
after an outage or a lost lease) and one per watch (list, then watch from the listed revision;
after an outage, list again and deliver the difference). ``close()`` joins them.
"""

from __future__ import annotations

import importlib
import math
import queue
import threading
from typing import Any

from trtllm_prfaas.discovery.membership import (
    DiscoveryConfig,
    DiscoveryUnavailable,
    EventKind,
    MemberEvent,
    Membership,
    OnConnected,
    OnEvent,
    Registration,
    Watch,
)
from trtllm_prfaas.errors import ConfigError, DependencyMissing
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = ["EtcdMembership", "connect_etcd"]

log = get_logger(__name__)

_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Pings only while a call (a watch stream) is open: etcd's server counts pings on an idle
    # connection as abuse (PermitWithoutStream false) and closes it with "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 0),
]
_STOP = object()  # wakes a watch thread waiting for events


def _pyetcd() -> Any:
    try:
        import pyetcd
    except ImportError as exc:
        raise DependencyMissing("pyetcd", "'etcd-sdk-python==0.0.7'") from exc
    return pyetcd


def connect_etcd(
    endpoints: tuple[tuple[str, int], ...], call_timeout_s: float, retry_s: float
) -> Any:
    """A pyetcd client over ``endpoints`` (no I/O until the first call) that reconnects within
    a second of etcd coming back: an endpoint that failed is benched ``retry_s`` (pyetcd's
    default: 300 s) and gRPC's reconnect backoff is capped at 1 s (its default grows to 120 s).
    The one client setup membership (``EtcdMembership``) and leadership (``leader.py``) share."""
    pyetcd = _pyetcd()
    eps = [
        pyetcd.Endpoint(host, port, secure=False, time_retry=retry_s, opts=_GRPC_OPTIONS)
        for host, port in endpoints
    ]
    return pyetcd.MultiEndpointEtcd3Client(endpoints=eps, timeout=call_timeout_s, failover=True)


def _client_errors() -> tuple[type[BaseException], ...]:
    """What a pyetcd call raises when etcd is down, slow or restarting."""
    import grpc

    return (_pyetcd().Etcd3Exception, grpc.RpcError, ValueError, queue.Empty)


class EtcdMembership(Membership):
    """etcd v3 behind the Membership contract; a context manager."""

    def __init__(
        self, config: DiscoveryConfig, *, call_timeout_s: float = 2.0, retry_s: float = 0.5
    ) -> None:
        if not call_timeout_s > 0 or not retry_s > 0:
            raise ConfigError("call_timeout_s and retry_s must be > 0")
        self.config, self.call_timeout_s, self.retry_s = config, call_timeout_s, retry_s
        self.errors = _client_errors()
        self._lock = threading.Lock()
        self._client = self.new_client()
        self._children: list[_EtcdRegistration | _EtcdWatch] = []

    def new_client(self) -> Any:
        """A fresh pyetcd client over every endpoint (no I/O until the first call)."""
        return connect_etcd(self.config.endpoints, self.call_timeout_s, self.retry_s)

    def register(self, key: str, value: bytes, ttl_s: float) -> Registration:
        """Start keeping ``key`` alive; waits up to ``call_timeout_s`` for the first put (if
        etcd does not answer, the thread keeps trying: ``is_registered`` says when it did)."""
        if not ttl_s >= 2:  # etcd grants at least ~1.5 s (its election timeout), in whole seconds
            raise ConfigError(f"lease ttl_s must be >= 2, got {ttl_s}")
        registration = _EtcdRegistration(self, key, value, ttl_s)
        with self._lock:
            self._children.append(registration)
        registration.start(self.call_timeout_s)
        return registration

    def list_prefix(self, prefix: str) -> dict[str, bytes]:
        with self._lock:
            try:
                response = self._client.get_prefix_response(prefix)
            except self.errors as exc:
                self._client.close()
                self._client = self.new_client()
                raise DiscoveryUnavailable(f"etcd {self.config.url}: {exc!r}") from exc
        return {kv.key.decode(): bytes(kv.value) for kv in response.kvs}

    def watch_prefix(
        self, prefix: str, on_event: OnEvent, on_connected: OnConnected | None = None
    ) -> Watch:
        watch = _EtcdWatch(self, prefix, on_event, on_connected)
        with self._lock:
            self._children.append(watch)
        watch.start()
        return watch

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, []
        for child in children:
            child.close()
        with self._lock:
            self._client.close()


class _EtcdRegistration(Registration):
    """Grant, put, keep alive; after an outage put again (on a new lease if it expired)."""

    def __init__(self, store: EtcdMembership, key: str, value: bytes, ttl_s: float) -> None:
        self.store, self.key, self.ttl_s = store, key, ttl_s
        self._value, self._is_dirty = value, True  # dirty: the value must be put
        self._lease_id: int | None = None
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._registered = threading.Event()
        self._client = store.new_client()
        self._thread = threading.Thread(target=self._run, name="etcd-lease", daemon=True)

    @property
    def is_registered(self) -> bool:
        return self._registered.is_set()

    def start(self, wait_s: float) -> None:
        self._thread.start()
        self._registered.wait(wait_s)

    def update(self, value: bytes) -> None:
        with self._lock:
            self._value, self._is_dirty = value, True
        self._wake.set()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(self.store.call_timeout_s * 3 + 1.0)
        lease_id, self._lease_id = self._lease_id, None
        try:
            if lease_id is not None:
                self._client.revoke_lease(lease_id)  # deletes the key with it
                log.info("discovery_deregistered", key=self.key)
        except self.store.errors as exc:
            note = f"the key goes when its lease expires (ttl {self.ttl_s:g}s)"
            log.warning("discovery_deregister_failed", key=self.key, error=repr(exc), note=note)
        finally:
            self._client.close()

    def _run(self) -> None:
        is_down = False
        while not self._stop.is_set():
            wait_s = self.ttl_s / 3
            try:
                self._keep_alive()
                if is_down:
                    log.info("discovery_reconnected", key=self.key)
                is_down = False
            except self.store.errors as exc:
                if not is_down:
                    log.warning("discovery_unreachable", key=self.key, error=repr(exc),
                                url=self.store.config.url, retry_s=self.store.retry_s)  # fmt: skip
                is_down, wait_s = True, self.store.retry_s
                if _is_lease_gone(exc):  # etcd lost it (restarted empty): grant a new one
                    self._lease_id, wait_s = None, 0.0
                with self._lock:
                    self._is_dirty = True  # put again once etcd answers
                self._client.close()
                self._client = self.store.new_client()
            self._wake.wait(wait_s)
            self._wake.clear()

    def _keep_alive(self) -> None:
        """One pass: a lease if there is none, the value if it changed, one keepalive."""
        client = self._client
        if self._lease_id is None:
            self._lease_id = int(client.lease(math.ceil(self.ttl_s)).id)
            with self._lock:
                self._is_dirty = True
        with self._lock:
            value, is_dirty = self._value, self._is_dirty
        if is_dirty:
            client.put(self.key, value, lease=self._lease_id)
            with self._lock:
                self._is_dirty = self._value is not value
            if not self._registered.is_set():
                log.info("discovery_registered", key=self.key, lease_ttl_s=self.ttl_s)
            self._registered.set()
        responses = list(client.refresh_lease(self._lease_id))
        if not responses or responses[0].TTL <= 0:  # expired (etcd was away longer than TTL)
            log.warning("discovery_lease_lost", key=self.key, note="registering again")
            self._lease_id = None
            self._wake.set()  # the next pass grants a new lease at once


class _EtcdWatch(Watch):
    """List, deliver the difference, watch from the listed revision; again after an outage."""

    def __init__(
        self,
        store: EtcdMembership,
        prefix: str,
        on_event: OnEvent,
        on_connected: OnConnected | None,
    ) -> None:
        self.store, self.prefix = store, prefix
        self.on_event, self.on_connected = on_event, on_connected
        self._known: dict[str, bytes] = {}  # what has been delivered
        self._is_connected: bool | None = None
        self._stop = threading.Event()
        self._events: queue.Queue[Any] = queue.Queue()
        self._client = store.new_client()
        self._delete_event = importlib.import_module("pyetcd.events").DeleteEvent
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._events.put(_STOP)
        self._client.close()  # cancels the watch stream
        self._thread.join(self.store.call_timeout_s * 3 + 1.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._list_and_watch()
            except self.store.errors as exc:
                self._set_connected(False, repr(exc))
            except _WatchBroken as exc:
                self._set_connected(False, str(exc))
            if self._stop.wait(self.store.retry_s):
                return
            self._client.close()
            self._client = self.store.new_client()

    def _list_and_watch(self) -> None:
        response = self._client.get_prefix_response(self.prefix)
        current = {kv.key.decode(): bytes(kv.value) for kv in response.kvs}
        for key in [k for k in self._known if k not in current]:
            self._deliver(MemberEvent(EventKind.DELETE, key))
        for key, value in current.items():
            if self._known.get(key) != value:
                self._deliver(MemberEvent(EventKind.PUT, key, value))
        self._events = events = queue.Queue[Any]()
        if self._stop.is_set():
            return
        self._client.add_watch_prefix_callback(
            self.prefix, events.put, start_revision=response.header.revision + 1
        )
        self._set_connected(True, f"{len(current)} keys")
        while True:
            item = events.get()
            if item is _STOP:
                return
            if item is None or isinstance(item, BaseException):
                raise _WatchBroken(f"watch stream ended: {item!r}")
            for event in item.events:
                key = event.key.decode()
                if isinstance(event, self._delete_event):
                    self._deliver(MemberEvent(EventKind.DELETE, key))
                else:
                    self._deliver(MemberEvent(EventKind.PUT, key, bytes(event.value)))

    def _deliver(self, event: MemberEvent) -> None:
        if event.kind is EventKind.DELETE:
            if self._known.pop(event.key, None) is None:
                return
        else:
            self._known[event.key] = event.value
        try:
            self.on_event(event)
        except Exception as exc:  # a consumer's bug must not end the watch: logged, not hidden
            log.error("discovery_event_failed", key=event.key, kind=event.kind.value,
                      error=repr(exc))  # fmt: skip

    def _set_connected(self, is_connected: bool, detail: str) -> None:
        if is_connected == self._is_connected:
            return
        was, self._is_connected = self._is_connected, is_connected
        if is_connected:
            log.info("discovery_connected", prefix=self.prefix, url=self.store.config.url,
                     detail=detail, resumed=was is False)  # fmt: skip
        else:
            log.warning("discovery_disconnected", prefix=self.prefix, url=self.store.config.url,
                        error=detail, note="keeping the last membership; retrying",
                        retry_s=self.store.retry_s)  # fmt: skip
        if self.on_connected is not None:
            try:
                self.on_connected(is_connected)
            except Exception as exc:
                log.error("discovery_state_callback_failed", error=repr(exc))


def _is_lease_gone(exc: BaseException) -> bool:
    """etcd answered "requested lease not found" (gRPC NOT_FOUND) to a put or keepalive."""
    import grpc

    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.NOT_FOUND


class _WatchBroken(Exception):
    """The watch stream ended (etcd went away); the thread lists and watches again."""
