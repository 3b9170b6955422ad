"""The router's links to its workers: one socket per worker, and where each message goes.

I/O: one plain (non-asyncio) ZeroMQ DEALER per worker, a CurveZMQ client when the links have
keys (``security``: the router's key pair and the workers' control public key; the worker admits
only allowed router keys) or plaintext, logged as a warning, when that was chosen. Sends go out
at once with ``NOBLOCK`` (falling back to waiting for room only when the socket is full);
received messages are drained with ``NOBLOCK`` in a loop from one event-loop reader callback
per socket, and each ``Tokens`` goes to its request's channel (a deque and one future, made
only while the request waits).
ZeroMQ's descriptor is edge-triggered: after every send the socket's events are checked, and a
drain is scheduled if messages became readable meanwhile.

Delivery: ``Tokens`` to the request's inbox in ``flights`` (dropped if the request is gone),
``WorkerInfo`` to the future in ``info_waiters`` (the answer to ``Ping`` or ``SetRole``),
``LoadReport`` to the cluster state and the metrics, ``KvEvents`` to the cluster state's prefix
index (``ClusterState.on_kv_events``; when they show that events were lost, a ``Ping`` asks the
worker for its snapshot); ``TransferDone`` is dropped. A message that
cannot be delivered is logged and ends whoever waits on it (its request gets an error ``Tokens``,
an info waiter the exception); the drain goes on with the next message.

Liveness: every socket sends ZMTP heartbeats (``heartbeat_options``): libzmq's I/O thread
pings the worker every ``worker_lost_s / 3`` and drops the connection when nothing came back
within ``2 * worker_lost_s / 3`` after a ping; the worker's libzmq answers by itself, so a long
engine step does not look like a death (a SIGSTOPped or unreachable host does). A socket monitor,
read from the same loop, reports each dropped connection (a killed process: its kernel closes the
TCP connection at once; a host that missed its heartbeats: within ``worker_lost_s``) and each new
handshake. A drop marks the worker lost in the cluster state (out of routing) and ends every
request in flight on it with a ``WorkerLost`` error ``Tokens`` from that worker (the flight
decides: fall back, re-route, or fail). A handshake of a lost worker (it came back, or was
restarted at its endpoint: the DEALER reconnects every 100 ms by itself) sends it a ``Ping``; its
``WorkerInfo`` answer rejoins it to routing.

Membership: ``connect`` adds a worker, ``disconnect`` closes the socket of one that left (with
``--discovery``, ``router/discovered.py`` decides); a send to a worker that left raises
``WorkerLost``, as a send to a dead one would end.

Everything here runs on the event loop's thread: ``connect`` and ``send`` from coroutines, the
drain from the loop's reader callback. Nothing blocks; a send to a full socket waits at most
``send_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from trtllm_prfaas.errors import ConfigError, TransportError, WorkerLost
from trtllm_prfaas.router.cluster import ClusterState
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.transport import RelaySecurity
from trtllm_prfaas.transport.security import secure_client
from trtllm_prfaas.worker import protocol as p

__all__ = ["Inbox", "WorkerLinks", "heartbeat_options"]

log = get_logger(__name__)

_SNAPSHOT_ASK_S = 5.0  # at most one snapshot ask per worker this often (events lost meanwhile)
_SEND_RETRY_S = (0.0005, 0.01)  # a full socket: first and longest wait before retrying a send
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_MONITOR_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED
_MAX_TTL_MS = 6_553_500  # HEARTBEAT_TTL travels in deciseconds in 16 bits (zmq_setsockopt)


def heartbeat_options(worker_lost_s: float) -> dict[int, int]:
    """ZMTP heartbeat socket options (ms) that find a silent peer within ``worker_lost_s``.

    libzmq (``doc/zmq_setsockopt.txt``; ``src/stream_engine_base.cpp``, the heartbeat timers)
    sends a PING every ``HEARTBEAT_IVL`` and closes the connection if no traffic at all arrives
    within ``HEARTBEAT_TIMEOUT`` of a PING; any incoming message cancels that timer. The worst
    case is a peer that died just after a PING was answered: IVL + TIMEOUT = ``worker_lost_s``.
    ``HEARTBEAT_TTL`` asks the worker to drop us after the same silence (0.1 s granularity)."""
    ivl_ms = max(int(worker_lost_s * 1000 / 3), 100)
    return {
        zmq.HEARTBEAT_IVL: ivl_ms,
        zmq.HEARTBEAT_TIMEOUT: max(int(worker_lost_s * 1000) - ivl_ms, 100),
        zmq.HEARTBEAT_TTL: min(max(int(worker_lost_s * 1000) // 100 * 100, 100), _MAX_TTL_MS),
    }


class Inbox(Protocol):
    """Where one request's ``Tokens`` go (``router.flight.Flight``); ``put`` must not block."""

    def put(self, source: str, message: p.Tokens) -> None: ...

    def involves(self, worker: str) -> bool:
        """The request has (or may have) a leg on ``worker``."""
        ...


