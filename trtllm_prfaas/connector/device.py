"""How relayed KV leaves and enters the engine's pool: the worker half's device layer.

Inside TensorRT-LLM the pool (``KVCacheManager.get_unique_primary_pool()``, shape ``(num_blocks,
num_layers, kv_factor, row)``) is a CUDA tensor, and every connector hook runs on the host while
the layer it follows is only *enqueued* on the hook's stream (``py_executor.py`` layer pre/post
hooks pass ``torch.cuda.current_stream()``). So the connector never reads the pool as host
memory:

- save: gather a layer's blocks on the hook's stream, copy device-to-host into pinned staging
  (``non_blocking``), record an event; the staged bytes may be read only once the event completed.
- load: host bytes -> pinned staging -> ``non_blocking`` host-to-device copy into the pool on the
  hook's stream, event recorded; the staging stays alive, and the load may be reported, only once
  the event completed.

One :class:`DeviceBackend` does both for any pool. Its ``cuda`` namespace is ``torch.cuda`` for a
CUDA pool, None for a host pool (the reference engine: plain synchronous copies, events always
complete), or a test shim that stands in for ``torch.cuda`` (``tests/connector/strict_device.py``:
a pool that cannot be read as host memory, and lazy streams and events). Only these calls of the
namespace are used: ``stream(s)`` (a context manager), ``current_stream()``, ``Event()`` with
``record(stream)``, ``query()`` and ``synchronize()``. The pool is touched only by basic slicing
``pool[start:stop, layer]`` and ``copy_(..., non_blocking=...)`` in either direction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from trtllm_prfaas.errors import ConfigError

__all__ = [
    "DONE",
    "DeviceBackend",
    "DeviceEvent",
    "Landing",
    "Staged",
    "backend_for",
    "block_runs",
]

EmptyFn = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class DeviceEvent(Protocol):
    """What the connector needs of a CUDA event: poll it, or wait for it (off the executor)."""

    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


class _Done:
    """The event of a synchronous copy: complete from the start."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


DONE: DeviceEvent = _Done()


@dataclass
class Staged:
    """A layer's blocks copied out: ``host`` is ``(n, *pool.shape[2:])`` in the pool's dtype and
    holds the bytes only once ``event`` completed."""

    host: torch.Tensor
    event: DeviceEvent


@dataclass
class Landing:
    """Copies into the pool: complete once ``event`` completed; ``keep`` (the staging) must stay
    alive and unchanged until then."""

    event: DeviceEvent
    keep: list[torch.Tensor] = field(default_factory=list)


def block_runs(block_ids: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """``(offset, start, stop)`` for each run of consecutive ids: ``block_ids[offset:offset +
    stop - start] == range(start, stop)``. One copy per run instead of one per block."""
    offset = 0
    while offset < len(block_ids):
        start = stop = block_ids[offset]
        while offset + (stop - start) < len(block_ids) and block_ids[offset + stop - start] == stop:
            stop += 1
        yield offset, start, stop
        offset += stop - start


class DeviceBackend:
    """Copies between one pool and host memory (see the module docstring)."""

    def __init__(self, cuda: Any | None, empty_host: EmptyFn) -> None:
        self.cuda = cuda  # torch.cuda, a shim, or None for a host pool
        self._empty_host = empty_host  # pinned when ``cuda`` is set

    @property
    def is_async(self) -> bool:
        return self.cuda is not None

    def stage_blocks(self, pool: Any, layer: int, block_ids: Sequence[int], stream: Any) -> Staged:
        """Enqueue the copy of ``pool[block_ids, layer]`` to host staging on ``stream``."""
        host = self._empty_host((len(block_ids), *pool.shape[2:]), pool.dtype)
        with self._on(stream) as active:
            for offset, start, stop in block_runs(block_ids):
                rows = host[offset : offset + stop - start]
                rows.copy_(pool[start:stop, layer], non_blocking=self.is_async)
            return Staged(host, self._record(active))

    def write_blocks(
        self, pool: Any, layer: int, block_ids: Sequence[int], rows: torch.Tensor, stream: Any
    ) -> Landing:
        """Enqueue ``pool[block_ids[i], layer] = rows[i]`` on ``stream``. ``rows`` is host memory
        the caller may reuse at once: an async backend copies it into pinned staging first."""
        source = rows
        if self.is_async:
            source = self._empty_host(tuple(rows.shape), rows.dtype)
            source.copy_(rows)  # host to pinned host: synchronous, on this thread
        with self._on(stream) as active:
            for offset, start, stop in block_runs(block_ids):
                pool[start:stop, layer].copy_(
                    source[offset : offset + stop - start], non_blocking=self.is_async
                )
            return Landing(self._record(active), [source] if self.is_async else [])

    @contextlib.contextmanager
    def _on(self, stream: Any) -> Iterator[Any]:
        """Make ``stream`` current (the executor's, when the host passed None)."""
        if self.cuda is None:
            yield None
            return
        active = stream if stream is not None else self.cuda.current_stream()
        with self.cuda.stream(active):
            yield active

    def _record(self, stream: Any) -> DeviceEvent:
        if self.cuda is None:
            return DONE
        event: DeviceEvent = self.cuda.Event()
        event.record(stream)  # type: ignore[attr-defined]
        return event


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)  # PyTorch caches pinned blocks


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def backend_for(pool: Any) -> DeviceBackend:
    """The backend of ``pool``: a shim's own namespace (an object with ``prfaas_device``
    giving ``cuda`` and ``empty_pinned``), ``torch.cuda`` for a CUDA tensor, synchronous host
    copies for a CPU tensor. ConfigError for anything else."""
    shim = getattr(type(pool), "prfaas_device", None)
    if shim is not None:
        device = pool.prfaas_device
        return DeviceBackend(device.cuda, device.empty_pinned)
    if not isinstance(pool, torch.Tensor):
        raise ConfigError(f"KV pool: expected a torch.Tensor, got {type(pool).__name__}")
    if pool.device.type == "cuda":
        return DeviceBackend(torch.cuda, _pinned_empty)
    if pool.device.type == "cpu":
        return DeviceBackend(None, _host_empty)
    raise ConfigError(f"KV pool on {pool.device}: only CUDA and CPU pools are supported")
