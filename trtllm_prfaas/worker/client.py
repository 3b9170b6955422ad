"""A router's (or a test's) connection to one worker's control endpoint."""

from __future__ import annotations

import time

import msgspec
import zmq

from trtllm_prfaas.errors import TransportError
from trtllm_prfaas.transport import RelaySecurity
from trtllm_prfaas.transport.security import secure_client
from trtllm_prfaas.worker import protocol as p

__all__ = ["WorkerClient"]


class WorkerClient:
    """One DEALER socket to a worker. Not thread-safe: one owner sends and receives.

    ``security``: the worker's control plane is Curve when it was started with key files; then
    give the router's keys (``config.load_control_security(FILE, False, "router")``: its pair
    and the workers' control public key). None: plaintext, for a worker started ``--plaintext``.
    A client whose key the worker does not allow never completes the handshake: its messages
    wait in its own queue and nothing is answered (``ping`` raises after its timeout)."""

    def __init__(
        self,
        endpoint: str,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        security: RelaySecurity | None = None,
    ):
        self.endpoint = endpoint
        self._owns_context = context is None
        self._ctx = context or zmq.Context()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.linger = 0
        try:
            if security is not None:
                secure_client(self.socket, security)  # ConfigError if the client keys are missing
            self.socket.connect(endpoint)
        except BaseException:
            self.close()
            raise

    def send(self, message: p.Message) -> None:
        try:
            self.socket.send(p.encode_message(message), zmq.NOBLOCK)
        except zmq.Again as exc:
            raise TransportError(f"worker {self.endpoint} is not accepting messages") from exc

    def recv(self, timeout_s: float) -> p.Message | None:
        """The next message, or None after ``timeout_s``. Malformed frames are skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            if not self.socket.poll(int(remaining * 1000), zmq.POLLIN):
                return None
            try:
                return p.decode_message(self.socket.recv(zmq.NOBLOCK))
            except (msgspec.ValidationError, msgspec.DecodeError, zmq.Again):
                continue

    def ping(self, timeout_s: float) -> p.WorkerInfo:
        """Ask for the worker's info; other messages that arrive meanwhile are dropped."""
        self.send(p.Ping())
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.recv(remaining)
            if isinstance(message, p.WorkerInfo):
                return message
        raise TransportError(f"worker {self.endpoint} did not answer a ping in {timeout_s}s")

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._owns_context:
            self._ctx.term()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
