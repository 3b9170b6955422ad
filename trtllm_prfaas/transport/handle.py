"""``TransferHandle``: the caller's side of one outbound transfer.

A handle is created by ``RelaySender.open_transfer`` and used from the engine's thread: ``send``
enqueues an item without copying or blocking, ``finish`` says no more items follow, ``wait``
blocks (with a timeout) until the receiver acknowledged every byte, ``cancel`` abandons it.
Failures are data: ``status`` and ``error`` say what happened; ``send`` on a transfer that has
already failed returns False instead of raising, so a forward loop never crashes on the network.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from trtllm_prfaas.errors import TransferTimeout, TransportError
from trtllm_prfaas.transport.buffers import Payload, as_byte_view
from trtllm_prfaas.transport.wire import Kind

__all__ = ["OutboundItem", "TransferHandle", "TransferStatus"]


class TransferStatus(enum.Enum):
    """Life of a transfer; DONE, FAILED and CANCELLED are terminal."""

    OPEN = "open"
    FINISHING = "finishing"  # finish() called, waiting for the last bytes and the ack
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (TransferStatus.DONE, TransferStatus.FAILED, TransferStatus.CANCELLED)


@dataclass
class OutboundItem:
    """One enqueued payload; ``offset`` advances as its chunks are handed to zmq."""

    kind: Kind
    layer: int
    block_start: int
    block_end: int
    item_index: int
    layer_items: int
    view: memoryview
    queued_s: float
    offset: int = 0


Submit = Callable[[Callable[[], None]], None]


@dataclass
class _LayerCursor:
    next_index: int = 0
    closed: bool = False


@dataclass
class _HandleState:
    status: TransferStatus = TransferStatus.OPEN
    error: TransportError | None = None
    layers: dict[int, _LayerCursor] = field(default_factory=dict)


class TransferHandle:
    """One outbound transfer. Thread-safe; cheap to poll."""

    def __init__(
        self,
        transfer_id: str,
        request_id: str,
        submit: Submit,
        on_item: Callable[[str, OutboundItem], None],
        on_finish: Callable[[str], None],
        on_cancel: Callable[[str], None],
    ) -> None:
        self.transfer_id = transfer_id
        self.request_id = request_id
        self._submit = submit
        self._on_item = on_item
        self._on_finish = on_finish
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._state = _HandleState()

    @property
    def status(self) -> TransferStatus:
        with self._cond:
            return self._state.status

    @property
    def error(self) -> TransportError | None:
        """Why the transfer failed or was cancelled; None otherwise."""
        with self._cond:
            return self._state.error

    @property
    def failed(self) -> bool:
        return self.status in (TransferStatus.FAILED, TransferStatus.CANCELLED)

    def send(
        self,
        kind: Kind,
        layer: int,
        block_range: tuple[int, int] | range,
        payload: Payload,
        *,
        last_in_layer: bool = True,
    ) -> bool:
        """Enqueue ``payload`` (no copy; keep it unchanged until the transfer ends).

        ``block_range`` is the request-relative block range ``[start, end)`` the payload covers
        (``(0, 0)`` for a STATE). ``last_in_layer`` closes the layer: the receiver signals the
        layer complete once all its items arrived. Returns False (and enqueues nothing) when the
        transfer already failed or was cancelled; raises TransportError on misuse.
        """
        start, end = _range(block_range)
        if kind not in (Kind.FULL_BLOCK, Kind.STATE):
            raise TransportError(f"kind: send() takes FULL_BLOCK or STATE, got {kind!r}")
        if layer < 0 or start < 0 or end < start:
            raise TransportError(f"layer/block_range: bad values layer={layer} [{start}, {end})")
        view = as_byte_view(payload)
        if view.nbytes == 0:
            raise TransportError("payload: empty")
        with self._cond:
            if self._state.status in (TransferStatus.FAILED, TransferStatus.CANCELLED):
                return False
            if self._state.status is not TransferStatus.OPEN:
                raise TransportError(f"send after finish() on transfer {self.transfer_id}")
            index, count = self._next_index(layer, last_in_layer)
        item = OutboundItem(kind, layer, start, end, index, count, view, time.monotonic())
        self._submit(lambda: self._on_item(self.transfer_id, item))
        return True

    def finish(self) -> None:
        """No more items: the receiver acknowledges once every byte arrived. Idempotent."""
        with self._cond:
            if self._state.status is not TransferStatus.OPEN:
                return
            self._state.status = TransferStatus.FINISHING
        self._submit(lambda: self._on_finish(self.transfer_id))

    def cancel(self) -> None:
        """Abandon the transfer now; the receiver drops its buffers. Idempotent."""
        if self._settle(TransferStatus.CANCELLED, TransportError(f"{self._name()} cancelled")):
            self._submit(lambda: self._on_cancel(self.transfer_id))

    def wait(self, timeout_s: float) -> None:
        """Block until DONE; raise the transfer's error if it failed or was cancelled.

        Raises TransferTimeout if ``timeout_s`` passes first (the transfer itself goes on until
        its own deadline).
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._state.status.is_terminal, timeout_s):
                raise TransferTimeout(f"{self._name()}: not done after waiting {timeout_s:.3g} s")
            if self._state.error is not None:
                raise self._state.error

    def _settle(self, status: TransferStatus, error: TransportError | None) -> bool:
        """Move to a terminal status once; returns False if already terminal."""
        with self._cond:
            if self._state.status.is_terminal:
                return False
            self._state.status, self._state.error = status, error
            self._cond.notify_all()
            return True

    def _next_index(self, layer: int, last: bool) -> tuple[int, int]:
        cursor = self._state.layers.setdefault(layer, _LayerCursor())
        if cursor.closed:
            raise TransportError(f"layer {layer}: send after its last_in_layer item")
        index = cursor.next_index
        cursor.next_index += 1
        cursor.closed = last
        return index, (index + 1 if last else 0)

    def _name(self) -> str:
        return f"transfer {self.transfer_id} (request {self.request_id})"


def _range(block_range: tuple[int, int] | range) -> tuple[int, int]:
    if isinstance(block_range, range):
        return block_range.start, block_range.stop
    start, end = block_range
    return int(start), int(end)
