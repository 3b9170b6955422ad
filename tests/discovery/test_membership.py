"""The membership interface on both stores: the in-process one and a real etcd (Debian's
etcd-server on loopback): register under a lease, list, watch, deregister, lease expiry, and an
etcd that stops and comes back (watches resume and deliver what changed meanwhile)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.etcd_server import EtcdServer
from trtllm_prfaas.discovery import (
    EventKind,
    MemberEvent,
    StaticMembership,
    WorkerRecord,
    decode_record,
    open_membership,
    parse_discovery,
    worker_key,
    worker_prefix,
)
from trtllm_prfaas.discovery.etcd import EtcdMembership
from trtllm_prfaas.errors import ConfigError


class Recorder:
    """Collects watch events and connection states; waits with deadlines."""

    def __init__(self) -> None:
        self.events: list[MemberEvent] = []
        self.states: list[bool] = []
        self._cond = threading.Condition()

    def on_event(self, event: MemberEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def on_connected(self, is_connected: bool) -> None:
        with self._cond:
            self.states.append(is_connected)
            self._cond.notify_all()

    def wait_for(self, what: Callable[[], bool], timeout_s: float = 10.0) -> float:
        """Seconds until ``what()`` held; fails the test at the deadline."""
        started = time.monotonic()
        with self._cond:
            assert self._cond.wait_for(what, timeout_s), f"not within {timeout_s}s: {self.events}"
        return time.monotonic() - started

    def has(self, kind: EventKind, key: str, value: bytes | None = None) -> bool:
        return any(
            e.kind is kind and e.key == key and (value is None or e.value == value)
            for e in self.events
        )


@pytest.fixture
def store(etcd: EtcdServer) -> Iterator[EtcdMembership]:
    membership = open_membership(parse_discovery(etcd.url), call_timeout_s=1.0)
    assert isinstance(membership, EtcdMembership)
    try:
        yield membership
    finally:
        membership.close()


# ------------------------------------------------------------------------------ flag and keys
def test_parse_discovery_reads_endpoints_and_names_bad_input() -> None:
    config = parse_discovery("etcd://127.0.0.1:2379,etcd-b:2380")
    assert config.endpoints == (("127.0.0.1", 2379), ("etcd-b", 2380))
    assert config.url == "etcd://127.0.0.1:2379,etcd-b:2380"
    for bad, why in [
        ("http://h:2379", "expected etcd://"),
        ("etcd://h", "'h' is not HOST:PORT"),
        ("etcd://h:0", "port 0"),
        ("etcd://h:1,h:1", "listed twice"),
        ("etcd://:2379", "is not HOST:PORT"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_discovery(bad)


def test_keys_follow_the_layout_and_refuse_slashes() -> None:
    assert worker_prefix("ns") == "/ns/workers/"
    assert worker_key("ns", "dc-local", "w-1") == "/ns/workers/dc-local/w-1"
    with pytest.raises(ConfigError, match="cluster 'a/b'"):
        worker_key("ns", "a/b", "w")
    with pytest.raises(ConfigError, match="--namespace ''"):
        worker_prefix("")


# ------------------------------------------------------------------------------ static store
def test_static_store_lists_watches_and_deregisters() -> None:
    store = StaticMembership.from_workers(
        "ns", [("dc-local", "decode", "tcp://127.0.0.1:7001", False)]
    )
    key = "/ns/workers/dc-local/dc-local-decode-0"
    assert decode_record(store.list_prefix("/ns/")[key], key).role == "decode"
    seen = Recorder()
    watch = store.watch_prefix("/ns/workers/", seen.on_event, seen.on_connected)
    assert seen.has(EventKind.PUT, key) and seen.states == [True]  # the snapshot first
    registration = store.register("/ns/workers/x/y", b"v1", ttl_s=5)
    registration.update(b"v2")
    registration.close()
    assert [e.kind for e in seen.events[1:]] == [EventKind.PUT, EventKind.PUT, EventKind.DELETE]
    assert "/ns/workers/x/y" not in store.list_prefix("/ns/")
    watch.close()
    store.close()


# ------------------------------------------------------------------------------ etcd
def test_etcd_registers_lists_watches_updates_and_deregisters(store: EtcdMembership) -> None:
    seen = Recorder()
    with store.watch_prefix("/t/workers/", seen.on_event, seen.on_connected):
        seen.wait_for(lambda: seen.states == [True])
        started = time.monotonic()
        registration = store.register("/t/workers/c/a", b"v1", ttl_s=2)
        assert registration.is_registered
        seen.wait_for(lambda: seen.has(EventKind.PUT, "/t/workers/c/a", b"v1"))
        assert time.monotonic() - started < 1.0  # registered to watched: well inside 1 s
        assert store.list_prefix("/t/") == {"/t/workers/c/a": b"v1"}
        time.sleep(3.0)  # longer than the TTL: the keepalive holds it
        assert store.list_prefix("/t/") == {"/t/workers/c/a": b"v1"}
        registration.update(b"v2")
        seen.wait_for(lambda: seen.has(EventKind.PUT, "/t/workers/c/a", b"v2"))
        registration.close()
        seen.wait_for(lambda: seen.has(EventKind.DELETE, "/t/workers/c/a"))
    assert store.list_prefix("/t/") == {}


def test_etcd_lease_expires_when_nobody_keeps_it_alive(store: EtcdMembership) -> None:
    """A registration whose process died (here: its keepalive thread stopped without a
    revoke) is deleted by etcd once its TTL passes."""
    client = store.new_client()
    try:
        lease = client.lease(2)
        client.put("/t/workers/c/dead", b"x", lease=lease.id)
        seen = Recorder()
        with store.watch_prefix("/t/workers/", seen.on_event):
            seen.wait_for(lambda: seen.has(EventKind.PUT, "/t/workers/c/dead"))
            waited_s = seen.wait_for(lambda: seen.has(EventKind.DELETE, "/t/workers/c/dead"))
        assert waited_s <= 2.0 + 1.5  # TTL plus etcd's expiry sweep (500 ms) and slack
    finally:
        client.close()


def test_etcd_stopped_then_back_watch_resumes_and_registration_returns(
    etcd: EtcdServer, store: EtcdMembership
) -> None:
    seen = Recorder()
    with (
        store.watch_prefix("/t/workers/", seen.on_event, seen.on_connected),
        store.register("/t/workers/c/a", b"a", ttl_s=3),
    ):
        seen.wait_for(lambda: seen.has(EventKind.PUT, "/t/workers/c/a"))
        etcd.stop()
        seen.wait_for(lambda: seen.states[-1:] == [False], timeout_s=5.0)
        with pytest.raises(Exception, match="etcd"):
            store.list_prefix("/t/")
        etcd.start()
        # A worker that joined while this watch was away is found when it resumes.
        other = open_membership(parse_discovery(etcd.url))
        with other.register("/t/workers/c/b", b"b", ttl_s=3):
            seen.wait_for(lambda: seen.has(EventKind.PUT, "/t/workers/c/b"), timeout_s=10.0)
            seen.wait_for(lambda: seen.states[-1:] == [True])  # right after the listing
            assert set(store.list_prefix("/t/")) == {"/t/workers/c/a", "/t/workers/c/b"}
        other.close()


def test_etcd_down_longer_than_the_lease_registers_again(etcd: EtcdServer) -> None:
    """etcd killed and restarted from an empty data dir (its leases gone): the registration's
    thread finds its lease lost and puts the record again on a new lease."""
    import shutil

    store = open_membership(parse_discovery(etcd.url), call_timeout_s=1.0)
    try:
        with store.register("/t/workers/c/a", b"a", ttl_s=2):
            etcd.kill()
            shutil.rmtree(etcd.data_dir)
            etcd.start()
            deadline = time.monotonic() + 10.0
            while store_keys(store) != ["/t/workers/c/a"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert store_keys(store) == ["/t/workers/c/a"]
    finally:
        store.close()


def store_keys(store: object) -> list[str]:
    try:
        return sorted(store.list_prefix("/t/"))  # type: ignore[attr-defined]
    except Exception:
        return []


def test_records_are_strict() -> None:
    record = WorkerRecord(
        name="w", cluster="c", role="decode", is_prfaas=False, control_endpoint="tcp://h:1"
    )
    from trtllm_prfaas.discovery import BadRecord, encode_record

    assert decode_record(encode_record(record), "/ns/workers/c/w") == record
    for value, why in [
        (b"{not json", "not a WorkerRecord"),
        (b'{"name": "w", "cluster": "c", "role": "decode", "is_prfaas": "no", '
         b'"control_endpoint": "tcp://h:1"}', "is_prfaas"),
        (b'{"name": "w", "cluster": "c", "role": "judge", "is_prfaas": false, '
         b'"control_endpoint": "tcp://h:1"}', "role 'judge'"),
        (b'{"name": "w", "cluster": "c", "role": "decode", "is_prfaas": true, '
         b'"control_endpoint": "tcp://h:1"}', "must be a prefill"),
        (b'{"name": "w", "cluster": "c", "role": "decode", "is_prfaas": false, '
         b'"control_endpoint": "tcp://0.0.0.0:1"}', "wildcard"),
        (b'{"name": "w", "cluster": "c", "role": "decode", "is_prfaas": false, '
         b'"control_endpoint": "h:1"}', "expected tcp://HOST:PORT"),
    ]:  # fmt: skip
        with pytest.raises(BadRecord, match=why):
            decode_record(value, "/ns/workers/c/w")
    with pytest.raises(BadRecord, match="lives under c/other"):
        decode_record(encode_record(record), "/ns/workers/c/other")
