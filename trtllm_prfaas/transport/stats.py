"""Per-link relay statistics, including the kernel's TCP counters for the relay's own sockets.

How TCP counters are read: libzmq does not expose the fds of its TCP connections (``ZMQ_FD`` is
only the signalling fd), but its *socket monitor* reports every connection's fd in the
``EVENT_CONNECTED``/``EVENT_ACCEPTED`` message. ``ConnectionTracker`` consumes those events and
keeps the live fds; ``read_tcp_info`` then calls ``getsockopt(IPPROTO_TCP, TCP_INFO)`` on each
(through ``socket.socket(fileno=fd)`` + ``detach()``, so the fd stays libzmq's) and decodes
``struct tcp_info`` (Linux only; other OSes give ``None``). ``tcpi_total_retrans`` is the
connection's retransmitted-segment count; on loopback it reads 0.

Link-bound time (``SendCounters.on_pump``): after each pump the sender's I/O thread says why it
stopped: ``LINK`` (credited data ready, held back by the pacer or by stream queues at their
high-water mark), ``CREDIT`` (data ready, no credit from the receiver) or ``IDLE`` (nothing ready:
the producer is the bottleneck, or there is no work). The time until the next pump, and the
bytes that pump hands over, are charged to that state; bytes over link-bound time is the rate
the link drains at (``policy/link_estimate.py`` turns it into a capacity estimate). With
``TCP_INFO``, ``LinkStats.tcp_bound_s`` / ``tcp_bound_gbit`` add the kernel's view: time
between two reads that both found a connection with bytes queued in the kernel
(``tcpi_notsent_bytes > 0``) and a rate sample not application-limited, and the bytes TCP
acknowledged meanwhile: what a link shaped below the sender's own queues (``tc tbf``) shows,
where the receiver's credit (whose round trip crosses the same link), not the sender's queues,
holds the sender back.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = [
    "TCP_READ_INTERVAL_S",
    "ConnectionTracker",
    "LinkStats",
    "PumpState",
    "ReceiverStats",
    "SendCounters",
    "StreamStats",
    "TcpInfo",
    "read_tcp_info",
    "relay_report_fields",
]

_TCP_INFO_LEN = 232
# struct tcp_info offsets (linux/tcp.h): u8 state @0, delivery_rate_app_limited bit 0 of @7;
# u32 unacked @24, retrans @36, rtt @68 (us), snd_cwnd @80, total_retrans @100;
# u64 bytes_acked @120, bytes_received @128; u32 segs_out @136, notsent_bytes @144;
# u64 delivery_rate @160 (bytes/s).
# The sender's I/O thread reads TCP_INFO about this often (its loop wakes at least every
# poll_interval_s). Often, because an interval counts as link-bound when the reads at both its
# ends find the kernel backlogged: a slow producer's burst on a fast link drains within
# milliseconds, so two reads 20 ms apart rarely both catch one, while a slow link stays
# backlogged. Two reads further apart than TCP_READ_GAP_S say nothing about the time between.
TCP_READ_INTERVAL_S = 0.02
TCP_READ_GAP_S = 0.2
_TCP_INFO_RATE_LEN = 168  # kernels older than 4.9 stop before delivery_rate: rate reads 0
_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CLOSED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


@dataclass(frozen=True)
class TcpInfo:
    """Kernel view of one TCP connection (``TCP_INFO``)."""

    local_port: int
    remote_port: int
    state: int
    rtt_us: int
    snd_cwnd: int
    retrans: int  # segments retransmitted and not yet acknowledged
    total_retrans: int  # all retransmissions over the connection's life
    bytes_acked: int
    bytes_received: int
    segs_out: int = 0
    notsent_bytes: int = 0  # queued in the kernel, not yet sent (the link or cwnd holds them)
    delivery_rate_bps: int = 0  # bytes/s of the latest delivery-rate sample
    is_app_limited: bool = True  # that sample was limited by the application, not the path
    unacked_segs: int = 0  # segments in flight

    @property
    def is_active(self) -> bool:
        """Bytes in flight or queued in the kernel: its delivery rate is current."""
        return self.notsent_bytes > 0 or self.unacked_segs > 0

    @property
    def is_link_limited(self) -> bool:
        """The kernel holds unsent bytes and its latest rate sample was not app-limited."""
        return self.notsent_bytes > 0 and not self.is_app_limited and self.delivery_rate_bps > 0


def read_tcp_info(fd: int) -> TcpInfo | None:
    """``TCP_INFO`` of the TCP socket ``fd`` or ``None`` (not Linux, not a TCP socket, closed)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        local, peer = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    finally:
        sock.detach()
    if len(raw) < 136:
        return None
    retrans, rtt, cwnd, total = (struct.unpack_from("=I", raw, off)[0] for off in (36, 68, 80, 100))
    acked, received = struct.unpack_from("=QQ", raw, 120)
    segs_out = notsent = rate = 0
    unacked = struct.unpack_from("=I", raw, 24)[0]
    limited = True
    if len(raw) >= _TCP_INFO_RATE_LEN:
        segs_out, notsent = (struct.unpack_from("=I", raw, off)[0] for off in (136, 144))
        rate, limited = struct.unpack_from("=Q", raw, 160)[0], bool(raw[7] & 1)
    return TcpInfo(
        local[1], peer[1], raw[0], rtt, cwnd, retrans, total, acked, received,
        segs_out, notsent, rate, limited, unacked,
    )  # fmt: skip


