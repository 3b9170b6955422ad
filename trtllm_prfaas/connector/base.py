"""The KV cache connector interface, as TensorRT-LLM defines it, plus the hybrid-state extension.

A connector has two halves, each constructed with ``(llm_args)``:

Scheduler half (rank 0; return values must be picklable)
    ``get_num_new_matched_tokens(request, num_computed_tokens) -> (n, load_async)``
        once per new request, under the executor's lock: NO network I/O, no blocking. ``n`` extra
        prompt tokens come from the connector; ``(0, True)`` is an error. ``load_async=True`` parks
        the request until the worker reports it loaded.
    ``update_state_after_alloc(request, block_ids)``
        right after the request's blocks are allocated.
    ``build_connector_meta(scheduler_output) -> meta``
        every iteration before the forward pass; the meta reaches every worker.
    ``request_finished(request, cache_block_ids) -> bool``
        when the request finished generating; True keeps its blocks pinned until a worker's
        ``get_finished`` reports the save done.

Worker half (every tensor-parallel rank)
    ``register_kv_caches(kv_cache_tensor)``  once: the pool
        ``(num_blocks, num_layers, kv_factor, num_kv_heads * tokens_per_block * head_dim)``.
    ``bind_connector_meta(meta)``            base class stores it as ``self._metadata``.
    ``start_load_kv(stream)``                once per iteration before the forward pass.
    ``wait_for_layer_load(layer_idx, stream)`` before every decoder layer.
    ``save_kv_layer(layer_idx, stream)``     after every decoder layer.
    ``wait_for_save(stream)``                end of the forward pass.
    ``get_finished(finished_gen_req_ids, started_loading_req_ids) -> (done_saving, done_loading)``
        every iteration; ids are passed in once and may be returned only after that.

Per-iteration order (the reference engine follows it exactly): match -> allocate ->
``update_state_after_alloc`` -> async-loading requests leave the batch -> ``build_connector_meta``
-> ``bind_connector_meta`` -> ``start_load_kv`` -> per layer ``wait_for_layer_load`` / layer /
``save_kv_layer`` -> ``wait_for_save`` -> sampling; finished requests -> ``request_finished`` ->
``get_finished``.

Base classes: when TensorRT-LLM is already loaded in the process (it imports the connector module
itself), the halves subclass its real base classes, found at the 1.1/1.2 module path or the 2026
one; otherwise they subclass this module's ABCs, which have the same names and signatures. This
module never imports ``tensorrt_llm`` on its own, so CPU processes never pay for or need it.

Optional capabilities (the reference engine only; TensorRT-LLM never calls them)
    Small classes a worker half inherits and a host checks with ``isinstance``, never probes:
    ``SupportsRecurrentStates`` (a hybrid model's linear-attention states, which TensorRT-LLM's
    pool does not hold: ``register_recurrent_states(states)`` once at start);
    ``SupportsLoadFailures`` (``get_failed_loads()``: loads that failed, as data, so the host can
    fail or recompute the request instead of leaving it parked); ``SupportsCancel``
    (``cancel_load`` / ``cancel_save`` when the host gives up on a request). Upstream's
    ``KvCacheConnectorManager`` knows only the hooks above (``kv_cache_connector.py``, commit
    00fdcbf, and the 2026 ``connectors/kv_cache_connector.py``, 035ab91), so a connector must be
    correct without any of them.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = [
    "TRTLLM_CONNECTOR_MODULES",
    "ConnectorPair",
    "KvCacheConnectorScheduler",
    "KvCacheConnectorWorker",
    "LlmRequestLike",
    "RecurrentStates",
    "RequestData",
    "SchedulerOutput",
    "SupportsCancel",
    "SupportsLoadFailures",
    "SupportsRecurrentStates",
    "resolve_base_classes",
]

TRTLLM_CONNECTOR_MODULES = (
    "tensorrt_llm._torch.pyexecutor.kv_cache_connector",  # TensorRT-LLM 1.1 / 1.2
    "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",  # 2026 line
)


class LlmRequestLike(Protocol):
    """What connectors may read from a request (a subset of TensorRT-LLM's ``LlmRequest``)."""

    @property
    def request_id(self) -> int: ...
    @property
    def context_current_position(self) -> int: ...
    @property
    def is_generation_only_request(self) -> bool: ...
    def get_tokens(self, beam: int) -> list[int]: ...


@dataclass
class RequestData:
    """One in-flight request as the scheduler half sees it in ``build_connector_meta``."""

    request_id: int
    new_tokens: list[int]  # tokens not reported in earlier iterations
    new_block_ids: list[int]  # blocks allocated since the last report
    computed_position: int  # tokens with valid KV before this iteration
    num_scheduled_tokens: int  # tokens computed in this iteration


@dataclass
class SchedulerOutput:
    new_requests: list[RequestData] = field(default_factory=list)  # first appearance, once
    cached_requests: list[RequestData] = field(default_factory=list)


@dataclass(frozen=True)
class RecurrentStates:
    """The hybrid-state extension's view of an engine's linear-attention states.

    ``tensor``: (num_slots, num_linear_layers, heads, d_k, d_v); ``slot_of(request_id)`` gives a
    live request's slot; ``state_layer_of[layer_idx]`` / ``pool_layer_of[layer_idx]`` map a decoder
    layer to its index in the state tensor / the KV pool (absent when the layer is the other kind).
    ``store_snapshot(request_id, num_tokens, state)`` (optional: an engine with a prefix cache)
    keeps ``state`` (num_linear_layers, heads, d_k, d_v), the states after exactly ``num_tokens``
    prompt tokens (a block boundary) relayed by the prefill node, as a snapshot a later request
    can resume from; called from ``start_load_kv``/``get_finished`` while the request is live.
    """

    tensor: torch.Tensor
    slot_of: Callable[[int], int]
    state_layer_of: dict[int, int]
    pool_layer_of: dict[int, int]
    store_snapshot: Callable[[int, int, torch.Tensor], None] | None = None

    @property
    def state_bytes(self) -> int:
        """Bytes of one request's states over all linear layers."""
        return int(self.tensor[0].numel() * self.tensor.element_size())


class SupportsRecurrentStates(ABC):
    """Capability: the host hands the worker its linear-attention states once at start."""

    @abstractmethod
    def register_recurrent_states(self, states: RecurrentStates) -> None: ...


class SupportsLoadFailures(ABC):
    """Capability: loads that failed since the last call, as ``(request id, reason)``; the host
    then fails or recomputes each request (its policy) instead of waiting for it."""

    @abstractmethod
    def get_failed_loads(self) -> list[tuple[int, str]]: ...


class SupportsCancel(ABC):
    """Capability: the host gave up on a request's load or save (deadline or abort); after the
    call returns the worker never touches the request's blocks again."""

    @abstractmethod
    def cancel_load(self, request_id: int) -> None: ...

    @abstractmethod
    def cancel_save(self, request_id: int) -> None: ...


@dataclass
class ConnectorPair:
    """The two halves an engine hosts (in one process, tensor parallelism 1)."""

    scheduler: Any  # KvCacheConnectorScheduler
    worker: Any  # KvCacheConnectorWorker


class _ProjectKvCacheConnectorWorker(ABC):
    """Worker half; same names and signatures as TensorRT-LLM's ``KvCacheConnectorWorker``."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        self._metadata: object = None

    def bind_connector_meta(self, metadata: object) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None: ...

    @abstractmethod
    def start_load_kv(self, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_save(self, stream: Any) -> None: ...

    @abstractmethod
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]: ...


class _ProjectKvCacheConnectorScheduler(ABC):
    """Scheduler half; same names and signatures as TensorRT-LLM's."""

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object: ...

    @abstractmethod
    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]: ...

    @abstractmethod
    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool: ...

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None: ...


def resolve_base_classes() -> tuple[type, type]:
    """(worker base, scheduler base): TensorRT-LLM's when it is loaded here, else the project's."""
    if "tensorrt_llm" in sys.modules:
        for module_name in TRTLLM_CONNECTOR_MODULES:
            module = _import_quietly(module_name)
            if module is not None:
                return module.KvCacheConnectorWorker, module.KvCacheConnectorScheduler
    return _ProjectKvCacheConnectorWorker, _ProjectKvCacheConnectorScheduler


def _import_quietly(module_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module_name)
    except Exception:  # any import failure means "not this path": try the next one
        return None


_WorkerBase, _SchedulerBase = resolve_base_classes()


class KvCacheConnectorWorker(_WorkerBase):  # type: ignore[misc, valid-type]
    """Base of the project's worker halves (TensorRT-LLM's class when it is loaded)."""


class KvCacheConnectorScheduler(_SchedulerBase):  # type: ignore[misc, valid-type]
    """Base of the project's scheduler halves (TensorRT-LLM's class when it is loaded)."""
