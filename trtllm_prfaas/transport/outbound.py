"""The sender I/O thread's machinery: per-transfer send state and the set of N streams.

Everything here runs on one ``RelaySender`` I/O thread; nothing is thread-safe on purpose.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import zmq

from trtllm_prfaas.errors import TransportError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport.config import RelayConfig
from trtllm_prfaas.transport.handle import OutboundItem, TransferHandle
from trtllm_prfaas.transport.pacing import TokenBucket
from trtllm_prfaas.transport.security import secure_client
from trtllm_prfaas.transport.stats import ConnectionTracker, PumpState, SendCounters
from trtllm_prfaas.transport.wire import (
    WIRE_VERSION,
    Control,
    Header,
    checksum,
    control_header,
    decode_header,
    encode_header,
)

__all__ = ["Outbound", "StreamSet"]

_log = get_logger(__name__)


@dataclass
class Outbound:
    """Send state of one transfer. Byte counts are cumulative payload bytes."""

    handle: TransferHandle
    deadline_at: float  # monotonic seconds
    deadline_s: float
    items: deque[OutboundItem] = field(default_factory=deque)
    demand: int = 0  # enqueued by the caller
    granted: int = 0  # credited by the receiver
    sent: int = 0  # handed to zmq
    finishing: bool = False
    complete_sent: bool = False
    streams_used: set[int] = field(default_factory=set)  # a lost connection fails these

    def queue_control_on(self, streams: StreamSet, header: Header) -> None:
        """Queue a control message of this transfer (control always travels on stream 0)."""
        self.streams_used.add(0)
        streams.queue_control(header)


class StreamSet:
    """N DEALER sockets connected to one receiver, plus their monitors and a control queue."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        config: RelayConfig,
        tracker: ConnectionTracker,
        counters: SendCounters,
    ) -> None:
        self.config = config
        self.chunk_hook: Callable[[Header, memoryview], memoryview | bytes] | None = None
        self.pacing_wait_s = float("inf")
        self._tracker = tracker
        self._counters = counters
        self._control: deque[bytes] = deque()
        self._next = 0
        self._blocked = False
        self.socks: list[zmq.Socket[bytes]] = []
        self._monitors: list[zmq.Socket[bytes]] = []
        self._poller = zmq.Poller()
        for _ in range(config.num_streams):
            sock = ctx.socket(zmq.DEALER)
            self.socks.append(sock)
            sock.linger = 0
            sock.immediate = 1
            sock.sndhwm = config.sndhwm_msgs
            secure_client(sock, config.security)
            self._monitors.append(tracker.watch(sock))
            sock.connect(endpoint)
        for sock in [*self.socks, *self._monitors]:
            self._poller.register(sock, zmq.POLLIN)

    def poll(self, wake: zmq.Socket[bytes], timeout_s: float) -> list[zmq.Socket[bytes]]:
        """Wait for replies, monitor events, a wake-up or (when blocked) writability."""
        self._poller.register(wake, zmq.POLLIN)
        blocked = bool(self._control) or self._blocked
        for sock in self.socks:
            self._poller.modify(sock, zmq.POLLIN | (zmq.POLLOUT if blocked else 0))
        events = self._poller.poll(max(0, int(timeout_s * 1000)))
        return [sock for sock, _ in events]

    def queue_control(self, header: Header) -> None:
        """Queue a control message; sent before any further data."""
        self._control.append(encode_header(header))

    def recv_replies(self) -> list[Header]:
        """Every control message waiting on any stream (malformed ones are logged, dropped)."""
        out: list[Header] = []
        for sock in self.socks:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    out.append(decode_header(frames[0]))
                except TransportError as exc:
                    _log.warning("relay_bad_reply", error=str(exc))
        return out

    def read_monitors(self) -> list[tuple[int | None, str]]:
        """Consume monitor events; returns ``(stream, reason)`` for lost connections (transfers
        that used that stream must fail) and ``(None, reason)`` for a refused Curve key."""
        reasons: list[tuple[int | None, str]] = []
        for index, monitor in enumerate(self._monitors):
            while monitor.poll(0):
                event = self._tracker.handle(monitor, index)
                if event == zmq.EVENT_DISCONNECTED:
                    reasons.append((index, f"stream {index} lost its connection (receiver gone)"))
                elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    reasons.append((None, "the receiver refused this sender's Curve key"))
        return reasons

    # ---- sending --------------------------------------------------------------------------

    def pump(self, transfers: Iterable[Outbound], bucket: TokenBucket | None, now: float) -> None:
        """Send control messages, then as many credited (and paced) chunks as streams accept;
        tell the counters why sending stopped (link-bound, waiting for credit, or idle)."""
        self._counters.on_pump(self._pump(transfers, bucket, now), now)

    def _pump(
        self, transfers: Iterable[Outbound], bucket: TokenBucket | None, now: float
    ) -> PumpState:
        self._blocked = False
        self.pacing_wait_s = float("inf")
        if not self._flush_control():
            return PumpState.LINK
        pending = list(transfers)
        for outbound in pending:
            if not self._pump_one(outbound, bucket, now):
                return PumpState.LINK
        is_waiting = any(o.items for o in pending)  # what is left waits for credit
        return PumpState.CREDIT if is_waiting else PumpState.IDLE

    def _pump_one(self, outbound: Outbound, bucket: TokenBucket | None, now: float) -> bool:
        """Send ``outbound``'s chunks; False when streams or pacing stop all sending for now."""
        while outbound.items:
            item = outbound.items[0]
            nbytes = min(self.config.chunk_bytes, item.view.nbytes - item.offset)
            if outbound.sent + nbytes > outbound.granted:
                return True  # waiting for credit; other transfers may still send
            if bucket is not None and (wait_s := bucket.wait_s(nbytes, now)) > 0:
                self.pacing_wait_s = wait_s
                return False
            sock = self._writable()
            if sock is None:
                self._blocked = True
                return False
            self._send_chunk(sock, outbound, item, nbytes, now)
            if bucket is not None:
                bucket.try_take(nbytes, now)
        if outbound.finishing and not outbound.complete_sent:
            outbound.complete_sent = True
            transfer_id = outbound.handle.transfer_id
            complete = control_header(Control.COMPLETE, transfer_id, value=outbound.demand)
            outbound.queue_control_on(self, complete)
            return self._flush_control()
        return True

    def _send_chunk(
        self,
        sock: zmq.Socket[bytes],
        outbound: Outbound,
        item: OutboundItem,
        nbytes: int,
        now: float,
    ) -> None:
        payload = item.view[item.offset : item.offset + nbytes]
        header = Header(
            version=WIRE_VERSION,
            kind=item.kind,
            transfer_id=outbound.handle.transfer_id,
            request_id=outbound.handle.request_id,
            layer=item.layer,
            block_start=item.block_start,
            block_end=item.block_end,
            item_index=item.item_index,
            layer_items=item.layer_items,
            offset=item.offset,
            length=nbytes,
            total_bytes=item.view.nbytes,
            checksum=checksum(payload),
        )
        wire_payload = payload if self.chunk_hook is None else self.chunk_hook(header, payload)
        sock.send_multipart([encode_header(header), wire_payload], zmq.NOBLOCK, copy=False)
        stream = self.socks.index(sock)
        outbound.streams_used.add(stream)
        self._counters.on_chunk(stream, nbytes, item.queued_s, now)
        item.offset += nbytes
        outbound.sent += nbytes
        if item.offset == item.view.nbytes:
            outbound.items.popleft()

    def _writable(self) -> zmq.Socket[bytes] | None:
        """The next stream (round-robin) whose queue accepts a message now, if any."""
        n = len(self.socks)
        for k in range(n):
            sock = self.socks[(self._next + k) % n]
            if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT:
                self._next = (self._next + k + 1) % n
                return sock
        return None

    def _flush_control(self) -> bool:
        """Send queued control messages on stream 0; False if it cannot take one now.

        One stream keeps control messages in order (ANNOUNCE before CREDIT before COMPLETE);
        data needs no order, as each chunk says where it goes and is sent only after credit.
        """
        control = self.socks[0]
        while self._control:
            try:
                control.send(self._control[0], zmq.NOBLOCK)
            except zmq.Again:
                self._blocked = True
                return False
            self._control.popleft()
        return True

    def close(self) -> None:
        """Close monitors and sockets (linger 0). Idempotent."""
        self._tracker.close()
        for sock in self.socks:
            sock.close(linger=0)
