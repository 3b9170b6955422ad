"""``RelayReceiver``: accept relay streams, reassemble items into host buffers, signal layers.

Sockets: one ROUTER bound to the endpoint (``tcp://127.0.0.1:0`` picks a port; ``endpoint``
reads the real one back). Each sender stream is its own DEALER socket and so its own TCP
connection to this ROUTER; one bound port keeps deployment simple and the routing id tells
the receiver which connection to answer on.

Threads: one I/O thread owns the ROUTER; consumers call ``wait_layer``/``completed_layers``/
``release_*`` from any thread (one lock + condition). With Curve, a ZAP authenticator thread
accepts only the configured client keys.

Contract for consumers: a layer is signalled once every item of it arrived and verified; its
buffers stay valid until ``release_layer``/``release``; released bytes return to the senders
as credit. Without an ``allocator`` the verified chunks stay in the ZeroMQ frames they arrived
in (no copy on the I/O thread; ``ReceivedItem`` says what ``buffer`` and ``chunks`` cost);
with one, chunks are received straight into the allocator's buffers (one copy). A completed
transfer keeps its buffers until ``release(transfer_id)``. A corrupt chunk fails its transfer
(buffers dropped, sender told with an ERROR). Transfers past their deadline (plus
``expired_grace_s``; a sender's deadline counts up to ``max_deadline_s``) or cancelled by the
sender are dropped, and so is a complete transfer no consumer touched within
``unclaimed_hold_s``: no peer, stalling or sending what nobody claims, holds the credit budget
that other transfers need past those bounds.

Restart: a new receiver on the same port starts empty; senders reconnect by themselves. A
transfer in flight during the restart fails cleanly on the sender (connection lost, or the
new receiver answers ERROR "unknown transfer"); transfers opened after the restart succeed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from types import TracebackType

from trtllm_prfaas.errors import TransferTimeout, TransportError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport.buffers import BufferAllocator, HeapAllocator, retain_freed_heap
from trtllm_prfaas.transport.config import RelayConfig
from trtllm_prfaas.transport.pinning import relay_context
from trtllm_prfaas.transport.reassembly import CreditLedger, Inbound, InboundStatus, ReceivedItem
from trtllm_prfaas.transport.receiver_io import ReceiverIO
from trtllm_prfaas.transport.security import ServerAuth, warn_if_plaintext
from trtllm_prfaas.transport.stats import ConnectionTracker, ReceiverStats

__all__ = ["RelayReceiver"]

_log = get_logger(__name__)


class RelayReceiver:
    """Receiver side of relay links (any number of senders). Context manager."""

    def __init__(
        self,
        config: RelayConfig,
        endpoint: str = "tcp://127.0.0.1:0",
        *,
        allocator: BufferAllocator | None = None,
    ) -> None:
        self.config = config
        # No allocator: chunks stay in the frames they arrived in (no copy, see ReceivedItem);
        # the heap allocator then only backs contiguous views of multi-chunk items.
        self.keeps_frames = allocator is None
        self.allocator: BufferAllocator = allocator or HeapAllocator(config.credit_bytes)
        self.cond = threading.Condition()
        self.transfers: dict[str, Inbound] = {}
        self.finished: OrderedDict[str, TransportError] = OrderedDict()  # tombstones
        self.ledger = CreditLedger(config.credit_bytes)
        self.tracker = ConnectionTracker()
        self.held_bytes = 0
        self.max_held_bytes = 0
        self.counts = {"bytes": 0, "corrupt": 0, "completed": 0, "failed": 0,
                       "unclaimed_dropped": 0}  # fmt: skip
        # From consumer threads to the I/O thread: "grant", or (sender identity, transfer id) of
        # a transfer released before it completed, whose sender must be told to stop.
        self.commands: deque[str | tuple[bytes, str]] = deque()
        retain_freed_heap(config.credit_bytes)  # ZeroMQ's message buffers stay warm (buffers.py)
        self._ctx = relay_context(config.io_threads, config.cpu_affinity)
        self._ctx.linger = 0
        self._auth = ServerAuth(self._ctx, config.security)
        try:
            self._io = ReceiverIO(self, self._ctx, endpoint)
        except Exception:
            self._auth.close()
            self._ctx.term()
            raise
        self.endpoint = self._io.endpoint
        warn_if_plaintext(config.security, "receiver", self.endpoint)

    # ---- consumer API ------------------------------------------------------------------------

    def wait_layer(
        self, transfer_id: str, layer: int, timeout_s: float
    ) -> tuple[ReceivedItem, ...]:
        """Block until ``layer`` of ``transfer_id`` fully arrived; its items by index.

        Raises the transfer's TransportError if it failed, TransferTimeout after ``timeout_s``.
        """
        with self.cond:
            if not self.cond.wait_for(lambda: self._layer_settled(transfer_id, layer), timeout_s):
                raise TransferTimeout(
                    f"layer {layer} of transfer {transfer_id} not complete after {timeout_s:.3g} s"
                )
            inbound = self._live(transfer_id)
            if layer not in inbound.completed_layers:
                raise TransportError(f"transfer {transfer_id} completed without layer {layer}")
            inbound.is_claimed = True
            return self._items(inbound, layer)

    def completed_layers(self, transfer_id: str) -> frozenset[int]:
        """Layers of ``transfer_id`` complete so far (empty if unknown). Never blocks."""
        with self.cond:
            inbound = self.transfers.get(transfer_id)
            return frozenset(inbound.completed_layers) if inbound else frozenset()

    def layer_items(self, transfer_id: str, layer: int) -> tuple[ReceivedItem, ...]:
        """Items of a completed layer; TransportError if not complete (or failed)."""
        with self.cond:
            inbound = self._live(transfer_id)
            if layer not in inbound.completed_layers:
                raise TransportError(f"layer {layer} of transfer {transfer_id} is not complete")
            inbound.is_claimed = True
            return self._items(inbound, layer)

    def wait_transfer(self, transfer_id: str, timeout_s: float) -> frozenset[int]:
        """Block until the whole transfer arrived; returns its layers. Raises like wait_layer."""
        with self.cond:
            if not self.cond.wait_for(lambda: self._transfer_settled(transfer_id), timeout_s):
                raise TransferTimeout(
                    f"transfer {transfer_id} not complete after {timeout_s:.3g} s"
                )
            inbound = self._live(transfer_id)
            inbound.is_claimed = True
            return frozenset(inbound.completed_layers)

    def status(self, transfer_id: str) -> InboundStatus | None:
        """Status of a live transfer; FAILED for a remembered failure; None if unknown."""
        with self.cond:
            inbound = self.transfers.get(transfer_id)
            if inbound is not None:
                return inbound.status
            return InboundStatus.FAILED if transfer_id in self.finished else None

    def release_layer(self, transfer_id: str, layer: int) -> None:
        """Give a consumed layer's buffers back (to the allocator, and as sender credit)."""
        with self.cond:
            inbound = self.transfers.get(transfer_id)
            if inbound is not None:
                self.held_bytes -= inbound.release_layer(layer)
        self._request_grant()

    def release(self, transfer_id: str) -> None:
        """Drop a transfer and all its buffers (call it once done with a completed transfer).

        Releasing a transfer still receiving abandons it: its sender gets an ERROR and stops."""
        with self.cond:
            inbound = self.transfers.pop(transfer_id, None)
            if inbound is not None:
                self.held_bytes -= inbound.release_all()
                self.remember(transfer_id, TransportError(f"transfer {transfer_id} was released"))
                if inbound.status is InboundStatus.RECEIVING and inbound.reply_to:
                    # Abandoned mid-way (e.g. the decode request was cancelled): the sender
                    # would otherwise wait for an acknowledgement until its deadline.
                    self.commands.append((inbound.reply_to, transfer_id))
        self._request_grant()

    def stats(self) -> ReceiverStats:
        """Counters, buffer occupancy and the kernel's TCP counters of accepted connections."""
        infos = [info for group in self.tracker.tcp_infos().values() for info in group]
        with self.cond:
            return ReceiverStats(
                endpoint=self.endpoint,
                bytes_received=self.counts["bytes"],
                buffered_bytes=sum(t.outstanding for t in self.transfers.values()),
                max_buffered_bytes=self.max_held_bytes,
                corrupt_chunks=self.counts["corrupt"],
                transfers_completed=self.counts["completed"],
                transfers_failed=self.counts["failed"],
                transfers_unclaimed_dropped=self.counts["unclaimed_dropped"],
                num_connections=len(infos),
                tcp_total_retrans=sum(i.total_retrans for i in infos) if infos else None,
            )

    def close(self) -> None:
        """Stop and join the I/O thread and authenticator, drop buffers, close. Idempotent."""
        self._io.close()
        self._auth.close()
        with self.cond:
            for transfer_id, inbound in self.transfers.items():
                inbound.release_all()
                self.remember(transfer_id, TransportError(f"receiver closed ({transfer_id})"))
            self.transfers.clear()
            self.cond.notify_all()
        if not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> RelayReceiver:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ---- shared with the I/O thread (call with ``cond`` held) --------------------------------

    def remember(self, transfer_id: str, error: TransportError) -> None:
        """Tombstone a finished transfer id so late chunks are dropped and waits raise ``error``."""
        self.finished[transfer_id] = error
        while len(self.finished) > self.config.tombstones:
            self.finished.popitem(last=False)

    def _request_grant(self) -> None:
        self.commands.append("grant")
        self._io.poke()

    def _live(self, transfer_id: str) -> Inbound:
        inbound = self.transfers.get(transfer_id)
        if inbound is None:
            known = self.finished.get(transfer_id)
            raise known or TransportError(f"unknown transfer {transfer_id}")
        if inbound.error is not None:
            raise inbound.error
        return inbound

    def _layer_settled(self, transfer_id: str, layer: int) -> bool:
        inbound = self.transfers.get(transfer_id)
        if inbound is None:
            return transfer_id in self.finished or self._io.closed
        return layer in inbound.completed_layers or inbound.status is not InboundStatus.RECEIVING

    def _transfer_settled(self, transfer_id: str) -> bool:
        inbound = self.transfers.get(transfer_id)
        if inbound is None:
            return transfer_id in self.finished or self._io.closed
        return inbound.status is not InboundStatus.RECEIVING

    @staticmethod
    def _items(inbound: Inbound, layer: int) -> tuple[ReceivedItem, ...]:
        state = inbound.layers[layer]
        if state.released:
            raise TransportError(f"layer {layer} of transfer {inbound.transfer_id} was released")
        return tuple(state.items[i] for i in sorted(state.items))
