"""CurveZMQ on relay sockets: key generation, client setup, and the receiver's ZAP handler.

The receiver runs a pyzmq ``ThreadAuthenticator`` on its own context that accepts exactly the
configured client public keys; a client with any other key fails the Curve handshake and never
delivers a message. Plaintext is used only with ``RelaySecurity.insecure_plaintext()``, and
every socket set up that way logs a warning.
"""

from __future__ import annotations

from types import TracebackType

import zmq
from zmq.auth.thread import ThreadAuthenticator

from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport.config import CurveKeys, RelaySecurity

__all__ = [
    "ServerAuth",
    "generate_keypair",
    "secure_client",
    "secure_server",
    "warn_if_plaintext",
]

_log = get_logger(__name__)


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Curve25519 ``(public_key, secret_key)`` pair, Z85-encoded (40 bytes each)."""
    public, secret = zmq.curve_keypair()
    return public, secret


def warn_if_plaintext(security: RelaySecurity, side: str, endpoint: str) -> None:
    """Log a warning when ``security`` allows plaintext (call once per sender/receiver)."""
    if security.curve is None:
        _log.warning(
            "relay_plaintext", side=side, endpoint=endpoint, note="no encryption, no authentication"
        )


def secure_client(sock: zmq.Socket[bytes], security: RelaySecurity) -> None:
    """Configure a connecting socket as a Curve client (no-op for plaintext)."""
    if security.curve is None:
        return
    keys = security.curve
    keys.require_client()
    sock.curve_serverkey = keys.server_public_key
    sock.curve_publickey = keys.client_public_key
    sock.curve_secretkey = keys.client_secret_key


def secure_server(sock: zmq.Socket[bytes], security: RelaySecurity) -> None:
    """Configure a binding socket as a Curve server (no-op for plaintext)."""
    if security.curve is None:
        return
    keys = security.curve
    keys.require_server()
    sock.curve_server = True
    sock.curve_publickey = keys.server_public_key
    sock.curve_secretkey = keys.server_secret_key


class _AllowList:
    """pyzmq credentials provider: accept a client iff its Z85 public key is allowed."""

    def __init__(self, keys: CurveKeys, plane: str) -> None:
        self._allowed = keys.allowed_client_public_keys
        self._plane = plane

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self._allowed
        if not allowed:
            client_key = key.decode("ascii", "replace")
            _log.warning(f"{self._plane}_client_refused", client_key=client_key)
        return allowed


class ServerAuth:
    """The ZAP handler of one receiver context (a no-op for plaintext). Context manager.

    ``plane`` names the refusal log line (``relay_client_refused``, ``control_client_refused``)."""

    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], security: RelaySecurity, plane: str = "relay"
    ) -> None:
        self._auth: ThreadAuthenticator | None = None
        if security.curve is None:
            return
        security.curve.require_server()
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback(
            domain="*", credentials_provider=_AllowList(security.curve, plane)
        )

    def close(self) -> None:
        """Stop and join the authenticator thread. Idempotent."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def __enter__(self) -> ServerAuth:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