class WorkerLinks:
    """One DEALER per worker on the running event loop; ``close()`` ends them all."""

    def __init__(
        self,
        cluster: ClusterState,
        metrics: RouterMetrics | None = None,
        *,
        worker_lost_s: float = 3.0,
        send_timeout_s: float = 10.0,
        security: RelaySecurity | None = None,
    ) -> None:
        if not worker_lost_s > 0 or not send_timeout_s > 0:
            raise ConfigError("worker_lost_s and send_timeout_s must be > 0")
        if security is not None and security.curve is not None:
            security.curve.require_client()
        self.security = security or RelaySecurity.insecure_plaintext()
        self.cluster = cluster
        self.metrics = metrics
        self.worker_lost_s = worker_lost_s
        self.send_timeout_s = send_timeout_s  # a send to a full socket fails after this
        self.flights: dict[str, Inbox] = {}  # request id -> its inbox, while the request runs
        self.info_waiters: dict[str, asyncio.Future[p.WorkerInfo]] = {}  # worker -> its answer
        self._relay_bytes: dict[str, int] = {}
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        self._fds: dict[str, int] = {}  # worker -> its socket's descriptor, watched by the loop
        self._monitors: dict[str, zmq.Socket[bytes]] = {}  # worker -> its socket's monitor
        self._monitor_fds: dict[str, int] = {}
        self._drains: set[str] = set()  # workers with a drain scheduled (call_soon)
        self._snapshot_asked: dict[str, float] = {}  # worker -> when its snapshot was last asked
        self._loop: asyncio.AbstractEventLoop | None = None

    def connect(self, name: str, endpoint: str) -> None:
        """Open worker ``name``'s socket and watch it from the running loop (call from it)."""
        self._loop = asyncio.get_running_loop()
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        secure_client(sock, self.security)
        if self.security.curve is None:
            log.warning("control_plaintext", side="router", worker=name, endpoint=endpoint,
                        note="no encryption, no authentication")  # fmt: skip
        for option, value in heartbeat_options(self.worker_lost_s).items():
            sock.setsockopt(option, value)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)  # before connect: see every event
        sock.connect(endpoint)
        self._sockets[name], self._monitors[name] = sock, monitor
        self._fds[name] = fd = int(sock.getsockopt(zmq.FD))
        self._loop.add_reader(fd, self._drain, name)
        self._monitor_fds[name] = mfd = int(monitor.getsockopt(zmq.FD))
        self._loop.add_reader(mfd, self._watch, name)
        self._loop.call_soon(self._watch, name)  # the descriptor's edge may be gone already

    def disconnect(self, name: str) -> bool:
        """Close worker ``name``'s socket and stop watching it (it left: deregistered, or its
        lease expired). Sends to it fail with ``WorkerLost`` from now on. False if unknown."""
        sock = self._sockets.pop(name, None)
        if sock is None:
            return False
        monitor = self._monitors.pop(name)
        for fd in (self._fds.pop(name, None), self._monitor_fds.pop(name, None)):
            if fd is not None and self._loop is not None:
                self._loop.remove_reader(fd)
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        self._drains.discard(name)
        self._relay_bytes.pop(name, None)
        return True

    def close(self) -> None:
        if self._loop is not None:
            for fd in [*self._fds.values(), *self._monitor_fds.values()]:
                self._loop.remove_reader(fd)
        self._fds.clear()
        self._monitor_fds.clear()
        for name, sock in self._sockets.items():
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            self._monitors[name].close(linger=0)
            sock.close(linger=0)
        self._ctx.term()

    # --------------------------------------------------------------------------- sending
    async def send(self, worker: str, message: p.Message) -> None:
        sock = self._sockets.get(worker)
        if sock is None:  # it left (disconnect) while a request still named it
            raise WorkerLost(f"worker {worker} is not connected (it left the membership)")
        frame = p.encode_message(message)
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # full (high-water mark): wait for room, as a blocking send would
            await self._send_when_ready(sock, frame)
        self._after_send(worker, sock)

    async def cancel(self, request_id: str, *workers: str) -> None:
        """``Cancel`` to each of ``workers`` once; a socket already closed (shutdown) or full
        (a dead worker's queue) is skipped."""
        for worker in dict.fromkeys(workers):
            with contextlib.suppress(zmq.ZMQError, TransportError):
                await self.send(worker, p.Cancel(request_id))

    async def _send_when_ready(self, sock: zmq.Socket[bytes], frame: bytes) -> None:
        """Retry a send to a full socket; ``TransportError`` after ``send_timeout_s``."""
        wait_s = _SEND_RETRY_S[0]
        deadline = time.monotonic() + self.send_timeout_s
        while True:
            if time.monotonic() >= deadline:
                raise TransportError(f"worker socket full for {self.send_timeout_s}s")
            await asyncio.sleep(wait_s)
            try:
                sock.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:
                wait_s = min(wait_s * 2, _SEND_RETRY_S[1])

    def _after_send(self, worker: str, sock: zmq.Socket[bytes]) -> None:
        """A send may have consumed the descriptor's edge while messages arrived: drain soon."""
        if worker not in self._drains and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._drains.add(worker)
            assert self._loop is not None
            self._loop.call_soon(self._drain, worker)

    # -------------------------------------------------------------------------- liveness
    def _watch(self, name: str) -> None:
        """Every event waiting on ``name``'s monitor (its reader callback; never blocks)."""
        monitor = self._monitors.get(name)
        while monitor is not None and not monitor.closed:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # closed under us (shutdown)
                log.warning("router_monitor_failed", worker=name, error=str(exc))
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.on_lost(name, "its connection closed (process gone or heartbeats missed)")
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._on_connected(name)
            elif event["event"] & _HANDSHAKE_FAILED:  # wrong keys, or Curve on one side only
                log.error("worker_handshake_failed", worker=name, handshake=event["event"],
                          code=event["value"])  # fmt: skip

    def on_lost(self, name: str, why: str) -> None:
        """Worker ``name`` is gone: out of routing, and every request with a leg on it gets a
        ``WorkerLost`` error from it (as if the worker had sent one); an info waiter fails."""
        if not self.cluster.mark_lost(name):
            return
        if self.metrics is not None:
            self.metrics.record_worker_up(name, False)
        num_requests = len({id(inbox) for inbox in self.flights.values()})  # a request: 1+ keys
        log.warning("worker_lost", worker=name, why=why, num_flights=num_requests)
        message = f"worker {name} lost: {why}"
        for request_id, flight in list(self.flights.items()):
            if flight.involves(name):
                error = p.Tokens(request_id, [], True, "error", WorkerLost.__name__, message)
                flight.put(name, error)
        waiter = self.info_waiters.get(name)
        if waiter is not None and not waiter.done():
            waiter.set_exception(WorkerLost(message))

    def _on_connected(self, name: str) -> None:
        """A new connection to ``name``: if it was lost, ask who it is now (``Ping``); its
        ``WorkerInfo`` rejoins it (``_on_info``)."""
        worker = self.cluster.workers.get(name)
        if worker is None or not worker.is_lost:
            return
        log.info("worker_reconnected", worker=name)
        self._ping(name)  # full: the next handshake tries again

    def _ask_snapshot(self, name: str) -> None:
        """``name``'s KV events were lost (its view was cleared): a ``Ping`` earns this router
        the worker's snapshot at its next report, which makes the view exact again. At most
        one ask per ``_SNAPSHOT_ASK_S`` per worker (a snapshot costs the worker O(its cached
        blocks)); a want held back is asked with a later report."""
        now = time.monotonic()
        if now - self._snapshot_asked.get(name, -_SNAPSHOT_ASK_S) < _SNAPSHOT_ASK_S:
            return
        self._snapshot_asked[name] = now
        log.warning("prefix_snapshot_asked", worker=name, why="KV cache events were lost")
        self._ping(name)

    def _ping(self, name: str) -> None:
        sock = self._sockets.get(name)
        if sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            sock.send(p.encode_message(p.Ping()), zmq.NOBLOCK)
            self._after_send(name, sock)

    # ------------------------------------------------------------------------- receiving
    def _drain(self, name: str) -> None:
        """Every message waiting on ``name``'s socket, without blocking (the reader callback)."""
        self._drains.discard(name)
        sock = self._sockets.get(name)
        if sock is None or sock.closed:
            return
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # closed under us (shutdown): nothing more to read
                log.warning("router_recv_failed", worker=name, error=str(exc))
                return
            message = None
            try:
                message = _decode(frame)
                self._dispatch(name, message)
            except Exception as exc:  # one bad message must not stall the others
                self._undeliverable(name, message, exc)

    def _dispatch(self, name: str, message: p.Message | None) -> None:
        if isinstance(message, p.Tokens):
            flight = self.flights.get(message.request_id)
            if flight is not None:
                flight.put(name, message)
        elif isinstance(message, p.LoadReport):
            if name in self.cluster.workers:
                self.cluster.on_report(name, message)
                self._export_load(name, message)
        elif isinstance(message, p.KvEvents):
            self.cluster.on_kv_events(name, message)
        elif isinstance(message, p.WorkerInfo):
            self._on_info(name, message)
        # TransferDone: nothing waits on it (a request ends with the decode node's tokens)
        reports = isinstance(message, p.KvEvents | p.LoadReport)  # also: an ask held back
        if reports and name in self.cluster.prefix.wants_snapshot:
            self._ask_snapshot(name)

    def _undeliverable(self, name: str, message: p.Message | None, exc: Exception) -> None:
        """Not swallowed: logged, and whoever waits on the message ends with an error."""
        log.error("router_dispatch_failed", worker=name, error=repr(exc))
        why = f"router could not deliver a message from worker {name}: {exc!r}"
        if isinstance(message, p.Tokens):
            flight = self.flights.get(message.request_id)
            if flight is not None:  # if this raises too, the loop's exception handler has it
                error = p.Tokens(message.request_id, [], True, "error", "TransportError", why)
                flight.put(name, error)
        elif isinstance(message, p.WorkerInfo):
            waiter = self.info_waiters.get(name)
            if waiter is not None and not waiter.done():
                waiter.set_exception(TransportError(why))
        # LoadReport: nobody waits on one; the next report replaces it

    def _on_info(self, name: str, info: p.WorkerInfo) -> None:
        waiter = self.info_waiters.get(name)
        if waiter is not None and not waiter.done():
            waiter.set_result(info)
        if self.cluster.rejoin(name, info):
            if self.metrics is not None:
                self.metrics.record_worker_up(name, True)
            log.info("worker_rejoined", worker=name, role=info.role, relay=info.relay_endpoint)
        elif waiter is None and self._is_news(name, info):
            # Unasked: the worker changed role at another router's request (replicas share
            # workers) and told every router it knows; follow it.
            self.cluster.on_info(name, info)
            log.info("worker_info_changed", worker=name, role=info.role, relay=info.relay_endpoint)

    def _is_news(self, name: str, info: p.WorkerInfo) -> bool:
        worker = self.cluster.workers.get(name)
        return worker is not None and worker.info != info

    def _export_load(self, name: str, report: p.LoadReport) -> None:
        if self.metrics is None:
            return
        self.metrics.set_worker_load(name, report.queue_depth, report.num_free_slots)
        if report.num_prefix_queries:
            self.metrics.set_worker_prefix_cache(
                name,
                report.num_prefix_query_tokens,
                report.num_prefix_reused_tokens,
                report.num_cached_blocks,
                report.num_block_evictions,
            )
        delta = report.relay_bytes_sent - self._relay_bytes.get(name, 0)
        if delta > 0:
            self._relay_bytes[name] = report.relay_bytes_sent
            goodput = report.relay_goodput_gbps or None
            self.metrics.add_relay_bytes(name, delta, goodput)


def _decode(frame: bytes) -> p.Message | None:
    try:
        return p.decode_message(frame)
    except (msgspec.ValidationError, msgspec.DecodeError):
        log.warning("router_bad_worker_message")
        return None
