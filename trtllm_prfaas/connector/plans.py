"""PrfaaS plans: the request carrier that exists in every TensorRT-LLM version we support.

On TensorRT-LLM 1.2 no request-level field reaches a KV cache connector for a context request
(``DisaggregatedParams.opaque_state`` is forwarded only for generation-only requests:
``tensorrt_llm/executor/base_worker.py`` ``BaseWorker._enqueue_request``, stored copy 1131391427),
and Triton's ``llmapi`` model ignores request parameters. So a request's PrfaaS plan travels
*beside* it: the process that submits the request posts a :class:`Plan` first, and the
connector's scheduler half takes it from a :class:`PlanBook` by the digest of the tokens it
claims (prefill: the whole prompt; decode: all but the last token, t1).

- :class:`PlanBook`: in-process, thread-safe, FIFO per digest, entries expire after ``ttl_s``;
  ``take`` is a dictionary look-up (the scheduler runs under TensorRT-LLM's lock: no I/O).
- :class:`PlanServer`: one per connector rank, a ZeroMQ ROUTER (Curve: the connector's own key
  pair is the server's, the worker keys allowed to post are listed; plaintext only when chosen
  explicitly). Rank 0 stores posted plans in its book; every rank answers transfer-status
  queries about its own relay receiver (``status_of(transfer_uuid, num_tokens)``).
- :class:`PlanClient`: in the worker process fronting Triton or ``LLM``: posts a plan to rank 0
  and waits for the acknowledgement, and queries transfer status on every rank, each with a
  deadline. Context manager, ``linger=0``.

Wire messages are msgspec structs (``_Envelope``, ``version`` 1); a message of another version or
shape is answered with an error, never guessed at.
"""

from __future__ import annotations

import itertools
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import msgspec
import xxhash
import zmq

from trtllm_prfaas.errors import ConfigError, PrfaasError, TransferTimeout, TransportError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport.config import RelaySecurity
from trtllm_prfaas.transport.security import (
    ServerAuth,
    secure_client,
    secure_server,
    warn_if_plaintext,
)

__all__ = [
    "PLAN_WIRE_VERSION",
    "Plan",
    "PlanBook",
    "PlanBookCounts",
    "PlanClient",
    "PlanServer",
    "tokens_digest",
]

log = get_logger(__name__)

PLAN_WIRE_VERSION = 1


class Plan(msgspec.Struct, frozen=True):
    """One request's PrfaaS transfer, as its scheduler half needs it (plain types only).

    ``num_tokens`` is L, the tokens the transfer covers; ``tokens_digest`` is
    :func:`tokens_digest` of exactly those L token ids. ``relay_endpoints`` (prefill plans only)
    are the decode node's relay receivers in tensor-parallel rank order: prefill rank r sends its
    shard to ``relay_endpoints[r]``. ``relay_from_tokens`` (D, a block multiple below L) is where
    the relayed blocks begin: the decode node holds ``[0, D)`` itself (pinned with its slot), so
    a prefill sends blocks ``D / tokens_per_block`` onward (and the states), and a decode claims
    only when its own cached prefix reaches D."""

    transfer_uuid: str
    num_tokens: int
    tokens_digest: str
    relay_endpoints: list[str] = []
    relay_from_tokens: int = 0