class ConnectionTracker:
    """Follows the TCP connections of monitored zmq sockets (fds, auth failures).

    ``watch`` is called by the owner of the socket; ``handle`` by its I/O thread when the
    returned monitor socket is readable; ``tcp_infos`` from any thread. ``close`` disables and
    closes every monitor socket (call it from the thread that owns the sockets).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}  # fd -> index of the watched socket
        self._monitors: list[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]] = []
        self._handshaken: dict[int, int] = {}  # fd -> index, ZMTP/Curve handshake done
        self.auth_failures = 0
        self.disconnects = 0

    def watch(self, sock: zmq.Socket[bytes]) -> zmq.Socket[bytes]:
        """Start monitoring ``sock``; returns the monitor socket to poll."""
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        monitor.linger = 0
        self._monitors.append((sock, monitor))
        return monitor

    def handle(self, monitor: zmq.Socket[bytes], index: int) -> int:
        """Consume one event from ``monitor``; returns the event id."""
        msg = recv_monitor_message(monitor, zmq.NOBLOCK)
        event, value = int(msg["event"]), int(msg["value"])
        with self._lock:
            if event in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self._fds[value] = index
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken.update((fd, i) for fd, i in self._fds.items() if i == index)
            elif event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self._fds.pop(value, None)
                self._handshaken.pop(value, None)
                self.disconnects += 1
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.auth_failures += 1
        return event

    def ready_indices(self) -> frozenset[int]:
        """Indices of watched sockets with at least one connection past its handshake."""
        with self._lock:
            return frozenset(self._handshaken.values())

    def tcp_infos(self) -> dict[int, tuple[TcpInfo, ...]]:
        """Live connections' ``TcpInfo`` grouped by watched-socket index."""
        with self._lock:
            fds = dict(self._fds)
        out: dict[int, list[TcpInfo]] = {}
        for fd, index in sorted(fds.items()):
            info = read_tcp_info(fd)
            if info is not None:
                out.setdefault(index, []).append(info)
        return {index: tuple(infos) for index, infos in out.items()}

    def close(self) -> None:
        """Disable monitoring and close the monitor sockets. Idempotent."""
        for sock, monitor in self._monitors:
            if not sock.closed:
                sock.disable_monitor()
            monitor.close(linger=0)
        self._monitors.clear()


@dataclass(frozen=True)
class StreamStats:
    """One sender stream (one zmq socket, normally one TCP connection)."""

    index: int
    bytes_sent: int
    chunks_sent: int
    throughput_gbps: float
    tcp: tuple[TcpInfo, ...]


