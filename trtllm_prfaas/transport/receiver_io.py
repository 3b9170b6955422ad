"""The ``RelayReceiver`` I/O thread: one ROUTER socket, chunk intake, credits, acks, expiry.

State lives in the owning ``RelayReceiver`` and is touched only with its ``cond`` held; replies
are queued in an outbox and sent by this thread alone.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

import zmq

from trtllm_prfaas.errors import TransferTimeout, TransportError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport.pinning import pin_current_thread
from trtllm_prfaas.transport.reassembly import CorruptChunk, Inbound, InboundStatus
from trtllm_prfaas.transport.security import secure_server
from trtllm_prfaas.transport.wire import (
    Control,
    Header,
    Kind,
    checksum,
    control_header,
    decode_header,
    encode_header,
)

if TYPE_CHECKING:
    from trtllm_prfaas.transport.receiver import RelayReceiver

__all__ = ["ReceiverIO"]

_log = get_logger(__name__)
_ids = itertools.count()
_MAX_BATCH = 256  # messages taken per loop turn before commands/credits/expiry run


class ReceiverIO:
    """Owns the ROUTER socket and the thread that serves it."""

    def __init__(
        self, owner: RelayReceiver, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str
    ) -> None:
        self._owner = owner
        self._config = owner.config
        self._outbox: deque[tuple[bytes, Header]] = deque()
        self._grant_needed = False
        self._stop = threading.Event()
        self.closed = False
        self._wake_lock = threading.Lock()
        addr = f"inproc://relay-receiver-wake-{next(_ids)}"
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._router = ctx.socket(zmq.ROUTER)
        for sock in (self._wake_rx, self._wake_tx, self._router):
            sock.linger = 0
        self._wake_rx.bind(addr)
        self._wake_tx.connect(addr)
        self._router.router_mandatory = 1
        self._router.rcvhwm = self._config.rcvhwm_msgs
        secure_server(self._router, self._config.security)
        self._monitor = owner.tracker.watch(self._router)
        try:
            self._router.bind(endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise TransportError(f"relay receiver cannot bind {endpoint}: {exc}") from exc
        self.endpoint = str(self._router.get_string(zmq.LAST_ENDPOINT))
        self._thread = threading.Thread(target=self._run, name="relay-receiver-io", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Wake the I/O thread (from any thread)."""
        with self._wake_lock:
            if not self._wake_tx.closed:
                with contextlib.suppress(zmq.Again):  # wake-ups already pending
                    self._wake_tx.send(b"", zmq.NOBLOCK)

    def close(self) -> None:
        """Stop and join the thread, then close the sockets. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self.poke()
            self._thread.join(self._config.connect_timeout_s + 5.0)
        if self._thread.is_alive():
            raise TransportError("relay receiver I/O thread did not stop")
        with self._wake_lock:
            self._close_sockets()
        self.closed = True

    def _close_sockets(self) -> None:
        self._owner.tracker.close()
        for sock in (self._router, self._wake_rx, self._wake_tx):
            sock.close(linger=0)

    # ---- loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in (self._router, self._wake_rx, self._monitor):
            poller.register(sock, zmq.POLLIN)
        timeout_ms = int(self._config.poll_interval_s * 1000)
        try:
            pin_current_thread(self._config.cpu_affinity)  # checked when the context was made
            while not self._stop.is_set():
                poller.register(self._router, zmq.POLLIN | (zmq.POLLOUT if self._outbox else 0))
                poller.poll(timeout_ms)
                self._turn()
        except Exception:
            _log.exception("relay_receiver_crashed", endpoint=self.endpoint)
            with self._owner.cond:
                for inbound in list(self._owner.transfers.values()):
                    self._fail(inbound, TransportError("relay receiver I/O thread crashed"))

    def _turn(self) -> None:
        while self._wake_rx.poll(0):
            self._wake_rx.recv(zmq.NOBLOCK)
        while self._monitor.poll(0):
            self._owner.tracker.handle(self._monitor, 0)
        for _ in range(_MAX_BATCH):
            if not self._recv_one():
                break
        with self._owner.cond:
            self._run_commands()
            self._expire(time.monotonic())
            if self._grant_needed:
                self._grant()
        self._flush()

    def _run_commands(self) -> None:
        while self._owner.commands:
            command = self._owner.commands.popleft()
            if isinstance(command, tuple):  # a transfer its consumer abandoned
                identity, transfer_id = command
                self._reply_error(
                    identity,
                    transfer_id,
                    f"the receiver's consumer released transfer {transfer_id} before it completed",
                )
            self._grant_needed = True

    def _recv_one(self) -> bool:
        """Take one message off the ROUTER; False when none is waiting.

        Multipart delivery is atomic, so once the routing id is read the rest is there. In frame
        mode (no custom allocator) a data payload is taken as its frame and hashed before the
        lock is taken, so consumers are not held up by the checksum. With an allocator it is
        received straight into its destination (``recv_into``: one copy, GIL released) with the
        lock held, so a consumer cannot free the buffer meanwhile.
        """
        try:
            identity = self._router.recv(zmq.NOBLOCK)
        except zmq.Again:
            return False
        raw_header = self._router.recv(zmq.NOBLOCK) if self._more() else b""
        try:
            header = decode_header(raw_header)
        except TransportError as exc:
            _log.warning("relay_bad_message", error=str(exc))
            self._discard_rest()
            return True
        frame: Frame | None = None
        if header.kind is not Kind.CONTROL and self._owner.keeps_frames and self._more():
            payload = self._router.recv(zmq.NOBLOCK, copy=False).buffer
            frame = Frame(payload, checksum(payload))
        with self._owner.cond:
            if header.kind is Kind.CONTROL:
                self._on_control(identity, header)
            elif frame is None and not self._more():
                self._reply_error(identity, header.transfer_id, "data message without payload")
            else:
                self._on_chunk(identity, header, frame)
        self._discard_rest()
        return True

    def _discard_rest(self) -> None:
        while self._more():
            self._router.recv(zmq.NOBLOCK, copy=False)

    def _more(self) -> bool:
        """Another frame of this message follows (``getsockopt``: the ``rcvmore`` attribute
        costs a few microseconds more per call)."""
        return bool(self._router.getsockopt(zmq.RCVMORE))

    # ---- messages (cond held) -----------------------------------------------------------------

    def _on_control(self, identity: bytes, h: Header) -> None:
        owner, tid = self._owner, h.transfer_id
        if h.control is Control.ANNOUNCE:
            if tid in owner.transfers or tid in owner.finished:
                self._reply_error(identity, tid, "duplicate transfer id")
                return
            deadline_s = min(h.deadline_s, self._config.max_deadline_s)
            deadline_at = time.monotonic() + deadline_s + self._config.expired_grace_s
            owner.transfers[tid] = Inbound(tid, h.request_id, deadline_at, identity)
            return
        inbound = owner.transfers.get(tid)
        if inbound is None:
            self._unknown(identity, tid)
            return
        inbound.reply_to = identity
        if h.control is Control.CREDIT:
            inbound.demand = max(inbound.demand, h.value)
            self._grant_needed = True
        elif h.control is Control.COMPLETE:
            inbound.total_bytes = h.value
            self._maybe_complete(inbound)
        elif h.control is Control.CANCEL:
            self._fail(inbound, TransportError(f"transfer {tid} was cancelled by the sender"))

    def _on_chunk(self, identity: bytes, h: Header, frame: Frame | None) -> None:
        owner = self._owner
        inbound = owner.transfers.get(h.transfer_id)
        if inbound is None or inbound.status is not InboundStatus.RECEIVING:
            if inbound is None:
                self._unknown(identity, h.transfer_id)
            return
        try:
            item = inbound.place(h, owner.allocator, keep_frames=frame is not None)
            if frame is not None:  # the frame becomes the chunk's storage: no copy
                payload = frame.payload
                layer_done = inbound.commit(h, item, payload, payload.nbytes, frame.digest)
            else:
                assert item.dest is not None  # place() allocates one unless keep_frames
                dest = item.dest[h.offset : h.offset + h.length]
                nbytes = _recv_into(self._router, dest)
                layer_done = inbound.commit(h, item, dest, nbytes, None)
        except TransportError as exc:
            owner.counts["corrupt"] += isinstance(exc, CorruptChunk)
            self._fail(inbound, exc, tell_sender=True)
            return
        owner.counts["bytes"] += h.length
        owner.held_bytes += h.length
        owner.max_held_bytes = max(owner.max_held_bytes, owner.held_bytes)
        if layer_done:
            owner.cond.notify_all()
        self._maybe_complete(inbound)

    def _maybe_complete(self, inbound: Inbound) -> None:
        if inbound.status is InboundStatus.RECEIVING and inbound.is_complete:
            inbound.status = InboundStatus.COMPLETE
            inbound.completed_at = time.monotonic()
            self._owner.counts["completed"] += 1
            self._owner.cond.notify_all()
            self._outbox.append(
                (inbound.reply_to, control_header(Control.ACK, inbound.transfer_id))
            )

    def _fail(
        self,
        inbound: Inbound,
        error: TransportError,
        *,
        tell_sender: bool = False,
        count_as: str = "failed",
    ) -> None:
        owner, tid = self._owner, inbound.transfer_id
        inbound.status = InboundStatus.FAILED
        inbound.error = error
        owner.held_bytes -= inbound.release_all()
        owner.transfers.pop(tid, None)
        owner.remember(tid, error)
        owner.counts[count_as] += 1
        owner.cond.notify_all()
        self._grant_needed = True
        if tell_sender:
            self._reply_error(inbound.reply_to, tid, str(error))
        _log.warning("relay_inbound_failed", transfer_id=tid, error=str(error))

    def _unknown(self, identity: bytes, transfer_id: str) -> None:
        if transfer_id in self._owner.finished:
            return  # late message of a finished transfer
        why = f"unknown transfer {transfer_id}: the receiver restarted or never saw its ANNOUNCE"
        self._owner.remember(transfer_id, TransportError(why))
        self._reply_error(identity, transfer_id, why)

    def _reply_error(self, identity: bytes, transfer_id: str, message: str) -> None:
        self._outbox.append((identity, control_header(Control.ERROR, transfer_id, message=message)))

    def _grant(self) -> None:
        self._grant_needed = False
        for inbound in self._owner.ledger.grant(self._owner.transfers.values()):
            header = control_header(Control.CREDIT, inbound.transfer_id, value=inbound.granted)
            self._outbox.append((inbound.reply_to, header))

    def _expire(self, now: float) -> None:
        """Fail transfers past their deadline, and drop complete ones nobody claimed within
        ``unclaimed_hold_s``: either way their buffers and credit go back to the others."""
        hold_s = self._config.unclaimed_hold_s
        for inbound in list(self._owner.transfers.values()):
            if inbound.status is InboundStatus.RECEIVING and now > inbound.deadline_at:
                error = TransferTimeout(
                    f"transfer {inbound.transfer_id} expired on the receiver: "
                    f"{inbound.received} bytes arrived before its deadline"
                )
                self._fail(inbound, error, tell_sender=True)
            elif (
                inbound.status is InboundStatus.COMPLETE
                and not inbound.is_claimed
                and inbound.completed_at is not None
                and now > inbound.completed_at + hold_s
            ):
                _log.warning(
                    "relay_transfer_unclaimed_dropped",
                    transfer_id=inbound.transfer_id,
                    request_id=inbound.request_id,
                    held_bytes=inbound.received,
                    hold_s=hold_s,
                )
                why = f"transfer {inbound.transfer_id} complete but unclaimed for {hold_s:g} s"
                self._fail(inbound, TransportError(why), count_as="unclaimed_dropped")

    def _flush(self) -> None:
        while self._outbox:
            identity, header = self._outbox[0]
            try:
                self._router.send_multipart([identity, encode_header(header)], zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                # the peer is gone; nothing to tell
            self._outbox.popleft()


class Frame(NamedTuple):
    """A data payload taken off the wire as its ZeroMQ frame, and its checksum."""

    payload: memoryview
    digest: int


def _recv_into(sock: zmq.Socket[bytes], dest: memoryview) -> int:
    """Receive the next frame into ``dest``; returns the frame's full length (may exceed it)."""
    if hasattr(sock, "recv_into"):  # pyzmq >= 26.4: zmq_recv without the GIL, no Frame object
        return int(sock.recv_into(dest, flags=zmq.NOBLOCK))
    frame = sock.recv(zmq.NOBLOCK, copy=False).buffer
    if frame.nbytes == dest.nbytes:
        dest[:] = frame
    return frame.nbytes
