"""Byte views of payloads (no copies) and receiver-side destination buffers.

``as_byte_view`` turns ``bytes``/``bytearray``/``memoryview``/numpy arrays/CPU torch tensors
into a flat, read-only-safe ``memoryview`` of unsigned bytes without copying; it raises
TransportError for non-contiguous or non-CPU payloads instead of copying them silently.

``BufferAllocator`` is the hook through which a block pool can hand the receiver destination
buffers; ``HeapAllocator`` is the default (one numpy byte array per item, recycled).

``retain_freed_heap`` keeps glibc from handing ZeroMQ's freed message buffers back to the
kernel: a receiver frees one chunk-sized buffer per message, and with glibc's default (dynamic)
thresholds the heap top is trimmed with ``madvise`` again and again, so about a third of all
received pages were faulted in and zero-filled anew (measured: ~75k faults per GiB at 1 MiB
chunks, ~0.15 s of CPU per GiB; none with the thresholds raised).
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy

from trtllm_prfaas.errors import TransportError
from trtllm_prfaas.transport.wire import Kind

__all__ = [
    "BufferAllocator",
    "HeapAllocator",
    "ItemKey",
    "Payload",
    "as_byte_view",
    "retain_freed_heap",
]

Payload = Any  # memoryview | bytes | bytearray | numpy.ndarray | torch.Tensor


@dataclass(frozen=True)
class ItemKey:
    """Identifies one received item: a transfer's ``item_index``-th item of ``layer``."""

    transfer_id: str
    layer: int
    item_index: int
    kind: Kind
    block_start: int
    block_end: int


class BufferAllocator(Protocol):
    """Supplies destination buffers to a ``RelayReceiver``.

    Called on the receiver's I/O thread: ``allocate`` when the first chunk of an item arrives
    (must not block; raise to fail the transfer), ``free`` once the consumer released the item
    or its transfer failed/was cancelled. The buffer must stay valid until ``free``.
    """

    def allocate(self, key: ItemKey, nbytes: int) -> memoryview: ...

    def free(self, key: ItemKey, buffer: memoryview) -> None: ...


class HeapAllocator:
    """Default allocator: uninitialised numpy byte arrays, recycled by size up to
    ``max_cached_bytes``.

    Recycling matters: touching fresh pages costs more than moving the bytes over loopback.
    ``free`` releases the receiver's view (so a consumer that kept it gets ValueError instead of
    reading reused memory) and caches the array. Thread-safe (allocate runs on the I/O
    thread, free on the consumer's).
    """

    def __init__(self, max_cached_bytes: int = 64 << 20) -> None:
        self.max_cached_bytes = max_cached_bytes
        self._lock = threading.Lock()
        self._cache: dict[int, list[Any]] = {}
        self._cached_bytes = 0

    def allocate(self, key: ItemKey, nbytes: int) -> memoryview:
        """A writable view of ``nbytes`` bytes (recycled contents are stale, not zeroed)."""
        with self._lock:
            spare = self._cache.get(nbytes)
            if spare:
                self._cached_bytes -= nbytes
                return memoryview(spare.pop())
        return _array_view(numpy.empty(nbytes, dtype=numpy.uint8))

    def free(self, key: ItemKey, buffer: memoryview) -> None:
        """Release the view; keep its array for reuse while the cache has room."""
        owner = buffer.obj
        try:
            buffer.release()
        except BufferError:
            return  # the consumer still exports it (e.g. torch.frombuffer): never reuse
        if not isinstance(owner, numpy.ndarray):
            return
        with self._lock:
            if self._cached_bytes + owner.nbytes <= self.max_cached_bytes:
                self._cache.setdefault(owner.nbytes, []).append(owner)
                self._cached_bytes += owner.nbytes


def as_byte_view(payload: Payload) -> memoryview:
    """A flat ``memoryview`` of format ``B`` over ``payload``, sharing its memory.

    The caller keeps ``payload`` unchanged until the transfer that sends it completes.
    """
    if isinstance(payload, bytes | bytearray):
        return memoryview(payload)
    if isinstance(payload, memoryview):
        return _flat(payload)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(payload, torch.Tensor):
        return _tensor_view(payload)
    if isinstance(payload, numpy.ndarray):
        if not payload.flags.c_contiguous:
            raise TransportError("payload: numpy array must be C-contiguous (no hidden copies)")
        return _array_view(payload.reshape(-1).view(numpy.uint8))
    raise TransportError(f"payload: unsupported type {type(payload).__name__}")


def _flat(view: memoryview) -> memoryview:
    if not view.c_contiguous:
        raise TransportError("payload: memoryview must be C-contiguous")
    return view.cast("B") if (view.format != "B" or view.ndim != 1) else view


def _tensor_view(tensor: Any) -> memoryview:
    if tensor.device.type != "cpu":
        raise TransportError(f"payload: tensor must be on the CPU, got {tensor.device}")
    if not tensor.is_contiguous():
        raise TransportError("payload: tensor must be contiguous (no hidden copies)")
    import torch  # already imported: the payload is a tensor

    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return _array_view(flat.numpy())


def _array_view(array: Any) -> memoryview:
    """``memoryview`` of a numpy array (typed ``Any``: numpy's stubs lack ``__buffer__`` < 3.12)."""
    return memoryview(array)


_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_retain_lock = threading.Lock()
_retained_bytes = 0


def retain_freed_heap(retain_bytes: int) -> bool:
    """Process-wide: keep up to ``retain_bytes`` of freed heap memory for reuse, and serve
    allocations up to 32 MiB from the heap rather than from fresh (zero-filled) mappings.

    Only ever raises the thresholds (several receivers: the largest budget wins). Returns False
    where the C library is not glibc (nothing is changed). Costs at most ``retain_bytes`` of
    resident memory that would otherwise go back to the kernel; a receiver passes its credit
    budget, which bounds what it holds anyway.
    """
    global _retained_bytes
    if platform.libc_ver()[0] != "glibc":
        return False
    with _retain_lock:
        if retain_bytes <= _retained_bytes:
            return True
        libc = ctypes.CDLL(None)
        ok = int(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) == 1
        ok = ok and int(libc.mallopt(_M_TRIM_THRESHOLD, min(retain_bytes, 2**31 - 1))) == 1
        if ok:
            _retained_bytes = retain_bytes
        return ok
