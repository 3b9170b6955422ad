"""Membership: which workers serve now, kept in a store that outlives any one process.

The interface is three verbs over string keys and byte values, as etcd's own API:

- ``register(key, value, ttl_s)``: the value lives under a lease of ``ttl_s`` seconds that a
  background thread keeps alive (every ``ttl_s / 3``). If the store goes away and comes back,
  the registration is put again (on a new lease when the old one expired meanwhile).
  ``update(value)`` replaces the value in place (a role change); ``close()`` deletes the key at
  once (revokes the lease) and joins the thread. A process that dies without closing leaves the
  key until its lease expires: that is how a killed worker leaves routing within its TTL.
- ``list_prefix(prefix)``: every key under ``prefix`` now, ``{key: value}``. Blocking, bounded
  by the backend's call timeout; raises :class:`DiscoveryUnavailable` when the store cannot
  answer.
- ``watch_prefix(prefix, on_event, on_connected)``: a background thread delivers the current
  keys first (as ``PUT`` events), then every change (``PUT`` or ``DELETE``), in store order. When
  the store goes away it calls ``on_connected(False)`` and retries; when it is back it lists the
  prefix again, delivers the difference from what it had delivered (``DELETE`` for keys gone
  meanwhile, ``PUT`` for new or changed ones), calls ``on_connected(True)`` and watches from
  there. Consumers therefore see a sequence of events that always converges to the store's
  state, and treat a repeated ``PUT`` of the same value as a no-op. Callbacks run on the watch's
  thread and must not block (hand the event to your own loop).

Every call into a store has a timeout; nothing here blocks forever. Backends: ``static.py`` (an
in-process store, built from a ``--worker`` list; also what the tests use as the fake) and
``etcd.py`` (etcd v3). Keys: :func:`worker_key` (``/<namespace>/workers/<cluster>/<name>``).

``parse_discovery("etcd://HOST:PORT[,HOST:PORT]")`` reads the ``--discovery`` flag.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from trtllm_prfaas.errors import ConfigError, TransportError

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_NAMESPACE",
    "DiscoveryConfig",
    "DiscoveryUnavailable",
    "EventKind",
    "MemberEvent",
    "Membership",
    "Registration",
    "Watch",
    "check_name",
    "parse_discovery",
    "worker_key",
    "worker_prefix",
]

# A killed worker stays routable at most this long (its lease must expire). 5 s: short next to
# any request deadline, long next to a keepalive every 5/3 s over a loaded network.
DEFAULT_LEASE_TTL_S = 5.0
DEFAULT_NAMESPACE = "prfaas"  # --namespace: routers and workers of one deployment share it

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class DiscoveryUnavailable(TransportError):
    """The membership store did not answer within its call timeout (down or unreachable)."""


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class MemberEvent:
    kind: EventKind
    key: str
    value: bytes = b""  # empty for DELETE


OnEvent = Callable[[MemberEvent], None]
OnConnected = Callable[[bool], None]


class Registration(ABC):
    """One key kept alive under a lease; a context manager."""

    key: str

    @property
    def is_registered(self) -> bool:
        """The value has been put at least once (the store answered)."""
        return True

    @abstractmethod
    def update(self, value: bytes) -> None:
        """Replace the value (put now if the store answers, else when it is back)."""

    @abstractmethod
    def close(self) -> None:
        """Delete the key (revoke the lease) and stop keeping it alive. Idempotent; bounded by
        the call timeout (a store that is down keeps the key until the lease expires)."""

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watch(ABC):
    """A running watch; ``close()`` stops it and joins its thread. A context manager."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Membership(ABC):
    """A membership store (see the module doc for the contract)."""

    @abstractmethod
    def register(self, key: str, value: bytes, ttl_s: float) -> Registration: ...

    @abstractmethod
    def list_prefix(self, prefix: str) -> dict[str, bytes]: ...

    @abstractmethod
    def watch_prefix(
        self, prefix: str, on_event: OnEvent, on_connected: OnConnected | None = None
    ) -> Watch: ...

    @abstractmethod
    def close(self) -> None:
        """Close the registrations and watches this store made, then the store. Idempotent."""

    def __enter__(self) -> Membership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ keys
def check_name(value: str, what: str) -> str:
    """A namespace, cluster or worker name: letters, digits, ``_.-``, no ``/``."""
    if not _NAME.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r}: use letters, digits, '_', '.' and '-' (starting with a letter "
            "or digit)"
        )
    return value


def worker_prefix(namespace: str) -> str:
    """Where a namespace's worker records live: ``/<namespace>/workers/``."""
    return f"/{check_name(namespace, '--namespace')}/workers/"


def worker_key(namespace: str, cluster: str, name: str) -> str:
    """``/<namespace>/workers/<cluster>/<name>``."""
    return f"{worker_prefix(namespace)}{check_name(cluster, 'cluster')}/{check_name(name, 'name')}"


# ------------------------------------------------------------------------------ the flag
@dataclass(frozen=True)
class DiscoveryConfig:
    """Where the membership store is: etcd endpoints as (host, port)."""

    endpoints: tuple[tuple[str, int], ...]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"{host}:{port}" for host, port in self.endpoints)


def parse_discovery(url: str, what: str = "--discovery") -> DiscoveryConfig:
    """``etcd://HOST:PORT[,HOST:PORT]`` -> DiscoveryConfig; ConfigError names what was wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "etcd":
        raise ConfigError(f"{what} {url!r}: expected etcd://HOST:PORT[,HOST:PORT]")
    endpoints = []
    for part in rest.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or "/" in host or not port.isdigit():
            raise ConfigError(f"{what} {url!r}: {part!r} is not HOST:PORT")
        if not 0 < int(port) < 65536:
            raise ConfigError(f"{what} {url!r}: port {port} must be in 1..65535")
        endpoints.append((host, int(port)))
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"{what} {url!r}: an endpoint is listed twice")
    return DiscoveryConfig(tuple(endpoints))
