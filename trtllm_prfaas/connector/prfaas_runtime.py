"""Process-wide state of the PrfaaS connector: its config, relay senders, receiver, and loads.

Both connector halves of one process share one ``PrfaasRuntime`` (TensorRT-LLM constructs them
separately with ``llm_args`` only): the reference engine passes it in
``llm_args.connector_options["prfaas_runtime"]``; inside TensorRT-LLM, ``runtime_for(config,
key)`` starts one per process from the ``TRTLLM_PRFAAS_*`` variables, read at the edge
(``config.connector_config_from_env``).

Transfer identity. The router names a transfer with an opaque ``transfer_uuid``; both sides
derive the full transfer id from it and the content they agree on::

    transfer_id = f"{uuid}.{prefix_hash(prompt[:L-1], cache_key):016x}.{L-1}"

so a decode node only ever claims a transfer whose blocks were computed for exactly its own
prompt prefix, model, layout, dtype and TP rank; anything else simply is not found, and the
prompt is computed locally.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from trtllm_prfaas.errors import ConfigError, PrfaasError, TransportError
from trtllm_prfaas.kv.hashing import CacheKey, prefix_hash
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import RelayConfig, RelayReceiver, RelaySender

__all__ = [
    "LoadResult",
    "PrfaasConnectorConfig",
    "PrfaasRuntime",
    "Role",
    "cache_key_of",
    "runtime_for",
    "transfer_id_for",
]

log = get_logger(__name__)


class Role(Enum):
    PREFILL = "prefill"  # exports KV: runs prompts with max_tokens=1 and streams their KV out
    DECODE = "decode"  # imports KV: claims relayed prefixes, then decodes


@dataclass(frozen=True)
class PrfaasConnectorConfig:
    role: Role
    relay: RelayConfig
    receiver_endpoint: str = "tcp://127.0.0.1:0"  # decode side: where the relay receiver binds
    transfer_timeout_s: float = 120.0  # prefill side: the whole transfer is acknowledged by then
    load_timeout_s: float = 120.0  # decode side: every layer has arrived by then

    def __post_init__(self) -> None:
        for name in ("transfer_timeout_s", "load_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"PrfaasConnectorConfig.{name} must be > 0")


def transfer_id_for(uuid: str, prompt: list[int], key: CacheKey) -> str:
    """The content-bound transfer id (see module docstring); ``prompt`` is the whole prompt."""
    if "." in uuid or not uuid:
        raise ConfigError(f"transfer uuid {uuid!r} must be non-empty and contain no '.'")
    claimed = len(prompt) - 1
    return f"{uuid}.{prefix_hash(prompt[:claimed], key):016x}.{claimed}"


@dataclass
class LoadResult:
    """Outcome of one asynchronous load on the decode side (``error`` None when it worked)."""

    request_id: int
    error: PrfaasError | None = None


@dataclass
class PrfaasRuntime:
    """Owns the sockets: one receiver (decode role) or senders by endpoint (prefill role)."""

    config: PrfaasConnectorConfig
    key: CacheKey
    receiver: RelayReceiver | None = None
    senders: dict[str, RelaySender] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loads: dict[int, threading.Thread] = field(default_factory=dict)
    _results: list[LoadResult] = field(default_factory=list)
    _closed: bool = False

    @classmethod
    def start(cls, config: PrfaasConnectorConfig, key: CacheKey) -> PrfaasRuntime:
        runtime = cls(config, key)
        if config.role is Role.DECODE:
            runtime.receiver = RelayReceiver(config.relay, config.receiver_endpoint)
        return runtime

    @property
    def receiver_endpoint(self) -> str:
        if self.receiver is None:
            raise ConfigError("only a decode-role PrfaaS runtime has a relay receiver")
        return self.receiver.endpoint

    def sender_for(self, endpoint: str) -> RelaySender:
        """The sender to one decode node's receiver, created on first use and kept."""
        with self._lock:
            if self._closed:
                raise TransportError("PrfaaS runtime is closed")
            sender = self.senders.get(endpoint)
            if sender is None:
                sender = RelaySender(endpoint, self.config.relay)
                self.senders[endpoint] = sender
            return sender

    def start_load(self, request_id: int, work: Callable[[], None]) -> None:
        """Run ``work`` (one request's layer-by-layer load) on its own thread."""

        def run() -> None:
            error: PrfaasError | None = None
            try:
                work()
            except PrfaasError as exc:
                error = exc
            except Exception as exc:  # never silent: the request fails with the cause
                error = TransportError(f"load of request {request_id} failed: {exc!r}")
            if error is not None:
                log.warning("relay_load_failed", request_id=request_id, error=str(error))
            with self._lock:
                self._results.append(LoadResult(request_id, error))
                self._loads.pop(request_id, None)

        thread = threading.Thread(target=run, name=f"prfaas-load-{request_id}", daemon=True)
        with self._lock:
            self._loads[request_id] = thread
        thread.start()

    def take_results(self) -> list[LoadResult]:
        with self._lock:
            results, self._results = self._results, []
            return results

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop: join loads (they end by their own deadlines), close sockets. Idempotent."""
        with self._lock:
            self._closed = True
            loads = list(self._loads.values())
        for thread in loads:
            thread.join(timeout_s)
        for sender in self.senders.values():
            sender.close()
        self.senders.clear()
        if self.receiver is not None:
            self.receiver.close()

    def __enter__(self) -> PrfaasRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_process_runtime: PrfaasRuntime | None = None
_process_lock = threading.Lock()


def runtime_for(config: PrfaasConnectorConfig, key: CacheKey) -> PrfaasRuntime:
    """This process's runtime, started on the first call (the scheduler half) and returned to
    the next (the worker half). A call with another configuration raises ConfigError; a closed
    runtime is replaced."""
    global _process_runtime
    with _process_lock:
        current = _process_runtime
        if current is None or current._closed:
            current = _process_runtime = PrfaasRuntime.start(config, key)
        elif (current.config, current.key) != (config, key):
            raise ConfigError("a PrfaaS runtime with another configuration runs in this process")
        return current


def cache_key_of(llm_args: Any) -> CacheKey:
    """What both sides of a TensorRT-LLM deployment agree on: the served model, the KV dtype
    (``kv_cache_config.dtype``), TensorRT-LLM's HND pool layout and this worker's TP rank."""
    model = str(getattr(llm_args, "model", "") or "")
    if not model:
        raise ConfigError("llm_args.model: needed to key relayed KV to the served model")
    dtype = str(getattr(getattr(llm_args, "kv_cache_config", None), "dtype", None) or "auto")
    return CacheKey(model, "HND", dtype, tp_rank=_tp_rank())


def _tp_rank() -> int:
    """This MPI worker's rank (= its tensor-parallel rank: pipeline parallelism is 1)."""
    try:
        from tensorrt_llm._utils import mpi_rank  # lazy: present only inside TensorRT-LLM
    except ImportError:
        return 0
    return int(mpi_rank())
