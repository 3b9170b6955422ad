"""A worker's registration in the membership store (``prfaas worker --discovery``).

The worker puts its :class:`~trtllm_prfaas.discovery.records.WorkerRecord` under
``/<namespace>/workers/<cluster>/<worker_id>`` with a lease of ``--lease-ttl-s`` seconds (default
5) that the store's background thread keeps alive, and puts it again after the store comes back
(``discovery/membership.py``). A thread here reads the worker's role and relay endpoint every
``poll_s`` and updates the record when a ``SetRole`` changed them. ``close()`` deletes the record
(at SIGTERM, before the engine stops, so routers stop sending first); a killed worker's record
goes when its lease expires, which takes it out of routing within the TTL.

Routers must reach the control endpoint the record names: a worker bound to a wildcard
(``tcp://0.0.0.0:7000``) registers ``--advertise-control`` if given, else its host's address
(``socket.gethostbyname(socket.gethostname())``, a container's own address under Docker).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from trtllm_prfaas.discovery.membership import Membership, Registration, worker_key
from trtllm_prfaas.discovery.records import WorkerRecord, encode_record
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = ["WorkerRegistration", "advertised_control"]

log = get_logger(__name__)

_WILDCARDS = ("0.0.0.0", "*", "[::]", "")


def advertised_control(bound: str, advertise: str = "") -> str:
    """The control endpoint routers should use: ``advertise`` if given, else ``bound`` with a
    wildcard host replaced by this host's address. ConfigError names a malformed one."""
    endpoint = advertise or bound
    scheme, sep, address = endpoint.partition("://")
    host, colon, port = address.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not port.isdigit():
        what = "--advertise-control" if advertise else "the control endpoint"
        raise ConfigError(f"{what} {endpoint!r}: expected tcp://HOST:PORT")
    if host in _WILDCARDS:
        host = socket.gethostbyname(socket.gethostname())
    return f"tcp://{host}:{port}"


class WorkerRegistration:
    """Keeps ``record_of()`` registered while the worker serves; a context manager."""

    def __init__(
        self,
        membership: Membership,
        namespace: str,
        record_of: Callable[[], WorkerRecord],
        *,
        ttl_s: float,
        poll_s: float = 0.5,
    ) -> None:
        self.membership, self.record_of, self.ttl_s, self.poll_s = (
            membership,
            record_of,
            ttl_s,
            poll_s,
        )
        self.record = record_of()
        self.key = worker_key(namespace, self.record.cluster, self.record.name)
        self._registration: Registration | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="registration", daemon=True)

    @property
    def is_registered(self) -> bool:
        return self._registration is not None and self._registration.is_registered

    def start(self) -> WorkerRegistration:
        """Register (waits at most the store's call timeout) and follow role changes."""
        self._registration = self.membership.register(
            self.key, encode_record(self.record), self.ttl_s
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop following and delete the record. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.poll_s + 5.0)
        if self._registration is not None:
            self._registration.close()

    def __enter__(self) -> WorkerRegistration:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                record = self.record_of()
            except Exception as exc:  # the worker is closing under us: keep the last record
                log.warning("registration_read_failed", key=self.key, error=repr(exc))
                continue
            if record != self.record and self._registration is not None:
                log.info("registration_updated", key=self.key, role=record.role,
                         relay=record.relay_endpoint)  # fmt: skip
                self.record = record
                self._registration.update(encode_record(record))
