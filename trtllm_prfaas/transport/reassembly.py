"""Receiver-side state of inbound transfers: chunk placement, verification, layer completion,
and the credit ledger. Plain data, no sockets and no locks (the receiver holds its lock).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from trtllm_prfaas.errors import TransportError
from trtllm_prfaas.transport.buffers import BufferAllocator, ItemKey
from trtllm_prfaas.transport.wire import Header, checksum

__all__ = [
    "CorruptChunk",
    "CreditLedger",
    "Inbound",
    "InboundStatus",
    "LayerState",
    "ReceivedItem",
]


class CorruptChunk(TransportError):
    """A chunk's payload does not match its header's checksum (XXH3-64): the transfer fails."""


class InboundStatus(enum.Enum):
    """Life of an inbound transfer; COMPLETE keeps buffers until the consumer releases them."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class ReceivedItem:
    """One received item; its bytes stay valid until the consumer releases it.

    Where the bytes live: with a custom ``BufferAllocator`` every chunk is received straight
    into the allocator's destination buffer (``dest``). Without one (the default), each
    verified chunk stays in the ZeroMQ frame it arrived in, with no copy: ``chunks`` gives
    those pieces; ``buffer`` is the single piece of a one-chunk item, and for a larger item is
    assembled on first access into a recycled host buffer (one copy, on the consumer's thread).
    Views are writable; reading one after release raises ValueError.
    """

    key: ItemKey
    nbytes: int
    allocator: BufferAllocator  # owns ``dest`` and any assembled buffer
    dest: memoryview | None = None  # custom-allocator mode; None in frame mode
    received: int = 0
    offsets: set[int] = field(default_factory=set)
    pieces: dict[int, memoryview] = field(default_factory=dict)  # frame mode: offset -> bytes
    released: bool = False
    _assembled: memoryview | None = None

    @property
    def is_done(self) -> bool:
        return self.received == self.nbytes

    @property
    def buffer(self) -> memoryview:
        """The item's bytes as one contiguous view (see the class docstring for the cost)."""
        if self.dest is not None:
            return self.dest
        if self.released:
            raise ValueError(f"{self.key} was released")
        if len(self.pieces) == 1:
            return next(iter(self.pieces.values()))
        if self._assembled is None:
            out = self.allocator.allocate(self.key, self.nbytes)
            for offset, piece in self.pieces.items():
                out[offset : offset + piece.nbytes] = piece
            self._assembled = out
        return self._assembled

    @property
    def chunks(self) -> tuple[tuple[int, memoryview], ...]:
        """``(offset, bytes)`` pieces in offset order, without copying."""
        if self.dest is not None:
            return ((0, self.dest),)
        if self.released:
            raise ValueError(f"{self.key} was released")
        return tuple(sorted(self.pieces.items()))

    def release(self) -> None:
        """Give the bytes back (frames to ZeroMQ's allocator, buffers to ``allocator``)."""
        self.released = True
        if self.dest is not None:
            self.allocator.free(self.key, self.dest)
        if self._assembled is not None:
            self.allocator.free(self.key, self._assembled)
            self._assembled = None
        for piece in self.pieces.values():
            with contextlib.suppress(BufferError):  # still exported by the consumer: it owns it
                piece.release()
        self.pieces.clear()


@dataclass
class LayerState:
    """Items of one layer; complete once the last item's index is known and all arrived."""

    items: dict[int, ReceivedItem] = field(default_factory=dict)
    num_items: int = 0  # 0 until a chunk of the layer's last item arrives
    released: bool = False

    @property
    def is_complete(self) -> bool:
        """All items arrived (a released layer counts: only complete layers get released)."""
        return self.released or (
            self.num_items > 0
            and len(self.items) == self.num_items
            and all(item.is_done for item in self.items.values())
        )


