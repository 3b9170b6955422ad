"""The disaggregated orchestrator: route, reserve a decode slot, prefill, relay, decode.

For each request: ``policy.route`` (pure) picks the cluster by the threshold ``t`` and the
cache-affine, least-loaded prefill node, and the decode node; the router reserves a slot on the
decode node, then sends the decode worker its request (it waits for the relayed KV) and the
prefill worker its prefill (``max_tokens=1``, KV relayed layer by layer to the decode node).
The prefill's first token is streamed to the client as soon as it exists (bit-exactness makes it
equal to the decode node's first token, which is checked); the rest stream from the decode node.

The threshold is live state: a :class:`~trtllm_prfaas.router.control.ControlLoop` on the same
event loop (started with the orchestrator when ``RouterConfig.control`` is set, the default)
moves it every second from what the router observes; ``threshold_tokens`` is its initial value.
``convert_role`` drains a local PD worker, switches its role (``SetRole``) and rejoins it.

Every request has a deadline; a cancelled or late request is cancelled on both workers. If the
prefill leg fails, the decode worker computes the prompt itself (its ``fallback`` policy), so
the client still gets its tokens, or a clear error, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from trtllm_prfaas import errors
from trtllm_prfaas.engines.tokenizer import VOCAB_SIZE, ByteTokenizer, StreamingDecoder
from trtllm_prfaas.errors import InvalidRequestError, PrfaasError, TransferTimeout, TransportError
from trtllm_prfaas.policy.route import RequestView, RouteDecision, route
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator, TokenChunk
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.control import ControlConfig, ControlLoop, RouteRecord
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.worker import protocol as p

__all__ = ["DisaggregatedOrchestrator", "RouterConfig", "WorkerSpec"]

log = get_logger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    endpoint: str  # the worker's control endpoint
    is_prfaas: bool  # member of a PrfaaS (remote prefill) cluster


@dataclass(frozen=True)
class RouterConfig:
    workers: tuple[WorkerSpec, ...]
    model_name: str = "tensorrt_llm"
    threshold_tokens: int = 1024  # initial t: l > t prefills in the PrfaaS cluster
    announce_timeout_s: float = 30.0  # decode waits this long for the prefill to start
    connect_timeout_s: float = 30.0
    control: ControlConfig | None = field(default_factory=ControlConfig)  # None: t stays fixed


@dataclass
class _Flight:
    """Messages of one request from its two workers, and when its legs began (monotonic s)."""

    decision: RouteDecision
    prompt_tokens: int
    submitted_at: float = 0.0
    prefill_first_at: float | None = None
    decode_first_at: float | None = None
    num_decoded: int = 0
    queue: asyncio.Queue[tuple[str, p.Message]] = field(default_factory=asyncio.Queue)


class DisaggregatedOrchestrator(Orchestrator):
    """Talks to workers over their control endpoints; implements the Orchestrator contract."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._relay_bytes: dict[str, int] = {}
        self.cluster = ClusterState()
        self.tokenizer = ByteTokenizer()
        self.decisions: list[RouteDecision] = []  # recent decisions (for tests and parity)
        self.route_log: deque[RouteRecord] = deque(maxlen=10_000)  # inputs of each decision
        self.control = ControlLoop(
            config.control or ControlConfig(),
            self.cluster,
            float(config.threshold_tokens),
            metrics,
            converter=self.convert_role,
        )
        self._info_waiters: dict[str, asyncio.Future[p.WorkerInfo]] = {}
        self.counters: dict[str, int] = {"remote": 0, "local": 0, "first_token_mismatch": 0}
        self._ctx = zmq.asyncio.Context()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._flights: dict[str, _Flight] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._max_seq_len = 0
        self._ready = False

    # ------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect to every worker and learn its role; raises TransportError if one is silent."""
        for spec in self.config.workers:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(spec.endpoint)
            self._sockets[spec.name] = sock
            await sock.send(p.encode_message(p.Ping()))
            info = await self._await_info(spec, sock)
            self.cluster.add(WorkerState(spec.name, spec.endpoint, info, spec.is_prfaas))
            self._readers.append(asyncio.create_task(self._read(spec.name, sock)))
        self._max_seq_len = min(w.info.max_seq_len for w in self.cluster.workers.values())
        if self.config.control is not None:
            self.control.start()
        self._ready = True
        log.info("router_ready", workers=sorted(self.cluster.workers))

    async def _await_info(self, spec: WorkerSpec, sock: zmq.asyncio.Socket) -> p.WorkerInfo:
        deadline = time.monotonic() + self.config.connect_timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                frame = await asyncio.wait_for(sock.recv(), remaining)
            except TimeoutError:
                break
            message = _decode(frame)
            if isinstance(message, p.WorkerInfo):
                return message
        raise TransportError(f"worker {spec.name} at {spec.endpoint} did not answer")

    async def close(self) -> None:
        self._ready = False
        await self.control.stop()
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._ctx.term()

    async def _read(self, name: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            message = _decode(await sock.recv())
            if isinstance(message, p.LoadReport):
                self.cluster.on_report(name, message)
                self._export_load(name, message)
            elif isinstance(message, p.WorkerInfo):
                self._on_info(name, message)
            elif isinstance(message, p.Tokens | p.TransferDone):
                flight = self._flights.get(message.request_id)
                if flight is not None:
                    flight.queue.put_nowait((name, message))

    def _on_info(self, name: str, info: p.WorkerInfo) -> None:
        waiter = self._info_waiters.get(name)
        if waiter is not None and not waiter.done():
            waiter.set_result(info)

    async def convert_role(self, name: str, role: str, timeout_s: float = 120.0) -> p.WorkerInfo:
        """Drain local PD worker ``name``, switch it to ``role`` and rejoin it; returns its new
        ``WorkerInfo``. No new request goes to it meanwhile; its in-flight requests finish (the
        worker aborts those still running after ``timeout_s``). Raises ``TransportError`` if
        the worker does not come back in ``timeout_s`` + 10 s (it stays drained then), or came
        back in its old role (it could not build the new one, e.g. no relay receiver keys)."""
        worker = self.cluster.workers[name]
        if worker.is_prfaas:
            raise errors.ConfigError(f"{name} is a PrfaaS worker: only PD workers change role")
        future: asyncio.Future[p.WorkerInfo] = asyncio.get_running_loop().create_future()
        self._info_waiters[name] = future
        worker.is_draining = True
        log.info("role_change_started", worker=name, role=role)
        try:
            await self._send(name, p.SetRole(role, drain_timeout_s=timeout_s))
            info = await asyncio.wait_for(future, timeout_s + 10.0)
        except TimeoutError as exc:
            raise TransportError(f"worker {name} did not rejoin as {role}") from exc
        finally:
            self._info_waiters.pop(name, None)
        self.cluster.on_info(name, info)
        worker.is_draining = False
        if info.role != role:
            raise TransportError(f"worker {name} stayed {info.role}: it could not become {role}")
        if self.metrics is not None:
            self.metrics.record_role_conversion(role)
        log.info("role_change_done", worker=name, role=role, relay=info.relay_endpoint)
        return info

    def _export_load(self, name: str, report: p.LoadReport) -> None:
        if self.metrics is None:
            return
        self.metrics.set_worker_load(name, report.queue_depth, report.num_free_slots)
        delta = report.relay_bytes_sent - self._relay_bytes.get(name, 0)
        if delta > 0:
            self._relay_bytes[name] = report.relay_bytes_sent
            goodput = report.relay_goodput_gbps or None
            self.metrics.add_relay_bytes(name, delta, goodput)

    # ----------------------------------------------------------------------- Orchestrator
    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def is_ready(self) -> bool:
        return self._ready

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        self._validate(request)
        decision = self._route(request)
        decode = self.cluster.workers[decision.decode_node_id or ""]
        prefill = self.cluster.workers[decision.prefill_node_id]
        rid = request.request_id
        flight = self._flights[rid] = _Flight(decision, len(request.prompt_token_ids))
        decode.reserved_slots += 1
        finished, status = False, "cancelled"
        try:
            async with asyncio.timeout(request.deadline_s):
                flight.submitted_at = time.monotonic()
                await self._submit(request, decode, prefill)
                async for chunk in self._stream(request, flight, decode.name):
                    finished = chunk.is_final
                    status = "ok" if finished else status
                    yield chunk
        except TimeoutError as exc:
            status = "TransferTimeout"
            message = f"request {rid} missed its {request.deadline_s}s deadline"
            raise TransferTimeout(message) from exc
        except PrfaasError as exc:
            status = type(exc).__name__
            raise
        finally:
            decode.reserved_slots -= 1
            self._flights.pop(rid, None)
            if self.metrics is not None:
                self.metrics.record_request("remote" if decision.is_remote else "local", status)
            if not finished:  # cancelled, failed or late: free both workers' blocks
                await self._cancel(rid, decode.name, prefill.name)

    def _validate(self, request: GenerateRequest) -> None:
        if not self._ready:
            raise errors.AdmissionRejected("router is not ready")
        total = len(request.prompt_token_ids) + request.max_tokens
        if total > self._max_seq_len:
            raise InvalidRequestError(
                f"prompt of {len(request.prompt_token_ids)} tokens + max_tokens "
                f"{request.max_tokens} exceeds the max sequence length {self._max_seq_len}"
            )

    def _route(self, request: GenerateRequest) -> RouteDecision:
        now = time.monotonic()
        view = RequestView(request.request_id, len(request.prompt_token_ids))
        state, snapshot = self.control.policy, self.cluster.view(now)
        decision = route(view, snapshot, state, now)
        if decision.decode_node_id is None:
            raise errors.AdmissionRejected("no decode node is available")
        self.route_log.append(RouteRecord(now, view, snapshot, state, decision))
        self.control.on_routed(decision, view.prompt_tokens, request.max_tokens)
        self.counters["remote" if decision.is_remote else "local"] += 1
        self.decisions.append(decision)
        del self.decisions[:-1000]
        log.info(
            "routed",
            request_id=request.request_id,
            remote=decision.is_remote,
            prefill=decision.prefill_node_id,
            decode=decision.decode_node_id,
            tokens=len(request.prompt_token_ids),
            threshold=decision.threshold_tokens,
        )
        return decision

    async def _submit(
        self, request: GenerateRequest, decode: WorkerState, prefill: WorkerState
    ) -> None:
        transfer = uuid.uuid4().hex
        common: dict[str, Any] = dict(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            transfer_uuid=transfer,
            deadline_s=request.deadline_s,
        )
        await self._send(
            decode.name, p.Submit(announce_timeout_s=self.config.announce_timeout_s, **common)
        )
        await self._send(
            prefill.name, p.Submit(relay_endpoint=decode.info.relay_endpoint, **common)
        )

    async def _send(self, worker: str, message: p.Message) -> None:
        await self._sockets[worker].send(p.encode_message(message))

    async def _stream(
        self, request: GenerateRequest, flight: _Flight, decode_name: str
    ) -> AsyncGenerator[TokenChunk, None]:
        """Chunks from the prefill's first token and the decode node's tokens."""
        decoder = StreamingDecoder()
        early: int | None = None  # the prefill's first token, if it was streamed first
        decode_started = False
        while True:
            source, message = await flight.queue.get()
            if not isinstance(message, p.Tokens):
                continue
            tokens = list(message.token_ids)
            self._observe(flight, source == decode_name, len(tokens), bool(message.finished))
            if source != decode_name:  # the prefill leg: stream its first token if it leads
                if tokens and not decode_started and early is None and not message.error_kind:
                    early = tokens[0]
                    final = request.max_tokens == 1
                    yield TokenChunk(
                        [early], decoder.push([early]), final, "length" if final else None
                    )
                continue
            if message.error_kind:
                raise _error(message)
            if not decode_started and tokens and early is not None:
                if tokens[0] != early:  # never expected: every route is bit-exact
                    self.counters["first_token_mismatch"] += 1
                    log.error("first_token_mismatch", request_id=request.request_id)
                tokens = tokens[1:]
            decode_started = decode_started or bool(message.token_ids)
            if message.finished:
                if request.max_tokens == 1 and early is not None:
                    return  # the prefill's token already was the final chunk
                text = decoder.push(tokens) + decoder.flush()
                yield TokenChunk(tokens, text, True, message.finish_reason)
                return
            if tokens:
                yield TokenChunk(tokens, decoder.push(tokens))

    def _observe(self, flight: _Flight, is_decode: bool, num_tokens: int, finished: bool) -> None:
        """Leg timings for the control loop's online profiles."""
        now = time.monotonic()
        if not is_decode:
            if flight.prefill_first_at is None and num_tokens:
                flight.prefill_first_at = now
                is_remote = flight.decision.is_remote
                self.control.on_prefill(is_remote, flight.prompt_tokens, now - flight.submitted_at)
            return
        if flight.decode_first_at is None and num_tokens:
            flight.decode_first_at = now
            if flight.decision.is_remote and flight.prefill_first_at is not None:
                self.control.on_relay_wait(now - flight.prefill_first_at)
        flight.num_decoded += num_tokens
        if finished and flight.decode_first_at is not None and flight.num_decoded > 1:
            self.control.on_decode(flight.num_decoded - 1, now - flight.decode_first_at)

    async def _cancel(self, request_id: str, *workers: str) -> None:
        for worker in dict.fromkeys(workers):
            with contextlib.suppress(zmq.ZMQError):
                await self._send(worker, p.Cancel(request_id))


def _decode(frame: bytes) -> p.Message | None:
    try:
        return p.decode_message(frame)
    except (msgspec.ValidationError, msgspec.DecodeError):
        log.warning("router_bad_worker_message")
        return None


def _error(message: p.Tokens) -> PrfaasError:
    kind = getattr(errors, message.error_kind, errors.EngineError)
    cls = kind if isinstance(kind, type) and issubclass(kind, PrfaasError) else errors.EngineError
    return cls(message.error_message or message.error_kind)
