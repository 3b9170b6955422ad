"""What a worker needs from an engine, and the event-loop bridge the remote adapters share.

``Engine`` is the surface ``worker/server.py`` drives (structural: ``ReferenceEngine``,
``TrtllmEngine`` and ``TritonEngine`` all satisfy it without inheriting from it):

``add_request(prompt_token_ids, sampling, request_id=None, plan=None) -> int``
    Validate and queue; raises ``InvalidRequestError`` / ``AdmissionRejected`` at once for input
    that can never run. ``plan`` (``connector.plans.Plan``) is the request's PrfaaS transfer; the
    engine makes it reachable by its KV cache connector BEFORE the request can be scheduled: the
    reference engine posts it into its in-process runtime's ``PlanBook``; engines whose connector
    runs in another process (``TritonEngine``, ``TrtllmEngine``) post it to the connector's plan
    server and wait for the acknowledgement (``engines/remote_plans.py``), skipping (counted,
    logged) a plan whose claimed tokens differ from the tokens that engine will actually run.
``transfer_status(transfer_uuid, num_tokens) -> InboundStatus | None`` (remote engines only)
    The transfer of ``num_tokens`` claimed tokens over every rank of the remote connector:
    COMPLETE only when complete on all ranks, None when no rank knows it.
``step() -> list[RequestOutput]``
    One iteration's outputs. Never raises for one request's failure: that request ends with a
    ``RequestOutput`` whose ``finish_reason`` is ``"error"``. Blocks at most a short poll interval.
``abort(request_id) -> RequestOutput | None``
    Cancel wherever the request is; idempotent; None when the id is unknown or already over.
``has_unfinished()``, ``waiting`` / ``running`` (sized), ``slots.num_free``,
``blocks.num_available``, ``connector`` (a ``ConnectorPair`` hosted in this process, or None when
the connector lives elsewhere, e.g. inside TensorRT-LLM's workers), ``config``.
Optional capability ``SupportsKvEvents`` (``drain_kv_events() -> KvEventBatch``,
``kv_events_snapshot() -> KvSnapshot``): the engine's prefix cache reports stored and removed
blocks for the router's prefix index, and all it holds for a router that joins late.
Optional capability ``SupportsPrefixPins`` (``pin_prefix(block_hashes) -> (pin_id, num_tokens)``,
``unpin_prefix(pin_id)``): a decode worker holds a reserved slot's cached prefix until its leg
is admitted, so the prefill relays only what lies beyond it (issue 15 item 4).

``describe(engine) -> EngineDescriptor`` is what a worker advertises about its engine (model id,
lengths, pool and batch sizes, KV bytes): an engine's own ``descriptor`` when it has one (remote
engines, whose model is not in this process), else read from a ``ReferenceEngine``-style
``config`` (``config.model`` with ``kv_spec``, ``config.num_blocks``, ``config.max_num_seqs``).

``LoopBridge`` runs one asyncio event loop on a thread owned by a remote adapter: request
coroutines run there and hand ``RequestOutput`` items back through a thread-safe queue that
``step()`` drains.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Coroutine, Iterator, Sized
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.errors import AdmissionRejected, InvalidRequestError

if TYPE_CHECKING:
    from trtllm_prfaas.connector.plans import Plan
    from trtllm_prfaas.kv.events import KvEventBatch, KvSnapshot

__all__ = [
    "BlocksView",
    "Engine",
    "EngineDescriptor",
    "LoopBridge",
    "RemoteFlights",
    "SlotsView",
    "SupportsKvEvents",
    "SupportsPrefixPins",
    "describe",
    "remaining_s",
]

T = TypeVar("T")


class _Free(Protocol):
    @property
    def num_free(self) -> int: ...


class _Available(Protocol):
    @property
    def num_available(self) -> int: ...


@runtime_checkable
class Engine(Protocol):
    """The engine surface the worker uses (see the module docstring for each contract)."""

    @property
    def waiting(self) -> Sized: ...  # requests queued, not admitted

    @property
    def running(self) -> Sized: ...  # requests admitted and not over

    @property
    def connector(self) -> Any: ...  # ConnectorPair | None

    @property
    def config(self) -> Any: ...

    @property
    def slots(self) -> _Free: ...

    @property
    def blocks(self) -> _Available: ...

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        request_id: int | None = None,
        plan: Plan | None = None,
    ) -> int: ...

    def step(self) -> list[RequestOutput]: ...

    def abort(self, request_id: int) -> RequestOutput | None: ...

    def has_unfinished(self) -> bool: ...


@runtime_checkable
class SupportsKvEvents(Protocol):
    """An engine whose prefix cache reports KV cache events (``ReferenceEngine``: nothing to
    report unless ``enable_block_reuse``; see ``kv/events.py``). The worker drains after each
    ``step()``, on the thread that steps the engine, and publishes the batch; the router feeds
    it to ``router.prefix_index.PrefixIndex.apply``. A router that joins late (or reconnects)
    gets ``kv_events_snapshot()``, taken right after a drain. Engines without it are indexed
    approximately."""

    def drain_kv_events(self) -> KvEventBatch: ...

    def kv_events_snapshot(self) -> KvSnapshot: ...


@runtime_checkable
class SupportsPrefixPins(Protocol):
    """An engine that can hold a cached prefix for a request not admitted yet
    (``ReferenceEngine``; a no-op answering 0 tokens unless ``enable_block_reuse``). Called on
    the thread that steps the engine; never blocks. ``pin_prefix`` matches ``block_hashes``
    (chained, the router's) exactly as admission will and references what matched; the
    tokens it returns are block aligned. ``unpin_prefix`` is idempotent."""

    def pin_prefix(self, block_hashes: list[int]) -> tuple[int, int]: ...

    def unpin_prefix(self, pin_id: int) -> None: ...


@dataclass(frozen=True)
class EngineDescriptor:
    """What a worker advertises about its engine (``WorkerInfo``); engine-neutral."""

    model_id: str
    max_seq_len: int  # prompt + output tokens one request may reach
    tokens_per_block: int
    num_blocks: int  # KV pool blocks (an estimate for remote engines; 0 when unknown)
    max_num_seqs: int  # concurrent requests (batch slots)
    kv_bytes_per_token: int = 0  # S_kv(l) = kv_state_bytes + kv_bytes_per_token * l; 0: unknown
    kv_state_bytes: int = 0


def describe(engine: Any) -> EngineDescriptor:
    """``engine.descriptor`` if it has one, else derived from a reference engine's config."""
    own = getattr(engine, "descriptor", None)
    if isinstance(own, EngineDescriptor):
        return own
    config = engine.config
    model = config.model
    spec = model.kv_spec
    return EngineDescriptor(
        model.model_id,
        model.max_seq_len,
        model.tokens_per_block,
        config.num_blocks,
        config.max_num_seqs,
        kv_bytes_per_token=spec.bytes_per_token,
        kv_state_bytes=spec.state_bytes,
    )


@dataclass
class SlotsView:
    """``slots.num_free`` of an engine whose batch slots live elsewhere."""

    num_free: int


@dataclass
class BlocksView:
    """``blocks.num_available`` of an engine whose KV pool lives elsewhere (an estimate)."""

    num_available: int


class LoopBridge:
    """An event loop on its own thread; a context manager. ``close()`` stops it and joins."""

    def __init__(self, name: str) -> None:
        self.outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the loop; the future carries its result or exception."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``coro`` on the loop and wait for it (at most ``timeout_s``)."""
        return self.submit(coro).result(timeout_s)

    def put(self, output: RequestOutput) -> None:
        """From the loop thread: hand one output to the engine's ``step()``."""
        self.outputs.put(output)

    def drain(self, wait_s: float) -> list[RequestOutput]:
        """Every output queued now; waits up to ``wait_s`` for the first if none is queued."""
        items: list[RequestOutput] = []
        try:
            items.append(
                self.outputs.get(timeout=wait_s) if wait_s > 0 else self.outputs.get_nowait()
            )
        except queue.Empty:
            return items
        while True:
            try:
                items.append(self.outputs.get_nowait())
            except queue.Empty:
                return items

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel the loop's tasks, stop the loop, join the thread. Idempotent."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                self.call(_cancel_all(), timeout_s)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> LoopBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _FlightLike(Protocol):
    num_blocks: int
    num_seen: int


class RemoteFlights:
    """The worker-facing bookkeeping shared by engines whose work runs elsewhere (TensorRT-LLM's
    executor, a remote Triton): requests in flight, the load report's estimates, and draining
    outputs from the ``LoopBridge``. Needs ``_flights``, ``_ids``, ``_bridge`` and a ``config``
    with ``max_batch_size``, ``num_blocks_hint``, ``max_in_flight``, ``tokens_per_block`` and
    ``poll_interval_s``."""

    _flights: dict[int, Any]
    _ids: Iterator[int]
    _bridge: LoopBridge
    config: Any

    @property
    def running(self) -> dict[int, Any]:
        return self._flights

    @property
    def waiting(self) -> list[int]:
        """Requests with no output yet (the remote side may still be queueing them)."""
        return [rid for rid, f in self._flights.items() if f.num_seen == 0]

    @property
    def slots(self) -> SlotsView:
        return SlotsView(max(0, self.config.max_batch_size - len(self._flights)))

    @property
    def blocks(self) -> BlocksView:
        used = sum(f.num_blocks for f in self._flights.values())
        return BlocksView(max(0, self.config.num_blocks_hint - used))

    def has_unfinished(self) -> bool:
        return bool(self._flights)

    def _admit(
        self, prompt_token_ids: list[int], sampling: SamplingParams, request_id: int | None
    ) -> tuple[int, int]:
        """Validate a new request; returns (request id, worst-case blocks) or raises."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty: at least one token is required")
        rid = next(self._ids) if request_id is None else request_id
        if rid in self._flights:
            raise InvalidRequestError(f"request id {rid} is already in use")
        if len(self._flights) >= self.config.max_in_flight:
            raise AdmissionRejected(f"{self.config.max_in_flight} requests already in flight")
        total = len(prompt_token_ids) + sampling.max_tokens
        return rid, -(-total // self.config.tokens_per_block)

    _control_timeout_s: float  # how long abort waits for the remote side to take the cancel

    async def _abort_remote(self, flight: Any) -> None:
        """Cancel one flight on the remote side (runs on the bridge's loop)."""
        raise NotImplementedError

    def abort(self, request_id: int) -> RequestOutput | None:
        """Cancel a request remotely (which frees its blocks there); its final output."""
        flight = self._flights.pop(request_id, None)
        if flight is None:
            return None
        self._bridge.call(self._abort_remote(flight), self._control_timeout_s)
        return RequestOutput(request_id, [], True, "aborted")

    def step(self) -> list[RequestOutput]:
        """Outputs that arrived since the last call (waits up to ``poll_interval_s`` for one)."""
        wait = self.config.poll_interval_s if self._flights else 0.0
        outputs = []
        for out in self._bridge.drain(wait):
            if out.request_id not in self._flights:
                continue  # aborted: abort() already returned its final output
            if out.finished:
                del self._flights[out.request_id]
            outputs.append(out)
        return outputs


def remaining_s(deadline: float) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value), never below zero."""
    return max(0.0, deadline - time.monotonic())
