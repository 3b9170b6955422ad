"""Stricter devices for the fake executor (``fake_device.Device``): a CPU shim that behaves like a
GPU where it matters to a connector, and a real CUDA device.

``StrictDevice`` (``--device strict``): the pool is a :class:`StrictPool`, not a tensor. The
connector cannot read it as host memory: ``.numpy()``, ``.cpu()``, ``data_ptr``, ``tolist``,
``torch.frombuffer``, the buffer protocol, ``numpy.asarray``, advanced indexing and any torch
function on it raise :class:`HostAccess`. What it may do is what a CUDA pool allows a careful
connector, through ``connector/device.py``'s backend over this device's ``cuda`` namespace:
basic slices ``pool[start:stop, layer]`` and ``copy_(..., non_blocking=True)`` between such a
slice and a *pinned* host tensor (``empty_pinned``), inside ``cuda.stream(stream)``.

Those copies are lazy, as on a GPU: they join their stream's queue and run only when the stream
gets there, which is when an event recorded after them is synchronised, a stream is
synchronised, a later kernel runs on the same stream (``write_token_rows``), or an event is
queried for the second time (the first ``query()`` of a pending event returns False, so a
connector must poll). Until then a device-to-host copy's destination holds a poison pattern (a
send of staged data before its event completed ships garbage, and the byte-identity tests fail),
a host-to-device copy reads its source when it runs (staging reused too early ships garbage), and
``read_block`` of a block whose copy is still pending raises (the fake reads a loaded request's
blocks right when ``get_finished`` reports it: a load reported before its copy completed fails).

``CudaDevice`` (``--device cuda``): the same four operations on a real CUDA pool and streams.

Where the rules come from: the pool is what ``resource_manager.py``
``KVCacheManager.get_unique_primary_pool`` hands ``register_kv_caches`` (a CUDA tensor; stored
copies 3501434665, 77926604); hooks get ``torch.cuda.current_stream()`` and ``save_kv_layer`` runs
"immediately after the layer's work is enqueued" (``py_executor.py`` ``_forward_step`` /
``kv_cache_connector.py`` docstrings, stored copy 736889464); the copy semantics are PyTorch's
CUDA semantics (``non_blocking`` copies from or to pinned memory are asynchronous to the host and
ordered on their stream; ``Event.query`` / ``synchronize``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["CudaDevice", "HostAccess", "StrictDevice", "StrictPool"]

POISON_BYTE = 0xA5  # what a pending device-to-host copy's destination holds


class HostAccess(AssertionError):
    """The connector touched device memory as if it were host memory."""


class StrictStream:
    """A lazy stream: a queue of operations, run in order when the stream gets there."""

    def __init__(self, device: StrictDevice) -> None:
        self._device = device
        self.queue: deque[tuple[int, Callable[[], None]]] = deque()
        self.num_enqueued = 0
        self.num_done = 0

    def synchronize(self) -> None:
        self._device.flush(self, self.num_enqueued)

    def query(self) -> bool:
        return self.num_done == self.num_enqueued


class StrictEvent:
    """``torch.cuda.Event`` on a lazy stream; the first ``query()`` of a pending event is False."""

    def __init__(self, device: StrictDevice) -> None:
        self._device = device
        self._stream: StrictStream | None = None
        self._mark = 0
        self._queried = False

    def record(self, stream: StrictStream | None = None) -> None:
        self._stream = stream or self._device.current_stream()
        self._mark, self._queried = self._stream.num_enqueued, False

    def query(self) -> bool:
        if self._stream is None or self._stream.num_done >= self._mark:
            return True
        if not self._queried:  # the GPU has not got there yet; next time it has
            self._queried = True
            return False
        self._device.flush(self._stream, self._mark)
        return True

    def synchronize(self) -> None:
        if self._stream is not None:
            self._device.flush(self._stream, self._mark)


class _CudaNamespace:
    """What ``connector/device.py`` uses of ``torch.cuda``, over a ``StrictDevice``."""

    def __init__(self, device: StrictDevice) -> None:
        self._device = device

    def Event(self) -> StrictEvent:  # torch.cuda.Event
        return StrictEvent(self._device)

    def current_stream(self) -> StrictStream:
        return self._device.current_stream()

    @contextlib.contextmanager
    def stream(self, stream: StrictStream) -> Iterator[None]:
        local = self._device.local
        previous = getattr(local, "stream", None)
        local.stream = stream
        try:
            yield
        finally:
            local.stream = previous


def _forbidden(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise HostAccess(f"{name} on a device pool: the connector read device memory as host")

    return method


class _DeviceMemory:
    """Common refusals of :class:`StrictPool` and its slices (they are tensor-likes)."""

    numpy = _forbidden(".numpy()")
    cpu = _forbidden(".cpu()")
    tolist = _forbidden(".tolist()")
    item = _forbidden(".item()")
    data_ptr = _forbidden(".data_ptr()")
    untyped_storage = _forbidden(".untyped_storage()")
    __array__ = _forbidden("numpy.asarray")
    __iter__ = _forbidden("iteration")
    __buffer__ = _forbidden("the buffer protocol")

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and len(args) == 2 and isinstance(args[1], StrictSlice):
            dst, src = args
            return src.pool.device.copy_to_host(dst, src, **kwargs)
        raise HostAccess(f"{getattr(func, '__name__', func)} on a device pool")


class StrictPool(_DeviceMemory):
    """A pool in (simulated) device memory; see the module docstring for what it allows."""

    def __init__(self, device: StrictDevice, data: torch.Tensor) -> None:
        self.device, self._data = device, data
        self.shape, self.dtype = data.shape, data.dtype

    @property
    def prfaas_device(self) -> StrictDevice:
        """``connector/device.py``'s ``backend_for`` takes this device's namespace from here."""
        return self.device

    def __getitem__(self, index: Any) -> StrictSlice:
        if not (
            isinstance(index, tuple)
            and len(index) == 2
            and isinstance(index[0], slice)
            and index[0].step is None
            and isinstance(index[1], int)
        ):
            raise HostAccess(f"pool[{index!r}]: only pool[start:stop, layer] slices are allowed")
        return StrictSlice(self, index[0], index[1])


class StrictSlice(_DeviceMemory):
    """``pool[start:stop, layer]``: a view in device memory."""

    def __init__(self, pool: StrictPool, blocks: slice, layer: int) -> None:
        self.pool, self.blocks, self.layer = pool, blocks, layer
        self.dtype = pool.dtype
        self.shape = pool._data[blocks, layer].shape

    def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> StrictSlice:
        self.pool.device.copy_to_device(self, src, non_blocking)
        return self

    def rows(self) -> torch.Tensor:
        return self.pool._data[self.blocks, self.layer]


class StrictDevice:
    """The strict CPU shim (``--device strict``); also this device's ``cuda`` namespace."""

    name = "strict"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.local = threading.local()
        self.default_stream = StrictStream(self)
        self.cuda = _CudaNamespace(self)
        self._pinned: set[int] = set()
        self._pending: dict[tuple[int, int, int], int] = {}  # (pool, block, layer) -> writes

    # ---- what the connector's backend sees ------------------------------------------------
    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        self._pinned.add(tensor.untyped_storage().data_ptr())
        return tensor

    def current_stream(self) -> StrictStream:
        return getattr(self.local, "stream", None) or self.default_stream

    def copy_to_host(self, dst: torch.Tensor, src: StrictSlice, non_blocking: bool = False) -> Any:
        """Device-to-host: lazily on the current stream; ``dst`` is poisoned until it runs."""
        self._check_async(dst, non_blocking, "device-to-host")
        with self.lock:
            dst.view(torch.uint8).fill_(POISON_BYTE)
            self._enqueue(self._in_stream(), lambda: dst.copy_(src.rows()))
        return dst

    def copy_to_device(self, dst: StrictSlice, src: torch.Tensor, non_blocking: bool) -> None:
        """Host-to-device: lazily; the source is read when the copy runs."""
        if isinstance(src, _DeviceMemory):
            raise HostAccess("device-to-device copies are not part of the connector's contract")
        self._check_async(src, non_blocking, "host-to-device")
        keys = self._keys(dst)

        def run() -> None:
            dst.rows().copy_(src)
            for key in keys:
                self._pending[key] -= 1

        with self.lock:
            for key in keys:
                self._pending[key] = self._pending.get(key, 0) + 1
            self._enqueue(self._in_stream(), run)

    def _check_async(self, host: torch.Tensor, non_blocking: bool, what: str) -> None:
        if not non_blocking:
            raise HostAccess(f"a {what} copy without non_blocking=True blocks the executor")
        if host.untyped_storage().data_ptr() not in self._pinned:
            raise HostAccess(f"a {what} copy with pageable host memory (use pinned staging)")

    def _in_stream(self) -> StrictStream:
        stream = getattr(self.local, "stream", None)
        if stream is None:
            raise HostAccess("a device copy outside cuda.stream(...): on no known stream")
        return stream  # type: ignore[no-any-return]

    def _enqueue(self, stream: StrictStream, op: Callable[[], None]) -> None:
        stream.num_enqueued += 1
        stream.queue.append((stream.num_enqueued, op))

    def flush(self, stream: StrictStream, upto: int) -> None:
        """Run ``stream``'s operations up to number ``upto``, in order."""
        with self.lock:
            while stream.queue and stream.queue[0][0] <= upto:
                number, op = stream.queue.popleft()
                op()
                stream.num_done = number

    def _keys(self, view: StrictSlice) -> list[tuple[int, int, int]]:
        start, stop, _ = view.blocks.indices(view.pool.shape[0])
        return [(id(view.pool), block, view.layer) for block in range(start, stop)]

    # ---- the fake executor's device interface ----------------------------------------------
    def make_pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> StrictPool:
        return StrictPool(self, torch.full(shape, 7.0, dtype=dtype))

    def make_stream(self) -> StrictStream:
        return StrictStream(self)

    def write_token_rows(
        self, pool: Any, block: int, layer: int, pos_in_block: int, rows: torch.Tensor, stream: Any
    ) -> None:
        """A kernel on ``stream``: everything enqueued there before it has run."""
        with self.lock:
            self.flush(stream, stream.num_enqueued)
            kv_factor, heads, head_dim = rows.shape
            view = pool._data[block, layer].view(kv_factor, heads, -1, head_dim)
            view[:, :, pos_in_block, :] = rows.to(pool.dtype)

    def read_block(self, pool: Any, block: int, layer: int) -> torch.Tensor:
        with self.lock:
            if self._pending.get((id(pool), block, layer)):
                raise HostAccess(
                    f"block {block} layer {layer} read while a copy into it is still pending: "
                    "a load was reported before its copy completed"
                )
            return pool._data[block, layer].clone()  # type: ignore[no-any-return]


class CudaDevice:
    """The fake executor's pool on a real CUDA device (``--device cuda``)."""

    name = "cuda"

    def make_pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.full(shape, 7.0, dtype=dtype, device="cuda")

    def make_stream(self) -> Any:
        return torch.cuda.Stream()

    def write_token_rows(
        self, pool: Any, block: int, layer: int, pos_in_block: int, rows: torch.Tensor, stream: Any
    ) -> None:
        with torch.cuda.stream(stream):
            kv_factor, heads, head_dim = rows.shape
            view = pool[block, layer].view(kv_factor, heads, -1, head_dim)
            view[:, :, pos_in_block, :] = rows.to(device=pool.device, dtype=pool.dtype)

    def read_block(self, pool: Any, block: int, layer: int) -> torch.Tensor:
        torch.cuda.synchronize()
        return pool[block, layer].cpu()