@dataclass(frozen=True)
class LinkStats:
    """Sender-side view of one relay link.

    ``goodput_gbps`` counts payload bytes of transfers the receiver acknowledged, over the time
    the link was busy (some payload sent and not yet settled) up to the last acknowledgement:
    the rate the link delivered while it had work, not diluted by idle gaps between transfers
    (an estimate of what it can carry; it reads low when the producer, not the link, is slow).
    ``bytes_in_flight`` is payload sent for transfers not yet acknowledged (at most the credit
    granted); ``bytes_queued`` is payload the producer handed to ``send`` and the sender has not
    yet handed to zmq (waiting for credit, the pacer or room in the stream queues): together,
    the relay's backlog, which the router divides by the live link estimate for the prospective
    relay delay (how long KV handed over now waits for the link). Send-queue delay is the time
    from ``handle.send`` to the chunk being handed to zmq. ``tcp_total_retrans`` is ``None``
    where the OS does not expose ``TCP_INFO``.
    """

    endpoint: str
    bytes_sent: int
    bytes_acked: int
    elapsed_s: float
    goodput_gbps: float
    bytes_in_flight: int
    send_queue_delay_avg_s: float
    send_queue_delay_max_s: float
    streams: tuple[StreamStats, ...]
    tcp_total_retrans: int | None
    auth_failures: int
    # Why the sender was not sending (cumulative seconds; see the module doc), the bytes it
    # handed over while link-bound, the summed send-queue delay behind the average, and the
    # kernel's view (``None`` / 0 without ``TCP_INFO``).
    link_wait_s: float = 0.0
    link_wait_bytes: int = 0
    credit_wait_s: float = 0.0
    send_queue_delay_sum_s: float = 0.0
    chunks_sent: int = 0
    tcp_segs_out: int | None = None
    tcp_delivery_gbps: float = 0.0  # now: the kernel's link rate (0: not link-limited)
    tcp_bound_s: float = 0.0  # time the kernel showed the link as the bottleneck
    tcp_bound_gbit: float = 0.0  # gigabits TCP saw acknowledged meanwhile
    bytes_queued: int = 0  # now: handed to ``send``, not yet to zmq


class PumpState(Enum):
    """Why a pump of the sender's I/O thread stopped sending (see the module doc)."""

    IDLE = "idle"  # nothing credited and ready: the producer is the bottleneck (or no work)
    CREDIT = "credit"  # data ready, waiting for the receiver's credit
    LINK = "link"  # data credited and ready, held by the pacer or full stream queues


@dataclass(frozen=True)
class ReceiverStats:
    """Receiver-side view: bytes, buffer occupancy against the credit budget, failures."""

    endpoint: str
    bytes_received: int
    buffered_bytes: int  # received + granted-not-yet-received, not released by the consumer
    max_buffered_bytes: int
    corrupt_chunks: int
    transfers_completed: int
    transfers_failed: int
    num_connections: int
    tcp_total_retrans: int | None
    transfers_unclaimed_dropped: int = 0  # complete, untouched for unclaimed_hold_s (config)


