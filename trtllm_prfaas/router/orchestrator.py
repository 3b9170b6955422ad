"""The disaggregated orchestrator: route, reserve a decode slot, prefill, relay, decode.

For each request: ``policy.route`` (pure) picks the cluster by the threshold ``t`` and the
cache-affine, least-loaded prefill node, and the decode node; the router reserves a slot on the
decode node, then runs the handoff TensorRT-LLM's own disaggregated serving uses, prompt plus first
token: the prefill worker runs the whole prompt (L tokens, ``max_tokens=1``), relays its KV layer
by layer to the decode node and returns t1, which is streamed to the client at once; the decode
worker then gets the prompt followed by t1 with ``max_tokens - 1`` (and one sampling draw
skipped, so seeded sampling continues exactly as one engine would), claims the L relayed tokens
and computes from t1. The output is t1 spliced before the decode's tokens; t1 = EOS or
``max_tokens == 1`` ends the request at t1 (``max_tokens == 1`` relays nothing).

The threshold is live state: a :class:`~trtllm_prfaas.router.control.ControlLoop` on the same
event loop (started with the orchestrator when ``RouterConfig.control`` is set, the default)
moves it every second from what the router observes; ``threshold_tokens`` is its initial value.
``convert_role`` drains a local PD worker, switches its role (``SetRole``) and rejoins it.

Every request has a deadline; a cancelled or late request is cancelled on both workers. If the
prefill leg fails or returns no t1 within ``prefill_timeout_s``, the decode worker runs the whole
request itself, and if the relay fails after t1 the decode worker computes the prompt (its
``fallback`` policy), so the client still gets its tokens, or a clear error, never a hang.

I/O: one plain (non-asyncio) ZeroMQ DEALER per worker. Sends go out at once with ``NOBLOCK``
(falling back to waiting for room only when the socket is full); received messages are drained
with ``NOBLOCK`` in a loop from one event-loop reader callback per socket, and each ``Tokens``
goes to its request's channel (a deque and one future, made only while the request waits).
ZeroMQ's descriptor is edge-triggered: after every send the socket's events are checked, and a
drain is scheduled if messages became readable meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

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

_SEND_RETRY_S = (0.0005, 0.01)  # a full socket: first and longest wait before retrying a send


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
    announce_timeout_s: float = 30.0  # decode waits this long for the transfer to be announced
    prefill_timeout_s: float = 120.0  # no t1 by then: the decode node runs the whole request
    connect_timeout_s: float = 30.0
    control: ControlConfig | None = field(default_factory=ControlConfig)  # None: t stays fixed


class _Flight:
    """``Tokens`` of one request from its two workers (a FIFO channel: ``put`` from the reader,
    ``get`` from the request's task), and when its legs began (monotonic s)."""

    __slots__ = (
        "decision",
        "decode_first_at",
        "messages",
        "num_decoded",
        "prefill_first_at",
        "prompt_tokens",
        "relayed",
        "submitted_at",
        "waiter",
    )

    def __init__(self, decision: RouteDecision, prompt_tokens: int) -> None:
        self.decision = decision
        self.prompt_tokens = prompt_tokens
        self.submitted_at = 0.0
        self.prefill_first_at: float | None = None
        self.decode_first_at: float | None = None
        self.num_decoded = 0
        self.relayed = False  # the decode leg was sent with the prefill's transfer
        self.messages: deque[tuple[str, p.Tokens]] = deque()
        self.waiter: asyncio.Future[None] | None = None  # set while ``get`` waits

    def put(self, source: str, message: p.Tokens) -> None:
        self.messages.append((source, message))
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> tuple[str, p.Tokens]:
        while not self.messages:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.messages.popleft()


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
        self.counters: dict[str, int] = {
            "remote": 0,
            "local": 0,
            "prefill_fallback": 0,
            "relay_recomputed": 0,
        }
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        self._fds: dict[str, int] = {}  # worker -> its socket's descriptor, watched by the loop
        self._drains: set[str] = set()  # workers with a drain scheduled (call_soon)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flights: dict[str, _Flight] = {}
        # transfer uuids: this router's random prefix + a counter (unique, like uuid4().hex)
        self._transfer_prefix = uuid.uuid4().hex[:20]
        self._transfer_ids = itertools.count()
        self._max_seq_len = 0
        self._ready = False

    # ------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect to every worker and learn its role; raises TransportError if one is silent."""
        self._loop = asyncio.get_running_loop()
        for spec in self.config.workers:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(spec.endpoint)
            self._sockets[spec.name] = sock
            self._fds[spec.name] = fd = int(sock.getsockopt(zmq.FD))
            self._loop.add_reader(fd, self._drain, spec.name)
            info = await self._await_info(spec)
            self.cluster.add(WorkerState(spec.name, spec.endpoint, info, spec.is_prfaas))
        self._max_seq_len = min(w.info.max_seq_len for w in self.cluster.workers.values())
        if self.config.control is not None:
            self.control.start()
        self._ready = True
        log.info("router_ready", workers=sorted(self.cluster.workers))

    async def _await_info(self, spec: WorkerSpec) -> p.WorkerInfo:
        """Ping the worker and wait for its ``WorkerInfo`` (delivered by ``_drain``)."""
        assert self._loop is not None
        future: asyncio.Future[p.WorkerInfo] = self._loop.create_future()
        self._info_waiters[spec.name] = future
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await self._send(spec.name, p.Ping())
                return await future
        except TimeoutError:
            raise TransportError(f"worker {spec.name} at {spec.endpoint} did not answer") from None
        finally:
            self._info_waiters.pop(spec.name, None)

    async def close(self) -> None:
        self._ready = False
        await self.control.stop()
        if self._loop is not None:
            for fd in self._fds.values():
                self._loop.remove_reader(fd)
        self._fds.clear()
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._ctx.term()

    def _drain(self, name: str) -> None:
        """Every message waiting on ``name``'s socket, without blocking (the reader callback)."""
        self._drains.discard(name)
        sock = self._sockets.get(name)
        if sock is None or sock.closed:
            return
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # closed under us (shutdown): nothing more to read
                log.warning("router_recv_failed", worker=name, error=str(exc))
                return
            try:
                self._dispatch(name, frame)
            except Exception as exc:  # one bad message must not stall the others
                log.error("router_dispatch_failed", worker=name, error=repr(exc))

    def _dispatch(self, name: str, frame: bytes) -> None:
        message = _decode(frame)
        if isinstance(message, p.Tokens):
            flight = self._flights.get(message.request_id)
            if flight is not None:
                flight.put(name, message)
        elif isinstance(message, p.LoadReport):
            if name in self.cluster.workers:
                self.cluster.on_report(name, message)
                self._export_load(name, message)
        elif isinstance(message, p.WorkerInfo):
            self._on_info(name, message)
        # TransferDone: nothing waits on it (a request ends with the decode node's tokens)

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
                async for chunk in self._handoff(request, flight, decode, prefill):
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

    def _submit_to(
        self, request: GenerateRequest, prompt: list[int], max_tokens: int, **extra: Any
    ) -> p.Submit:
        """One leg's ``Submit``, its deadline what is left of the request's."""
        elapsed = time.monotonic() - self._flights[request.request_id].submitted_at
        return p.Submit(
            request_id=request.request_id,
            prompt_token_ids=prompt,
            max_tokens=max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            deadline_s=max(request.deadline_s - elapsed, 0.001),
            **extra,
        )

    async def _send(self, worker: str, message: p.Message) -> None:
        sock = self._sockets[worker]
        frame = p.encode_message(message)
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # full (high-water mark): wait for room, as a blocking send would
            await self._send_when_ready(sock, frame)
        self._after_send(worker, sock)

    async def _send_when_ready(self, sock: zmq.Socket[bytes], frame: bytes) -> None:
        wait_s = _SEND_RETRY_S[0]
        while True:
            await asyncio.sleep(wait_s)
            try:
                sock.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:
                wait_s = min(wait_s * 2, _SEND_RETRY_S[1])

    def _after_send(self, worker: str, sock: zmq.Socket[bytes]) -> None:
        """A send may have consumed the descriptor's edge while messages arrived: drain soon."""
        if worker not in self._drains and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._drains.add(worker)
            assert self._loop is not None
            self._loop.call_soon(self._drain, worker)

    async def _handoff(
        self, request: GenerateRequest, flight: _Flight, decode: WorkerState, prefill: WorkerState
    ) -> AsyncGenerator[TokenChunk, None]:
        """Prefill to t1 (KV relayed to the decode node), then decode from prompt + t1."""
        prompt, decoder = request.prompt_token_ids, StreamingDecoder()
        transfer = None
        if request.max_tokens > 1:  # a one-token answer is t1 alone: nothing to relay
            transfer = f"{self._transfer_prefix}{next(self._transfer_ids):012x}"
        relay = decode.info.relay_endpoint if transfer else None
        leg = self._submit_to(request, prompt, 1, transfer_uuid=transfer, relay_endpoint=relay)
        await self._send(prefill.name, leg)
        first = await self._first_token(request, flight, prefill.name)
        if first is None:  # no t1: the decode node runs the whole request, no relay
            self.counters["prefill_fallback"] += 1
            leg = self._submit_to(request, prompt, request.max_tokens)
            async for chunk in self._decode_leg(request, flight, decode.name, leg, decoder):
                yield chunk
            return
        is_eos = first == self.tokenizer.eos_id
        if is_eos or request.max_tokens == 1:
            text = decoder.push([first]) + decoder.flush()
            yield TokenChunk([first], text, True, "stop" if is_eos else "length")
            return
        yield TokenChunk([first], decoder.push([first]))
        leg = self._submit_to(
            request,
            [*prompt, first],
            request.max_tokens - 1,
            transfer_uuid=transfer,
            announce_timeout_s=self.config.announce_timeout_s,
            num_skipped_draws=1,
        )
        flight.relayed = True
        async for chunk in self._decode_leg(request, flight, decode.name, leg, decoder):
            yield chunk

    async def _first_token(
        self, request: GenerateRequest, flight: _Flight, prefill_name: str
    ) -> int | None:
        """The prefill leg's t1, or None when it failed or took longer than
        ``prefill_timeout_s`` (it is then cancelled, and the failure logged)."""
        try:
            async with asyncio.timeout(self.config.prefill_timeout_s):
                while True:
                    source, message = await flight.get()
                    if source != prefill_name:
                        continue
                    tokens = list(message.token_ids)
                    self._observe(flight, False, len(tokens), bool(message.finished))
                    if message.error_kind or (message.finished and not tokens):
                        why = message.error_message or message.finish_reason or "no token"
                        log.warning("prefill_failed", request_id=request.request_id, error=why)
                        return None
                    if tokens:
                        return tokens[0]
        except TimeoutError:
            log.warning(
                "prefill_timeout",
                request_id=request.request_id,
                timeout_s=self.config.prefill_timeout_s,
            )
            await self._cancel(request.request_id, prefill_name)
            return None

    async def _decode_leg(
        self,
        request: GenerateRequest,
        flight: _Flight,
        decode_name: str,
        leg: p.Submit,
        decoder: StreamingDecoder,
    ) -> AsyncGenerator[TokenChunk, None]:
        """Submit the decode leg and stream its tokens (messages of other legs are skipped)."""
        await self._send(decode_name, leg)
        while True:
            source, message = await flight.get()
            if source != decode_name:
                continue  # the prefill's late messages
            if message.error_kind:
                raise _error(message)
            tokens = list(message.token_ids)
            self._observe(flight, True, len(tokens), bool(message.finished))
            if message.finished:
                self._check_relayed(request, flight, message)
                text = decoder.push(tokens) + decoder.flush()
                yield TokenChunk(tokens, text, True, message.finish_reason)
                return
            if tokens:
                yield TokenChunk(tokens, decoder.push(tokens))

    def _check_relayed(self, request: GenerateRequest, flight: _Flight, message: p.Tokens) -> None:
        """An offloaded request's decode should have claimed the whole prompt (all L tokens
        before t1) over the relay; fewer means it recomputed them (correct tokens, lost
        offload): loud."""
        if not flight.decision.is_remote or not flight.relayed:
            return
        relayed = message.num_connector_tokens >= flight.prompt_tokens
        if self.metrics:
            self.metrics.record_relay_outcome("relayed" if relayed else "recomputed")
        if relayed:
            return
        self.counters["relay_recomputed"] += 1
        log.warning(
            "relay_recomputed",
            request_id=request.request_id,
            prompt_tokens=flight.prompt_tokens,
            relayed_tokens=message.num_connector_tokens,
            note="the decode worker computed the prompt itself: the KV relay failed or was late",
        )

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
