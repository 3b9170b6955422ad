"""Where the fake executor keeps its KV pool: a small device interface and its plain CPU version.

``tests/connector/trtllm_fake/`` never touches its pool except through a ``Device``:

``make_pool(shape, dtype) -> pool``
    One tensor-parallel rank's primary pool, TensorRT-LLM's shape
    ``[num_blocks, num_layers, kv_factor, heads_per_rank * tokens_per_block * head_dim]``
    (``KVCacheManager.get_unique_primary_pool``). Its initial contents are unspecified; the CPU
    device fills it with a fixed non-zero pattern, so rows nobody wrote never look right.
    This tensor is what the connector's ``register_kv_caches`` receives.
``make_stream() -> stream``
    The rank's execution stream: what ``torch.cuda.current_stream()`` returns inside the executor
    loop, handed to every worker hook (never None).
``write_token_rows(pool, block, layer, pos_in_block, rows, stream)``
    The model's attention kernel writing one token's K and V: ``rows`` is a CPU tensor
    ``(kv_factor, heads_per_rank, head_dim)`` placed at ``pos_in_block`` of ``block`` in ``layer``
    (head-major rows: heads, tokens, head_dim), enqueued on ``stream``.
``read_block(pool, block, layer) -> torch.Tensor``
    A privileged, test-side read: the block's row ``(kv_factor, row)`` as a CPU tensor, after
    every write and copy enqueued on the pool's streams has completed.

A stricter device (a pool the connector cannot read as host memory, streams and events that make
unsynchronised use fail, or a real CUDA device) implements the same four methods; the fake and
the contract tests use nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["CpuDevice", "CpuEvent", "CpuStream", "Device"]


class Device(Protocol):
    """The four operations the fake executor performs on its pool (see module docstring)."""

    name: str

    def make_pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    def make_stream(self) -> Any: ...

    def write_token_rows(
        self,
        pool: torch.Tensor,
        block: int,
        layer: int,
        pos_in_block: int,
        rows: torch.Tensor,
        stream: Any,
    ) -> None: ...

    def read_block(self, pool: torch.Tensor, block: int, layer: int) -> torch.Tensor: ...


class CpuEvent:
    """An event on a CPU stream: work on a CPU stream is done when enqueued, so it is always
    complete. Methods mirror ``torch.cuda.Event`` (record, synchronize, query, wait)."""

    def record(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        return None


class CpuStream:
    """A stand-in for ``torch.cuda.Stream`` on the CPU device: every operation runs at once, so
    synchronisation calls are no-ops. Methods mirror the CUDA stream's."""

    device = torch.device("cpu")

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        return event if event is not None else CpuEvent()

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None


_GARBAGE = 7.0  # what a fresh CPU pool holds: never the KV of any token (those are N(0, 1) draws)


class CpuDevice:
    """The plain CPU device: the pool is an ordinary CPU tensor and streams run eagerly."""

    name = "cpu"

    def make_pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.full(shape, _GARBAGE, dtype=dtype)

    def make_stream(self) -> CpuStream:
        return CpuStream()

    def write_token_rows(
        self,
        pool: torch.Tensor,
        block: int,
        layer: int,
        pos_in_block: int,
        rows: torch.Tensor,
        stream: Any,
    ) -> None:
        kv_factor, heads, head_dim = rows.shape
        view = pool[block, layer].view(kv_factor, heads, -1, head_dim)  # (kv, heads, tpb, dim)
        view[:, :, pos_in_block, :] = rows.to(pool.dtype)

    def read_block(self, pool: torch.Tensor, block: int, layer: int) -> torch.Tensor:
        return pool[block, layer].clone()