@dataclass
class SendCounters:
    """Mutable sender counters, written by the I/O thread under ``lock``."""

    num_streams: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    first_send_s: float | None = None
    last_ack_s: float | None = None
    busy_since_s: float | None = None  # start of the current busy stretch (payload in flight)
    busy_s: float = 0.0  # length of the finished busy stretches
    bytes_sent: int = 0
    bytes_acked: int = 0
    bytes_in_flight: int = 0
    bytes_queued: int = 0  # enqueued by the producer, not yet handed to zmq
    delay_sum_s: float = 0.0
    delay_max_s: float = 0.0
    chunks: int = 0
    stream_bytes: list[int] = field(default_factory=list)
    stream_chunks: list[int] = field(default_factory=list)
    pump_state: PumpState = PumpState.IDLE
    pump_state_since_s: float | None = None
    pump_bytes: int = 0  # handed over since the last on_pump
    link_wait_s: float = 0.0
    link_wait_bytes: int = 0
    credit_wait_s: float = 0.0
    tcp_seen_s: float | None = None  # the previous snapshot's TCP_INFO read: when, and
    tcp_seen: tuple[int, float] | None = None  # (bytes acked, link rate) it saw
    tcp_bound_s: float = 0.0
    tcp_bound_gbit: float = 0.0

    def __post_init__(self) -> None:
        self.stream_bytes = [0] * self.num_streams
        self.stream_chunks = [0] * self.num_streams

    def on_enqueued(self, nbytes: int) -> None:
        """The producer handed ``nbytes`` of payload to a transfer."""
        with self.lock:
            self.bytes_queued += nbytes

    def on_chunk(self, stream: int, nbytes: int, queued_s: float, now_s: float) -> None:
        """A chunk was handed to zmq on ``stream`` after waiting ``now_s - queued_s``."""
        with self.lock:
            self.bytes_queued -= nbytes
            if self.first_send_s is None:
                self.first_send_s = now_s
            delay = now_s - queued_s
            self.delay_sum_s += delay
            self.delay_max_s = max(self.delay_max_s, delay)
            self.chunks += 1
            self.bytes_sent += nbytes
            if self.busy_since_s is None:
                self.busy_since_s = now_s
            self.bytes_in_flight += nbytes
            self.stream_bytes[stream] += nbytes
            self.stream_chunks[stream] += 1
            self.pump_bytes += nbytes

    def on_pump(self, state: PumpState, now_s: float) -> None:
        """A pump ended in ``state``: charge the time since the previous pump, and the bytes
        handed over since, to the state the previous pump ended in."""
        with self.lock:
            since, previous = self.pump_state_since_s, self.pump_state
            if since is not None and previous is PumpState.LINK:
                self.link_wait_s += max(now_s - since, 0.0)
                self.link_wait_bytes += self.pump_bytes
            elif since is not None and previous is PumpState.CREDIT:
                self.credit_wait_s += max(now_s - since, 0.0)
            self.pump_bytes = 0
            self.pump_state, self.pump_state_since_s = state, now_s

    def on_settled(self, sent_bytes: int, acked: bool, now_s: float, unsent_bytes: int = 0) -> None:
        """A transfer that had sent ``sent_bytes`` ended (acknowledged or not), leaving
        ``unsent_bytes`` of what it was given unsent (dropped with it)."""
        with self.lock:
            self.bytes_in_flight -= sent_bytes
            self.bytes_queued -= unsent_bytes
            if acked:
                self.bytes_acked += sent_bytes
                self.last_ack_s = now_s
            if self.bytes_in_flight == 0 and self.busy_since_s is not None:
                self.busy_s += now_s - self.busy_since_s
                self.busy_since_s = None

    def busy_until_last_ack_s(self) -> float:
        """Busy time that acknowledged bytes can be credited to (call with ``lock`` held)."""
        ongoing = 0.0
        if self.busy_since_s is not None and self.last_ack_s is not None:
            ongoing = max(self.last_ack_s - self.busy_since_s, 0.0)
        return self.busy_s + ongoing

    def on_tcp_read(self, tcp: dict[int, tuple[TcpInfo, ...]], now_s: float) -> None:
        """A ``TCP_INFO`` read of every connection, by the sender's I/O thread every
        ``TCP_READ_INTERVAL_S`` (so the kernel's view does not depend on how often, or whether,
        anyone calls ``stats()``: a worker reports between engine steps, seconds apart during a
        long prefill)."""
        with self.lock:
            self._on_tcp_read([info for infos in tcp.values() for info in infos], now_s)

    def _on_tcp_read(self, infos: Sequence[TcpInfo], now_s: float) -> float:
        """One ``TCP_INFO`` read (call with ``lock``): when it and the previous read both show
        the link limiting, and at most ``TCP_READ_GAP_S`` apart, the interval counts as
        kernel-link-bound and the bytes the kernel saw acknowledged in it (all connections) as
        what the link delivered meanwhile. Returns this read's instantaneous link rate."""
        delivery_gbps = _delivery_gbps(infos)
        acked = sum(i.bytes_acked for i in infos)
        previous = self.tcp_seen
        dt = now_s - self.tcp_seen_s if self.tcp_seen_s is not None else 0.0
        if previous is not None and delivery_gbps > 0 and previous[1] > 0:
            delta = acked - previous[0]  # < 0: a connection closed, its count went with it
            if delta >= 0 and 0 < dt <= TCP_READ_GAP_S:
                self.tcp_bound_s += dt
                self.tcp_bound_gbit += delta * 8 / 1e9
        self.tcp_seen, self.tcp_seen_s = (acked, delivery_gbps), now_s
        return delivery_gbps

    def snapshot(
        self, endpoint: str, tcp: dict[int, tuple[TcpInfo, ...]], auth_failures: int, now_s: float
    ) -> LinkStats:
        """A frozen ``LinkStats`` at ``now_s``."""
        with self.lock:
            start = self.first_send_s if self.first_send_s is not None else now_s
            elapsed = max(now_s - start, 1e-9)
            busy = max(self.busy_until_last_ack_s(), 1e-9)
            streams = tuple(
                StreamStats(i, b, c, b * 8 / elapsed / 1e9, tcp.get(i, ()))
                for i, (b, c) in enumerate(zip(self.stream_bytes, self.stream_chunks, strict=True))
            )
            infos = [info for infos in tcp.values() for info in infos]
            delivery_gbps = self._on_tcp_read(infos, now_s)
            return LinkStats(
                endpoint=endpoint,
                bytes_sent=self.bytes_sent,
                bytes_acked=self.bytes_acked,
                elapsed_s=elapsed,
                goodput_gbps=self.bytes_acked * 8 / busy / 1e9,
                bytes_in_flight=self.bytes_in_flight,
                send_queue_delay_avg_s=self.delay_sum_s / max(self.chunks, 1),
                send_queue_delay_max_s=self.delay_max_s,
                streams=streams,
                tcp_total_retrans=sum(i.total_retrans for i in infos) if infos else None,
                auth_failures=auth_failures,
                link_wait_s=self.link_wait_s,
                link_wait_bytes=self.link_wait_bytes,
                credit_wait_s=self.credit_wait_s,
                send_queue_delay_sum_s=self.delay_sum_s,
                chunks_sent=self.chunks,
                tcp_segs_out=sum(i.segs_out for i in infos) if infos else None,
                tcp_delivery_gbps=delivery_gbps,
                tcp_bound_s=self.tcp_bound_s,
                tcp_bound_gbit=self.tcp_bound_gbit,
                bytes_queued=self.bytes_queued,
            )


