"""Relay configuration: frozen dataclasses validated without side effects.

``RelayConfig`` holds the knobs of one relay link (sender or receiver side). Security is
mandatory and explicit: either Curve keys (``CurveKeys``) or ``RelaySecurity.insecure_plaintext()``;
the sockets log a warning when plaintext is used. Units are in the field names.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtllm_prfaas.errors import ConfigError

__all__ = ["Z85_KEY_LEN", "CurveKeys", "RelayConfig", "RelaySecurity"]

Z85_KEY_LEN = 40  # a 32-byte Curve25519 key in Z85 text


def _check_key(name: str, key: bytes | None) -> None:
    if key is not None and (not isinstance(key, bytes) or len(key) != Z85_KEY_LEN):
        raise ConfigError(f"{name}: expected a {Z85_KEY_LEN}-byte Z85 Curve key")


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys (Z85 bytes, see ``generate_keypair``).

    The receiver (server) needs ``server_public_key``, ``server_secret_key`` and
    ``allowed_client_public_keys``; the sender (client) needs ``server_public_key``,
    ``client_public_key`` and ``client_secret_key``. Missing role keys are reported when a
    sender or receiver is built (``require_server``/``require_client``).
    """

    server_public_key: bytes
    server_secret_key: bytes | None = None
    client_public_key: bytes | None = None
    client_secret_key: bytes | None = None
    allowed_client_public_keys: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        _check_key("server_public_key", self.server_public_key)
        _check_key("server_secret_key", self.server_secret_key)
        _check_key("client_public_key", self.client_public_key)
        _check_key("client_secret_key", self.client_secret_key)
        for key in self.allowed_client_public_keys:
            _check_key("allowed_client_public_keys", key)

    def require_server(self) -> None:
        """Raise ConfigError unless the receiver-side keys are present."""
        if self.server_secret_key is None:
            raise ConfigError("server_secret_key: required on the receiver")
        if not self.allowed_client_public_keys:
            raise ConfigError("allowed_client_public_keys: empty, every client would be refused")

    def require_client(self) -> None:
        """Raise ConfigError unless the sender-side keys are present."""
        if self.client_public_key is None:
            raise ConfigError("client_public_key: required on the sender")
        if self.client_secret_key is None:
            raise ConfigError("client_secret_key: required on the sender")


@dataclass(frozen=True)
class RelaySecurity:
    """Curve encryption + authentication, or explicitly allowed plaintext (never by default)."""

    curve: CurveKeys | None = None
    allow_plaintext: bool = False

    def __post_init__(self) -> None:
        if self.curve is None and not self.allow_plaintext:
            raise ConfigError("curve: required unless allow_plaintext=True")
        if self.curve is not None and self.allow_plaintext:
            raise ConfigError("allow_plaintext: must be False when curve keys are given")

    @classmethod
    def insecure_plaintext(cls) -> RelaySecurity:
        """No encryption, no authentication: loopback tests and benchmarks only."""
        return cls(curve=None, allow_plaintext=True)


@dataclass(frozen=True)
class RelayConfig:
    """Knobs of one relay link.

    ``credit_bytes`` is the receiver's host-buffer budget: bytes granted to senders plus bytes
    received but not yet released by the consumer never exceed it. It must be at least
    ``chunk_bytes`` and, when the consumer releases per layer, at least the largest layer.
    No peer holds it past its transfer's deadline (capped at ``max_deadline_s``) while
    receiving, nor past ``unclaimed_hold_s`` once complete while no consumer touched it.
    """

    security: RelaySecurity
    num_streams: int = 4
    chunk_bytes: int = 1 << 20
    credit_bytes: int = 256 << 20
    link_gbps: float | None = None
    pacing_burst_bytes: int = 1 << 20
    connect_timeout_s: float = 5.0
    default_deadline_s: float = 30.0
    expired_grace_s: float = 1.0
    # A sender names its transfer's deadline; the receiver holds credit for it no longer than
    # this (a peer announcing an endless deadline and stalling cannot keep the budget forever).
    max_deadline_s: float = 600.0
    # A complete transfer that no consumer has touched (no layer read, not released) is dropped
    # this long after it completed, and its credit returned: a decode that never came (its
    # request cancelled, its router gone) or a peer sending transfers nobody asked for cannot
    # fill the budget. 300 s is the default request deadline: whatever would claim it has ended.
    unclaimed_hold_s: float = 300.0
    poll_interval_s: float = 0.05
    sndhwm_msgs: int = 64
    rcvhwm_msgs: int = 256
    io_threads: int = 1
    tombstones: int = 4096
    cpu_affinity: frozenset[int] | None = None  # pin the relay's I/O threads (transport/pinning)

    def __post_init__(self) -> None:
        self._positive_int("num_streams", self.num_streams, upper=64)
        self._positive_int("chunk_bytes", self.chunk_bytes, upper=1 << 30)
        self._positive_int("credit_bytes", self.credit_bytes)
        self._positive_int("pacing_burst_bytes", self.pacing_burst_bytes)
        self._positive_int("sndhwm_msgs", self.sndhwm_msgs)
        self._positive_int("rcvhwm_msgs", self.rcvhwm_msgs)
        self._positive_int("io_threads", self.io_threads, upper=16)
        self._positive_int("tombstones", self.tombstones)
        if self.credit_bytes < self.chunk_bytes:
            raise ConfigError("credit_bytes: must be >= chunk_bytes or no chunk could ever be sent")
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise ConfigError("link_gbps: must be > 0 or None (no pacing)")
        for name in (
            "connect_timeout_s",
            "default_deadline_s",
            "poll_interval_s",
            "max_deadline_s",
            "unclaimed_hold_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0")
        if not self.expired_grace_s >= 0:
            raise ConfigError("expired_grace_s: must be >= 0")
        if self.cpu_affinity is not None and (
            not self.cpu_affinity
            or any(
                not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in self.cpu_affinity
            )
        ):
            raise ConfigError(
                f"cpu_affinity: a non-empty set of CPU numbers or None, got {self.cpu_affinity!r}"
            )
        if not isinstance(self.security, RelaySecurity):
            raise ConfigError("security: expected a RelaySecurity")

    @staticmethod
    def _positive_int(name: str, value: int, upper: int | None = None) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name}: must be a positive int, got {value!r}")
        if upper is not None and value > upper:
            raise ConfigError(f"{name}: must be <= {upper}, got {value}")
