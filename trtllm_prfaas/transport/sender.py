"""``RelaySender``: stream a transfer's items to one receiver over N parallel TCP connections.

Sockets: N ZeroMQ DEALER sockets, each ``connect``-ed to the receiver's single ROUTER, so the
link is N real TCP connections. DEALER rather than PUSH because credits, acks and errors must
flow back on the same connections; ``ZMQ_IMMEDIATE`` keeps messages out of pipes that have no
completed (Curve-authenticated) connection, so nothing piles up for a dead peer.

Threads: one I/O thread per sender owns every socket. Callers (``TransferHandle.send``) only
append a closure to a deque and poke an inproc wake socket; checksums, chunking, pacing, credit
accounting and the sends themselves happen on the I/O thread.

Data path per item: split into ``chunk_bytes`` memoryview slices (no copy); each chunk goes on
the next writable stream round-robin as ``[header, payload]`` with ``copy=False``. A chunk is
sent only when the transfer's cumulative payload stays within the receiver's cumulative credit
grant (so a receiver's buffer cannot be overrun) and, with ``link_gbps``, when the token bucket
allows it.

Failure: a transfer past its deadline fails with TransferTimeout (the message says what it was
waiting for); a dropped connection (receiver died or restarted) fails at once, with
TransportError, every open transfer that had put bytes on that connection, and a refused Curve
key fails every open transfer; the sender tells the receiver CANCEL and drops
its references to the payloads. Transfers opened after a reconnect work normally.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

import zmq

from trtllm_prfaas.errors import TransferTimeout, TransportError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport.config import RelayConfig
from trtllm_prfaas.transport.handle import OutboundItem, TransferHandle, TransferStatus
from trtllm_prfaas.transport.outbound import Outbound, StreamSet
from trtllm_prfaas.transport.pacing import TokenBucket
from trtllm_prfaas.transport.pinning import pin_current_thread, relay_context
from trtllm_prfaas.transport.security import warn_if_plaintext
from trtllm_prfaas.transport.stats import (
    TCP_READ_INTERVAL_S,
    ConnectionTracker,
    LinkStats,
    SendCounters,
)
from trtllm_prfaas.transport.wire import Control, Header, control_header

__all__ = ["ChunkHook", "RelaySender"]

_log = get_logger(__name__)
_ids = itertools.count()
ChunkHook = Callable[[Header, memoryview], memoryview | bytes]


class RelaySender:
    """Sender side of one relay link (to one receiver endpoint). Context manager.

    ``chunk_hook`` is a test hook called on the I/O thread after a chunk's checksum is computed;
    it returns the payload to put on the wire (e.g. a corrupted copy).
    """

    def __init__(
        self, endpoint: str, config: RelayConfig, *, chunk_hook: ChunkHook | None = None
    ) -> None:
        if config.security.curve is not None:
            config.security.curve.require_client()
        self.endpoint = endpoint
        self.config = config
        warn_if_plaintext(config.security, "sender", endpoint)
        self._chunk_hook = chunk_hook
        self._ctx = relay_context(config.io_threads, config.cpu_affinity)
        self._ctx.linger = 0
        self._wake_addr = f"inproc://relay-sender-wake-{next(_ids)}"
        self._commands: deque[Callable[[], None]] = deque()
        self._wake_lock = threading.Lock()
        self._stop = threading.Event()
        self._open_lock = threading.Lock()
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._transfers: dict[str, Outbound] = {}
        self._tracker = ConnectionTracker()
        self._counters = SendCounters(config.num_streams)
        self._thread = threading.Thread(target=self._run, name="relay-sender-io", daemon=True)
        self._thread.start()
        self._ready.wait(config.connect_timeout_s)
        self._wake: zmq.Socket[bytes] = self._ctx.socket(zmq.PAIR)
        self._wake.linger = 0
        self._wake.connect(self._wake_addr)
        if self._setup_error is not None or not self._ready.is_set():
            self.close()
            raise TransportError(f"relay sender to {endpoint} failed to start") from (
                self._setup_error
            )

    # ---- caller side -------------------------------------------------------------------------

    def open_transfer(
        self, transfer_id: str, request_id: str, deadline_s: float | None = None
    ) -> TransferHandle:
        """Open a transfer that must be acknowledged within ``deadline_s`` (config default)."""
        budget_s = self.config.default_deadline_s if deadline_s is None else deadline_s
        if not budget_s > 0:
            raise TransportError(f"deadline_s: must be > 0, got {deadline_s}")
        handle = TransferHandle(
            transfer_id, request_id, self._submit, self._on_item, self._on_finish, self._on_cancel
        )
        outbound = Outbound(handle, time.monotonic() + budget_s, budget_s)
        with self._open_lock:  # close() drains every open that got past this check
            if self._stop.is_set():
                raise TransportError("open_transfer on a closed RelaySender")
            self._submit(lambda: self._on_open(outbound))
        return handle

    def stats(self) -> LinkStats:
        """Counters of this link, with the kernel's TCP_INFO of each live connection."""
        return self._counters.snapshot(
            self.endpoint,
            self._tracker.tcp_infos(),
            self._tracker.auth_failures,
            time.monotonic(),
        )

    def num_connections(self) -> int:
        """Live TCP connections of this sender (from the socket monitor)."""
        return sum(len(infos) for infos in self._tracker.tcp_infos().values())

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every stream completed its (Curve) handshake; False on timeout.

        Optional: transfers may start at once and use whichever streams are ready.
        """
        deadline = time.monotonic() + timeout_s
        while len(self._tracker.ready_indices()) < self.config.num_streams:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Fail open transfers, stop and join the I/O thread, close every socket. Idempotent."""
        with self._open_lock:
            self._stop.set()
        if self._thread.is_alive():
            self._poke()
            self._thread.join(self.config.connect_timeout_s + 5.0)
        if self._thread.is_alive():
            raise TransportError("relay sender I/O thread did not stop")
        # Commands that raced the stop: register their transfers, then fail them (no hang).
        self._run_commands()
        self._fail_all(TransportError(f"relay sender to {self.endpoint} closed"))
        if not self._wake.closed:
            self._wake.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> RelaySender:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self._poke()

    def _poke(self) -> None:
        with self._wake_lock:
            if self._ready.is_set() and not self._wake.closed:
                # Again: wake-ups are already pending and the I/O thread drains the whole deque.
                with contextlib.suppress(zmq.Again):
                    self._wake.send(b"", zmq.NOBLOCK)

    # ---- I/O thread: commands ---------------------------------------------------------------

    def _on_open(self, outbound: Outbound) -> None:
        handle = outbound.handle
        if handle.status.is_terminal:
            return
        self._transfers[handle.transfer_id] = outbound
        header = control_header(
            Control.ANNOUNCE,
            handle.transfer_id,
            request_id=handle.request_id,
            deadline_s=outbound.deadline_s,
        )
        outbound.queue_control_on(self._streams, header)

    def _on_item(self, transfer_id: str, item: OutboundItem) -> None:
        outbound = self._transfers.get(transfer_id)
        if outbound is None:
            return
        outbound.items.append(item)
        outbound.demand += item.view.nbytes
        self._counters.on_enqueued(item.view.nbytes)
        demand = control_header(Control.CREDIT, transfer_id, value=outbound.demand)
        outbound.queue_control_on(self._streams, demand)

    def _on_finish(self, transfer_id: str) -> None:
        outbound = self._transfers.get(transfer_id)
        if outbound is not None:
            outbound.finishing = True

    def _on_cancel(self, transfer_id: str) -> None:
        outbound = self._transfers.pop(transfer_id, None)
        if outbound is not None:
            self._release(outbound, notify_peer=True, acked=False)

    # ---- I/O thread: loop -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            pin_current_thread(self.config.cpu_affinity)
            wake = self._ctx.socket(zmq.PAIR)
            wake.linger = 0
            wake.bind(self._wake_addr)
            self._streams = StreamSet(
                self._ctx, self.endpoint, self.config, self._tracker, self._counters
            )
            self._streams.chunk_hook = self._chunk_hook
        except Exception as exc:  # surfaced by __init__
            self._setup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(wake)
        except Exception as exc:
            _log.exception("relay_sender_crashed", endpoint=self.endpoint)
            self._fail_all(TransportError(f"relay sender I/O thread crashed: {exc!r}"))
        finally:
            self._fail_all(TransportError(f"relay sender to {self.endpoint} closed"))
            self._streams.close()
            wake.close(linger=0)

    def _loop(self, wake: zmq.Socket[bytes]) -> None:
        bucket = None
        if self.config.link_gbps is not None:
            burst = max(self.config.pacing_burst_bytes, self.config.chunk_bytes)
            bucket = TokenBucket(self.config.link_gbps, burst, time.monotonic())
        poll_s = self.config.poll_interval_s
        next_tcp_read = time.monotonic()
        while not self._stop.is_set():
            timeout_s = min(poll_s, self._streams.pacing_wait_s)
            for sock in self._streams.poll(wake, timeout_s):
                if sock is wake:
                    _drain(wake)
            self._run_commands()
            for header in self._streams.recv_replies():
                self._on_reply(header)
            for stream, reason in self._streams.read_monitors():
                self._on_link_event(stream, reason)
            now = time.monotonic()
            self._streams.pump(self._transfers.values(), bucket, now)
            self._expire(now)
            if now >= next_tcp_read:  # the kernel's view of the link, at its own pace
                self._counters.on_tcp_read(self._tracker.tcp_infos(), now)
                next_tcp_read = now + TCP_READ_INTERVAL_S

    def _run_commands(self) -> None:
        while self._commands:
            self._commands.popleft()()

    def _on_reply(self, header: Header) -> None:
        outbound = self._transfers.get(header.transfer_id)
        if outbound is None:
            return
        if header.control is Control.CREDIT:
            outbound.granted = max(outbound.granted, header.value)
        elif header.control is Control.ACK:
            del self._transfers[header.transfer_id]
            self._release(outbound, notify_peer=False, acked=True)  # counters first: a waiter
            outbound.handle._settle(TransferStatus.DONE, None)  # woken next reads them settled
        elif header.control in (Control.ERROR, Control.CANCEL):
            why = header.message or header.control.name.lower()
            error = TransportError(f"receiver failed {_name(outbound)}: {why}")
            self._fail(outbound, error, notify_peer=False)

    def _on_link_event(self, stream: int | None, reason: str) -> None:
        """Fail transfers a lost connection may have dropped bytes of (all, for auth)."""
        error = TransportError(f"relay to {self.endpoint}: {reason}")
        for outbound in list(self._transfers.values()):
            if stream is None or stream in outbound.streams_used:
                self._fail(outbound, error, notify_peer=False)

    def _expire(self, now: float) -> None:
        for outbound in [o for o in self._transfers.values() if now >= o.deadline_at]:
            error = TransferTimeout(
                f"{_name(outbound)} to {self.endpoint} missed its {outbound.deadline_s:.3g} s "
                f"deadline: {outbound.sent}/{outbound.demand} payload bytes sent, "
                f"{outbound.granted} credited; {self._hint(outbound)}"
            )
            self._fail(outbound, error, notify_peer=True)

    def _hint(self, outbound: Outbound) -> str:
        if self._tracker.auth_failures:
            return "the receiver refused this sender's Curve key"
        if outbound.granted == 0:
            return "no credit ever arrived: receiver dead, unreachable or not listening"
        if not outbound.finishing:
            return "finish() was never called"
        if outbound.items:
            return "waiting for credit: the receiver's consumer is not releasing buffers"
        return "waiting for the receiver's acknowledgement"

    def _fail(self, outbound: Outbound, error: TransportError, *, notify_peer: bool) -> None:
        self._transfers.pop(outbound.handle.transfer_id, None)
        self._release(outbound, notify_peer=notify_peer, acked=False)
        outbound.handle._settle(TransferStatus.FAILED, error)
        _log.warning(
            "relay_transfer_failed", transfer_id=outbound.handle.transfer_id, error=str(error)
        )

    def _fail_all(self, error: TransportError) -> None:
        for outbound in list(self._transfers.values()):
            self._fail(outbound, error, notify_peer=False)

    def _release(self, outbound: Outbound, *, notify_peer: bool, acked: bool) -> None:
        outbound.items.clear()  # drop references to the caller's payloads
        unsent = outbound.demand - outbound.sent
        self._counters.on_settled(outbound.sent, acked, time.monotonic(), unsent)
        if notify_peer:
            self._streams.queue_control(control_header(Control.CANCEL, outbound.handle.transfer_id))


def _drain(sock: zmq.Socket[bytes]) -> None:
    while True:
        try:
            sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def _name(outbound: Outbound) -> str:
    return f"transfer {outbound.handle.transfer_id} (request {outbound.handle.request_id})"