def _delivery_gbps(infos: Sequence[TcpInfo]) -> float:
    """The link's rate as the kernel sees it, when some connection is link-limited (bytes
    queued in the kernel, its latest rate sample not app-limited): the delivery rates of every
    connection with bytes in flight, summed (the streams share the link, each at its share of
    it). 0 when none is link-limited: then the path is not the bottleneck."""
    if not any(i.is_link_limited for i in infos):
        return 0.0
    return sum(i.delivery_rate_bps for i in infos if i.is_active) * 8 / 1e9


def relay_report_fields(links: Sequence[LinkStats]) -> dict[str, Any]:
    """``LoadReport``'s ``relay_*`` sender counters: sums over a worker's links."""
    return {
        "relay_bytes_out": sum(link.bytes_sent for link in links),
        "relay_link_wait_s": sum(link.link_wait_s for link in links),
        "relay_link_wait_bytes": sum(link.link_wait_bytes for link in links),
        "relay_credit_wait_s": sum(link.credit_wait_s for link in links),
        "relay_send_delay_sum_s": sum(link.send_queue_delay_sum_s for link in links),
        "relay_chunks_sent": sum(link.chunks_sent for link in links),
        "relay_tcp_retrans": sum(link.tcp_total_retrans or 0 for link in links),
        "relay_tcp_segs_out": sum(link.tcp_segs_out or 0 for link in links),
        "relay_tcp_delivery_gbps": sum(link.tcp_delivery_gbps for link in links),
        "relay_tcp_bound_s": max((link.tcp_bound_s for link in links), default=0.0),
        "relay_tcp_bound_gbit": sum(link.tcp_bound_gbit for link in links),
        "relay_bytes_backlog": sum(link.bytes_queued + link.bytes_in_flight for link in links),
    }