def tokens_digest(tokens: Sequence[int]) -> str:
    """xxh3-128 of the token ids as little-endian int32, as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(struct.pack(f"<{len(tokens)}i", *tokens))


@dataclass(frozen=True)
class PlanBookCounts:
    """Counters of a book since it was made."""

    posted: int
    taken: int
    missed: int
    expired: int
    held: int  # plans in the book now


@dataclass
class PlanBook:
    """Posted plans by token digest (FIFO per digest); thread-safe; entries expire.

    ``clock`` returns monotonic seconds (tests pass their own)."""

    ttl_s: float = 600.0
    clock: Callable[[], float] = time.monotonic
    _plans: dict[str, deque[tuple[float, Plan]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("posted", "taken", "missed", "expired"), 0)
    )

    def __post_init__(self) -> None:
        if not self.ttl_s > 0:
            raise ConfigError(f"PlanBook.ttl_s must be > 0, got {self.ttl_s}")

    def post(self, plan: Plan) -> None:
        """Add ``plan``; it can be taken once, until ``ttl_s`` from now."""
        if plan.num_tokens < 1 or not plan.transfer_uuid or "." in plan.transfer_uuid:
            raise ConfigError(
                f"plan {plan!r}: needs a transfer uuid without '.' and at least one token"
            )
        with self._lock:
            self._expire()
            entry = (self.clock() + self.ttl_s, plan)
            self._plans.setdefault(plan.tokens_digest, deque()).append(entry)
            self._counts["posted"] += 1

    def take(self, tokens: Sequence[int], count_miss: bool = True) -> Plan | None:
        """The oldest live plan for exactly ``tokens`` (removed), or None (counted as missed
        unless ``count_miss`` is False: a first of two look-ups)."""
        digest = tokens_digest(tokens)
        with self._lock:
            self._expire()
            queue = self._plans.get(digest)
            while queue:
                _, plan = queue.popleft()
                if plan.num_tokens == len(tokens):
                    self._counts["taken"] += 1
                    if not queue:
                        del self._plans[digest]
                    return plan
            self._plans.pop(digest, None)
            self._counts["missed"] += count_miss
            return None

    def counts(self) -> PlanBookCounts:
        with self._lock:
            self._expire()
            held = sum(len(q) for q in self._plans.values())
            return PlanBookCounts(held=held, **self._counts)

    def _expire(self) -> None:
        """Drop plans past their time (under the lock). Queues are FIFO, so expiry is too."""
        now = self.clock()
        for digest in list(self._plans):
            queue = self._plans[digest]
            while queue and queue[0][0] <= now:
                _, plan = queue.popleft()
                self._counts["expired"] += 1
                log.warning("prfaas_plan_expired", transfer_uuid=plan.transfer_uuid)
            if not queue:
                del self._plans[digest]


# ---- the wire ----------------------------------------------------------------------------------


class _PostPlan(msgspec.Struct, tag="post_plan", frozen=True):
    plan: Plan


class _QueryStatus(msgspec.Struct, tag="query_status", frozen=True):
    transfer_uuid: str
    num_tokens: int


class _Ack(msgspec.Struct, tag="ack", frozen=True):
    pass


class _Status(msgspec.Struct, tag="status", frozen=True):
    rank: int
    status: str  # an InboundStatus value, or "" when this rank does not know the transfer


class _Refused(msgspec.Struct, tag="refused", frozen=True):
    reason: str


_Body = _PostPlan | _QueryStatus | _Ack | _Status | _Refused


class _Envelope(msgspec.Struct, frozen=True):
    version: int
    seq: int
    body: _Body


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Envelope)

StatusOf = Callable[[str, int], str]  # (transfer uuid, num tokens) -> status text ("" unknown)
CheckPlan = Callable[[Plan], str | None]  # a reason to refuse the plan, or None


class PlanServer:
    """One rank's plan endpoint: a ROUTER served by its own thread. Context manager.

    ``book`` is None on ranks other than 0 (they refuse posts); ``status_of`` answers transfer
    status queries about this rank's own receiver; ``check`` may refuse a plan (e.g. a relay
    endpoint count that is not this deployment's tensor-parallel size)."""

    _POLL_MS = 50

    def __init__(
        self,
        endpoint: str,
        security: RelaySecurity,
        rank: int,
        *,
        book: PlanBook | None,
        status_of: StatusOf,
        check: CheckPlan | None = None,
    ) -> None:
        self.rank, self._book, self._status_of, self._check = rank, book, status_of, check
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._ctx.linger = 0
        self._auth = ServerAuth(self._ctx, security)
        try:
            self._sock = self._ctx.socket(zmq.ROUTER)
            secure_server(self._sock, security)
            self._sock.bind(endpoint)
        except (zmq.ZMQError, PrfaasError) as exc:
            self._auth.close()
            self._ctx.destroy(linger=0)
            raise TransportError(f"plan server cannot bind {endpoint}: {exc}") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        warn_if_plaintext(security, "plan_server", self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"prfaas-plans-{rank}")
        self._thread.start()

    def _serve(self) -> None:
        """Answer every message; a bad message gets a refusal, never kills the loop."""
        try:
            while not self._stop.is_set():
                if not self._sock.poll(self._POLL_MS):
                    continue
                frames = self._sock.recv_multipart()
                self._sock.send_multipart([frames[0], self._answer(frames[-1])])
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                log.error("prfaas_plan_server_failed", rank=self.rank, error=str(exc))
        finally:
            self._sock.close(linger=0)

    def _answer(self, payload: bytes) -> bytes:
        try:
            message = _decoder.decode(payload)
        except msgspec.DecodeError as exc:
            return _encode(0, _Refused(f"undecodable message: {exc}"))
        if message.version != PLAN_WIRE_VERSION:
            reason = f"wire version {message.version}; this server speaks {PLAN_WIRE_VERSION}"
            return _encode(message.seq, _Refused(reason))
        return _encode(message.seq, self._handle(message.body))

    def _handle(self, body: _Body) -> _Body:
        if isinstance(body, _QueryStatus):
            return _Status(self.rank, self._status_of(body.transfer_uuid, body.num_tokens))
        if not isinstance(body, _PostPlan):
            return _Refused(f"unexpected message {type(body).__name__}")
        if self._book is None:
            return _Refused(f"rank {self.rank} stores no plans: post them to rank 0")
        reason = self._check(body.plan) if self._check is not None else None
        if reason is not None:
            log.error("prfaas_plan_refused", transfer_uuid=body.plan.transfer_uuid, reason=reason)
            return _Refused(reason)
        try:
            self._book.post(body.plan)
        except ConfigError as exc:
            return _Refused(str(exc))
        return _Ack()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop and join the thread, close the socket and authenticator. Idempotent."""
        self._stop.set()
        self._thread.join(timeout_s)
        self._auth.close()
        self._ctx.destroy(linger=0)

    def __enter__(self) -> PlanServer:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _encode(seq: int, body: _Body) -> bytes:
    return _encoder.encode(_Envelope(PLAN_WIRE_VERSION, seq, body))


class PlanClient:
    """Posts plans to rank 0 and queries transfer status on every rank. Not thread-safe (one
    caller thread); context manager. ``endpoints`` are the ranks' plan servers, in rank order."""

    def __init__(self, endpoints: Sequence[str], security: RelaySecurity) -> None:
        if not endpoints:
            raise ConfigError("PlanClient needs at least one plan endpoint (rank 0 first)")
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._ctx.linger = 0
        self._seq = itertools.count(1)
        self._socks: list[zmq.Socket[bytes]] = []
        try:
            for endpoint in endpoints:
                sock = self._ctx.socket(zmq.DEALER)
                sock.linger = 0
                secure_client(sock, security)
                sock.connect(endpoint)
                self._socks.append(sock)
        except (zmq.ZMQError, PrfaasError) as exc:
            self.close()
            raise TransportError(f"plan client cannot connect: {exc}") from exc
        warn_if_plaintext(security, "plan_client", ",".join(endpoints))

    @property
    def num_ranks(self) -> int:
        return len(self._socks)

    def post(self, plan: Plan, timeout_s: float) -> None:
        """Post ``plan`` to rank 0; returns once stored. ConfigError if refused (the reason
        says why), TransferTimeout if no answer within ``timeout_s``."""
        reply = self._call(self._socks[0], _PostPlan(plan), time.monotonic() + timeout_s)
        if isinstance(reply, _Refused):
            raise ConfigError(f"plan {plan.transfer_uuid} refused: {reply.reason}")
        if not isinstance(reply, _Ack):
            raise TransportError(f"plan server answered a post with {type(reply).__name__}")

    def statuses(self, transfer_uuid: str, num_tokens: int, timeout_s: float) -> list[str]:
        """Each rank's status of the transfer (an ``InboundStatus`` value, "" when unknown),
        in rank order. TransferTimeout if a rank does not answer within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        query = _QueryStatus(transfer_uuid, num_tokens)
        out = []
        for sock in self._socks:
            reply = self._call(sock, query, deadline)
            if not isinstance(reply, _Status):
                raise TransportError(f"plan server answered a status query with {reply!r}")
            out.append(reply.status)
        return out

    def _call(self, sock: zmq.Socket[bytes], body: _Body, deadline: float) -> _Body:
        """Send one request and wait for the reply with the same sequence number."""
        seq = next(self._seq)
        sock.send(_encode(seq, body))
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                raise TransferTimeout(f"plan server {_endpoint(sock)}: no answer in time")
            try:
                reply = _decoder.decode(sock.recv())
            except msgspec.DecodeError as exc:
                raise TransportError(f"plan server sent an undecodable reply: {exc}") from exc
            if reply.seq == seq:  # older replies belong to calls that already timed out
                return reply.body

    def close(self) -> None:
        """Close every socket (linger 0). Idempotent."""
        for sock in self._socks:
            sock.close(linger=0)
        self._socks = []
        self._ctx.destroy(linger=0)

    def __enter__(self) -> PlanClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _endpoint(sock: zmq.Socket[bytes]) -> str:
    try:
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)
    except zmq.ZMQError:
        return "?"
