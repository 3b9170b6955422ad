"""Receiver-side state of inbound transfers: chunk placement, verification, layer completion,
and the credit ledger. Plain data, no sockets and no locks (the receiver holds its lock).
"""

from __future__ import annotations

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
    """A chunk's payload does not match its header's xxhash64: the transfer fails."""


class InboundStatus(enum.Enum):
    """Life of an inbound transfer; COMPLETE keeps buffers until the consumer releases them."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class ReceivedItem:
    """One item's destination buffer; ``buffer`` is valid until the consumer releases it."""

    key: ItemKey
    buffer: memoryview
    received: int = 0
    offsets: set[int] = field(default_factory=set)

    @property
    def is_done(self) -> bool:
        return self.received == self.buffer.nbytes


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

    def place(self, h: Header, allocator: BufferAllocator) -> memoryview:
        """The destination of data chunk ``h`` inside its item's buffer (allocated on first use).

        Raises TransportError for a chunk that breaks the protocol (over credit, duplicate,
        inconsistent sizes, released layer). The caller fills the view, then calls ``commit``.
        """
        where = f"transfer {self.transfer_id} layer {h.layer} item {h.item_index}"
        if self.received + h.length > self.granted:
            raise TransportError(f"{where}: sender exceeded its credit of {self.granted} bytes")
        layer = self.layers.setdefault(h.layer, LayerState())
        if layer.released:
            raise TransportError(f"{where}: chunk for a layer the consumer already released")
        item = layer.items.get(h.item_index) or self._new_item(layer, h, allocator)
        if item.buffer.nbytes != h.total_bytes or h.offset in item.offsets:
            raise TransportError(f"{where} offset {h.offset}: duplicate chunk or bad total_bytes")
        return item.buffer[h.offset : h.offset + h.length]

    def commit(self, h: Header, filled: memoryview, nbytes: int) -> bool:
        """Verify a placed chunk (``nbytes`` arrived into ``filled``); True if its layer is now
        complete. A short/long payload or a checksum mismatch raises TransportError."""
        where = f"transfer {self.transfer_id} layer {h.layer} item {h.item_index}"
        span = f"bytes [{h.offset}, {h.offset + h.length})"
        if nbytes != h.length:
            raise TransportError(f"{where} {span}: payload has {nbytes} bytes, header {h.length}")
        got = checksum(filled)
        if got != h.checksum:
            raise CorruptChunk(
                f"corrupt chunk in {where} {span}: xxhash64 {got:#018x} != {h.checksum:#018x}"
            )
        layer = self.layers[h.layer]
        item = layer.items[h.item_index]
        item.offsets.add(h.offset)
        item.received += h.length
        self.received += h.length
        if h.layer_items:
            layer.num_items = h.layer_items
        if h.layer not in self.completed_layers and layer.is_complete:
            self.completed_layers.add(h.layer)
            return True
        return False

    def _new_item(self, layer: LayerState, h: Header, allocator: BufferAllocator) -> ReceivedItem:
        key = ItemKey(self.transfer_id, h.layer, h.item_index, h.kind, h.block_start, h.block_end)
        try:
            buffer = allocator.allocate(key, h.total_bytes)
        except Exception as exc:
            raise TransportError(f"allocator refused {h.total_bytes} bytes for {key}") from exc
        if buffer.nbytes != h.total_bytes or buffer.readonly:
            raise TransportError(f"allocator returned a bad buffer for {key}")
        item = ReceivedItem(key, buffer)
        layer.items[h.item_index] = item
        return item

    def release_layer(self, layer_index: int, allocator: BufferAllocator) -> int:
        """Free a layer's buffers; returns the bytes released (0 if already released)."""
        layer = self.layers.get(layer_index)
        if layer is None or layer.released:
            return 0
        layer.released = True
        freed = 0
        for item in layer.items.values():
            freed += item.received
            allocator.free(item.key, item.buffer)
        layer.items.clear()
        self.released += freed
        return freed

    def release_all(self, allocator: BufferAllocator) -> int:
        """Free every buffer; returns the bytes released."""
        return sum(self.release_layer(index, allocator) for index in list(self.layers))


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