@dataclass
class Inbound:
    """One inbound transfer. Byte counts are cumulative payload bytes."""

    transfer_id: str
    request_id: str
    deadline_at: float  # monotonic seconds, grace included
    reply_to: bytes  # zmq routing id of the sender stream that spoke last
    demand: int = 0
    granted: int = 0
    received: int = 0
    released: int = 0
    total_bytes: int | None = None  # from COMPLETE
    layers: dict[int, LayerState] = field(default_factory=dict)
    completed_layers: set[int] = field(default_factory=set)
    status: InboundStatus = InboundStatus.RECEIVING
    error: TransportError | None = None
    completed_at: float | None = None  # monotonic seconds, set on COMPLETE
    is_claimed: bool = False  # a consumer read one of its layers: the consumer releases it

    @property
    def outstanding(self) -> int:
        """Bytes this transfer holds against the credit budget (granted, not yet released)."""
        return self.granted - self.released

    @property
    def is_complete(self) -> bool:
        return (
            self.total_bytes is not None
            and self.received == self.total_bytes
            and all(layer.is_complete for layer in self.layers.values())
        )

    def place(self, h: Header, allocator: BufferAllocator, *, keep_frames: bool) -> ReceivedItem:
        """The item data chunk ``h`` belongs to (created on its first chunk).

        Raises TransportError for a chunk that breaks the protocol (over credit, duplicate,
        inconsistent sizes, released layer). The caller receives the payload (into
        ``item.dest`` at ``h.offset``, or as a frame with ``keep_frames``), then ``commit``s it.
        """
        where = f"transfer {self.transfer_id} layer {h.layer} item {h.item_index}"
        if self.received + h.length > self.granted:
            raise TransportError(f"{where}: sender exceeded its credit of {self.granted} bytes")
        layer = self.layers.setdefault(h.layer, LayerState())
        if layer.released:
            raise TransportError(f"{where}: chunk for a layer the consumer already released")
        item = layer.items.get(h.item_index) or self._new_item(layer, h, allocator, keep_frames)
        if item.nbytes != h.total_bytes or h.offset in item.offsets:
            raise TransportError(f"{where} offset {h.offset}: duplicate chunk or bad total_bytes")
        return item

    def commit(
        self, h: Header, item: ReceivedItem, payload: memoryview, nbytes: int, digest: int | None
    ) -> bool:
        """Verify a received chunk of ``item``; True if its layer is now complete.

        ``nbytes`` arrived and ``payload`` holds them; ``digest`` is their checksum if the
        caller already computed it (outside the lock), else it is computed here. A short/long
        payload or a checksum mismatch raises TransportError. In frame mode ``payload`` (the
        frame) becomes the chunk's storage."""
        where = f"transfer {self.transfer_id} layer {h.layer} item {h.item_index}"
        span = f"bytes [{h.offset}, {h.offset + h.length})"
        if nbytes != h.length:
            raise TransportError(f"{where} {span}: payload has {nbytes} bytes, header {h.length}")
        digest = checksum(payload) if digest is None else digest
        if digest != h.checksum:
            raise CorruptChunk(
                f"corrupt chunk in {where} {span}: XXH3-64 {digest:#018x} != {h.checksum:#018x}"
            )
        if item.dest is None:
            item.pieces[h.offset] = payload
        item.offsets.add(h.offset)
        item.received += h.length
        self.received += h.length
        layer = self.layers[h.layer]
        if h.layer_items:
            layer.num_items = h.layer_items
        if h.layer not in self.completed_layers and layer.is_complete:
            self.completed_layers.add(h.layer)
            return True
        return False

    def _new_item(
        self, layer: LayerState, h: Header, allocator: BufferAllocator, keep_frames: bool
    ) -> ReceivedItem:
        key = ItemKey(self.transfer_id, h.layer, h.item_index, h.kind, h.block_start, h.block_end)
        item = ReceivedItem(key, h.total_bytes, allocator)
        if not keep_frames:
            try:
                buffer = allocator.allocate(key, h.total_bytes)
            except Exception as exc:
                raise TransportError(f"allocator refused {h.total_bytes} bytes for {key}") from exc
            if buffer.nbytes != h.total_bytes or buffer.readonly:
                raise TransportError(f"allocator returned a bad buffer for {key}")
            item.dest = buffer
        layer.items[h.item_index] = item
        return item

    def release_layer(self, layer_index: int) -> int:
        """Free a layer's buffers; returns the bytes released (0 if already released)."""
        layer = self.layers.get(layer_index)
        if layer is None or layer.released:
            return 0
        layer.released = True
        freed = 0
        for item in layer.items.values():
            freed += item.received
            item.release()
        layer.items.clear()
        self.released += freed
        return freed

    def release_all(self) -> int:
        """Free every buffer; returns the bytes released."""
        return sum(self.release_layer(index) for index in list(self.layers))


class CreditLedger:
    """Hands out the receiver's ``budget_bytes`` to transfers that asked for credit.

    Invariant: the sum of ``outstanding`` over live transfers never exceeds the budget, so bytes
    granted plus bytes buffered-but-unreleased stay within it. Grants go first-come-first-served.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes

    def grant(self, transfers: Iterable[Inbound]) -> list[Inbound]:
        """Raise ``granted`` where there is demand and budget; returns the transfers changed."""
        held = [t for t in transfers if t.status in _HOLDING]
        free = self.budget_bytes - sum(t.outstanding for t in held)
        changed: list[Inbound] = []
        for t in held:
            if t.status is not InboundStatus.RECEIVING:
                continue
            give = min(t.demand - t.granted, free)
            if give > 0:
                t.granted += give
                free -= give
                changed.append(t)
        return changed


_HOLDING = (InboundStatus.RECEIVING, InboundStatus.COMPLETE)
