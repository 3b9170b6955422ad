"""Per-rank state of the PrfaaS connector: config, plan book and server, relay sockets, sends.

TensorRT-LLM builds a worker half in every tensor-parallel rank and the scheduler half on rank 0
only, each with ``llm_args`` alone (``py_executor_creator.py`` ``create_py_executor``, 000429d).
Both halves of one rank share one ``PrfaasRuntime``: the reference engine passes it in
``llm_args.connector_options["prfaas_runtime"]``; inside TensorRT-LLM ``runtime_for(config, key)``
starts one per ``(role, CacheKey)`` from the ``TRTLLM_PRFAAS_*`` variables, read at the edge
(``config.connector_config_from_env``). The key includes the rank, so one test process can host
a prefill and a decode deployment of several ranks each.

Per rank r: a decode runtime binds its relay receiver at ``receiver_endpoint``'s port + r and
advertises ``relay_advertise``'s port + r; a runtime with a ``plan_endpoint`` serves plans at its
port + r (rank 0 stores posted plans in ``plans``; every rank answers status queries about its
own receiver). A port of 0 stays 0 (ephemeral, for tests).

Transfer identity (each rank computes its own; the scheduler's metadata carries the uuid and the
claimed tokens, never a rank-0 id)::

    transfer_id = f"{uuid}.{prefix_hash(claimed_tokens, key):016x}.{len(claimed_tokens)}"

so a decode rank only ever claims a transfer computed for exactly its own tokens, model, layout,
dtype and rank; anything else is not found, and the prompt is computed locally.
"""

from __future__ import annotations

import collections
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trtllm_prfaas.connector.device import DeviceEvent
from trtllm_prfaas.connector.plans import Plan, PlanBook, PlanServer
from trtllm_prfaas.errors import ConfigError, TransportError
from trtllm_prfaas.kv.hashing import CacheKey, prefix_hash
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import RelayConfig, RelayReceiver, RelaySecurity, RelaySender
from trtllm_prfaas.vocabulary import Role

__all__ = [
    "PrfaasConnectorConfig",
    "PrfaasRuntime",
    "Role",
    "SendPump",
    "cache_key_of",
    "close_runtimes",
    "rank_endpoint",
    "runtime_for",
    "transfer_id_for",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class PrfaasConnectorConfig:
    role: Role
    relay: RelayConfig
    receiver_endpoint: str = "tcp://127.0.0.1:0"  # decode: where rank 0's receiver binds
    transfer_timeout_s: float = 120.0  # prefill side: the whole transfer is acknowledged by then
    load_timeout_s: float = 120.0  # decode side: a claimed load is in the pool by then
    plan_endpoint: str | None = None  # where rank 0's plan server binds; None: no plan server
    plan_security: RelaySecurity | None = None  # the plan server's Curve keys (or plaintext)
    relay_advertise: str | None = None  # decode: rank 0's receiver as prefill ranks reach it
    plan_ttl_s: float = 600.0  # a posted plan not taken by then expires (counted)
    # prefill: also bind a receiver, to take a cached prefix moved here from another node
    # (issue 15 item 5: a cache move's target claims it like a decode leg, then reuses it)
    accept_moves: bool = False

    def __post_init__(self) -> None:
        for name in ("transfer_timeout_s", "load_timeout_s", "plan_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"PrfaasConnectorConfig.{name} must be > 0")
        if self.plan_endpoint is not None and self.plan_security is None:
            raise ConfigError("PrfaasConnectorConfig.plan_security: required with plan_endpoint")


def transfer_id_for(uuid: str, claimed_tokens: Sequence[int], key: CacheKey) -> str:
    """The content-bound transfer id of one rank (module docstring): the prefill passes its
    whole prompt, the decode its tokens without the last one."""
    if "." in uuid or not uuid:
        raise ConfigError(f"transfer uuid {uuid!r} must be non-empty and contain no '.'")
    n = len(claimed_tokens)
    return f"{uuid}.{prefix_hash(list(claimed_tokens), key):016x}.{n}"


_PORT = re.compile(r"^(?P<head>.*):(?P<port>\d+)$")


def rank_endpoint(endpoint: str, rank: int) -> str:
    """``endpoint`` with its port + ``rank`` (port 0 stays 0: ephemeral)."""
    match = _PORT.match(endpoint)
    if match is None:
        raise ConfigError(f"endpoint {endpoint!r}: expected transport://host:port")
    port = int(match["port"])
    return endpoint if port == 0 else f"{match['head']}:{port + rank}"


class SendPump:
    """Runs relay sends in order once their device event completed, off the executor's thread.

    ``submit(event, fn)``: with nothing queued and the event already complete, ``fn`` runs at once
    (host pools); otherwise it is queued and the pump thread waits for the event, then runs it.
    Errors are logged and counted by the caller's ``fn``; the pump never dies of one."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[DeviceEvent, Callable[[], object]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._num_queued = 0
        self._thread: threading.Thread | None = None
        self._name = name

    def submit(self, event: DeviceEvent, fn: Callable[[], object]) -> None:
        with self._lock:
            if self._num_queued == 0 and event.query():
                _run(fn)
                return
            self._num_queued += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((event, fn))

    def _loop(self) -> None:
        while (work := self._queue.get()) is not None:
            event, fn = work
            try:
                event.synchronize()  # this thread only: the executor never waits here
            except Exception as exc:  # the device failed: the send's own error path reports it
                log.error("prfaas_staging_failed", error=repr(exc))
            with self._lock:
                _run(fn)
                self._num_queued -= 1

    def close(self, timeout_s: float) -> None:
        """Run what is queued, then stop and join the thread. Idempotent."""
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)
            self._thread = None


def _run(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:  # never silent, never fatal to the pump
        log.error("prfaas_send_failed", error=repr(exc))


@dataclass
class PrfaasRuntime:
    """One rank's sockets and books. ``counts``: plans_missed, plans_refused, loads_failed,
    transfers_incomplete, sends_failed, ... (read by tests and metrics)."""

    config: PrfaasConnectorConfig
    key: CacheKey
    tp_size: int = 1
    plans: PlanBook = field(default_factory=PlanBook)
    receiver: RelayReceiver | None = None
    plan_server: PlanServer | None = None
    senders: dict[str, RelaySender] = field(default_factory=dict)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    pump: SendPump = field(default_factory=lambda: SendPump("prfaas-sends"))
    failed_loads: collections.OrderedDict[str, str] = field(
        default_factory=collections.OrderedDict
    )  # transfer uuid -> why its load failed on this rank (the latest ``_FAILED_KEPT``)
    loaded: collections.OrderedDict[str, None] = field(
        default_factory=collections.OrderedDict
    )  # transfer uuids whose load completed on this rank (the latest ``_FAILED_KEPT``)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    @property
    def rank(self) -> int:
        return self.key.tp_rank

    @classmethod
    def start(cls, config: PrfaasConnectorConfig, key: CacheKey, tp_size: int = 1) -> PrfaasRuntime:
        """Bind this rank's receiver (decode) and plan server (when configured)."""
        if not 0 <= key.tp_rank < tp_size:
            raise ConfigError(f"tensor-parallel rank {key.tp_rank} outside size {tp_size}")
        runtime = cls(config, key, tp_size, PlanBook(config.plan_ttl_s))
        try:
            if config.role is Role.DECODE or config.accept_moves:
                endpoint = rank_endpoint(config.receiver_endpoint, key.tp_rank)
                runtime.receiver = RelayReceiver(config.relay, endpoint)
            if config.plan_endpoint is not None:
                assert config.plan_security is not None
                runtime.plan_server = PlanServer(
                    rank_endpoint(config.plan_endpoint, key.tp_rank),
                    config.plan_security,
                    key.tp_rank,
                    book=runtime.plans if key.tp_rank == 0 else None,
                    status_of=runtime.status_of,
                    check=runtime.refusal,
                )
        except BaseException:
            runtime.close()
            raise
        return runtime

    @property
    def receiver_endpoint(self) -> str:
        """Where prefill rank ``rank`` sends: the advertised address, else the bound one."""
        if self.receiver is None:
            raise ConfigError("only a decode-role PrfaaS runtime has a relay receiver")
        if self.config.relay_advertise:
            return rank_endpoint(self.config.relay_advertise, self.rank)
        return self.receiver.endpoint

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def note_load_failed(self, transfer_uuid: str, reason: str) -> None:
        """Count a failed load and answer ``load_failed`` to status queries about it."""
        with self._lock:
            self.counts["loads_failed"] += 1
            self.failed_loads[transfer_uuid] = reason
            while len(self.failed_loads) > _FAILED_KEPT:
                self.failed_loads.popitem(last=False)

    def note_loaded(self, transfer_uuid: str) -> None:
        """A load whose copies into the pool completed: answer ``loaded`` to status queries."""
        with self._lock:
            self.counts["loads_completed"] += 1
            self.loaded[transfer_uuid] = None
            while len(self.loaded) > _FAILED_KEPT:
                self.loaded.popitem(last=False)

    def refusal(self, plan: Plan) -> str | None:
        """Why this deployment cannot carry ``plan`` (None: it can)."""
        if self.config.role is Role.PREFILL and len(plan.relay_endpoints) != self.tp_size:
            return (
                f"the plan names {len(plan.relay_endpoints)} decode relay endpoint(s) but this "
                f"prefill deployment has tensor-parallel size {self.tp_size}: prefill and "
                "decode must have the same tensor-parallel size (rank r sends to rank r)"
            )
        return None

    def status_of(self, transfer_uuid: str, num_tokens: int) -> str:
        """This rank's status of the transfer: ``load_failed`` once its load failed here,
        ``loaded`` once its copies into the pool completed, else the receiver's (an
        ``InboundStatus`` value; "" when unknown or not a decode rank)."""
        with self._lock:
            if transfer_uuid in self.failed_loads:
                return "load_failed"
            if transfer_uuid in self.loaded:
                return "loaded"
        if self.receiver is None:
            return ""
        head, tail = f"{transfer_uuid}.", f".{num_tokens}"
        receiver = self.receiver
        with receiver.cond:  # the receiver's own lock; its maps are keyed by full transfer id
            for tid, inbound in receiver.transfers.items():
                if tid.startswith(head) and tid.endswith(tail):
                    return str(inbound.status.value)
            failed = any(t.startswith(head) and t.endswith(tail) for t in receiver.finished)
        return "failed" if failed else ""

    def sender_for(self, endpoint: str) -> RelaySender:
        """The sender to one decode rank's receiver, created on first use and kept."""
        with self._lock:
            if self._closed:
                raise TransportError("PrfaaS runtime is closed")
            sender = self.senders.get(endpoint)
            if sender is None:
                sender = RelaySender(endpoint, self.config.relay)
                self.senders[endpoint] = sender
            return sender

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop: drain the send pump, close the plan server and sockets. Idempotent."""
        with self._lock:
            self._closed = True
        self.pump.close(timeout_s)
        if self.plan_server is not None:
            self.plan_server.close(timeout_s)
        for sender in self.senders.values():
            sender.close()
        self.senders.clear()
        if self.receiver is not None:
            self.receiver.close()

    def __enter__(self) -> PrfaasRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_FAILED_KEPT = 4096  # failed-load notes a runtime keeps for status queries
_runtimes: dict[tuple[Role, CacheKey], PrfaasRuntime] = {}
_runtimes_lock = threading.Lock()


def runtime_for(config: PrfaasConnectorConfig, key: CacheKey, tp_size: int = 1) -> PrfaasRuntime:
    """This process's runtime for ``(config.role, key)``, started on the first call (either
    half) and returned to the next. Another configuration for the same role and key raises
    ConfigError; a closed runtime is replaced."""
    with _runtimes_lock:
        current = _runtimes.get((config.role, key))
        if current is None or current._closed:
            current = _runtimes[(config.role, key)] = PrfaasRuntime.start(config, key, tp_size)
        elif (current.config, current.tp_size) != (config, tp_size):
            raise ConfigError(
                f"a PrfaaS {config.role.value} runtime with another configuration runs in this "
                f"process for rank {key.tp_rank}"
            )
        return current


def close_runtimes() -> None:
    """Close every runtime ``runtime_for`` started (tests; process shutdown)."""
    with _runtimes_lock:
        runtimes = list(_runtimes.values())
        _runtimes.clear()
    for runtime in runtimes:
        runtime.close()


def cache_key_of(llm_args: Any) -> CacheKey:
    """What both sides of a TensorRT-LLM deployment agree on: the served model, the KV dtype
    (``kv_cache_config.dtype``), TensorRT-LLM's HND pool layout and this worker's TP rank."""
    model = str(getattr(llm_args, "model", "") or "")
    if not model:
        raise ConfigError("llm_args.model: needed to key relayed KV to the served model")
    dtype = str(getattr(getattr(llm_args, "kv_cache_config", None), "dtype", None) or "auto")
    return CacheKey(model, "HND", dtype, tp_rank=_tp_rank())


def tp_size_of(llm_args: Any) -> int:
    """``llm_args.tensor_parallel_size`` (a ``TorchLlmArgs`` field), 1 when absent."""
    return int(getattr(llm_args, "tensor_parallel_size", None) or 1)


def _tp_rank() -> int:
    """This MPI worker's rank (= its tensor-parallel rank: pipeline parallelism is 1)."""
    try:
        from tensorrt_llm._utils import mpi_rank  # lazy: present only inside TensorRT-LLM
    except ImportError:
        return 0
    return int(mpi_rank())
