"""One request's flight: its channel of worker messages, and the prompt-plus-first-token handoff
that ``router/orchestrator.py``'s docstring describes.

``Flight`` is the channel: the links' reader ``put``s each ``Tokens`` of the request from either
worker, and the request's task ``get``s them in order. ``Handoff.run`` drives the two legs over
the links: the prefill leg (``max_tokens=1``, with a transfer uuid and the decode node's relay
endpoint unless ``max_tokens == 1``), t1 streamed at once, then the decode leg (prompt + t1,
``max_tokens - 1``, one sampling draw skipped). No t1 (the prefill failed, or nothing came within
``prefill_timeout_s``: the prefill is then cancelled) sends the whole request to the decode node
(``prefill_fallback``); a remote request whose decode claimed fewer than its L prompt tokens is
counted and logged (``relay_recomputed``). Leg timings feed the control loop's online profiles.
The orchestrator owns the deadline, the choice of decode node, re-routing and the cancels of a
request that did not finish.

Decode slots: the decode worker is their authority (``worker/slots.py``), as several router
replicas may share it. Before any leg starts, ``Handoff.reserve`` asks the decode node for a
slot under the flight's reservation id (``Reserve``) and waits at most ``reserve_timeout_s`` for
the grant or the refusal; both decode legs name the reservation (``Submit.reservation_id``).
The ``Reserve`` names the prompt's block hashes up to the prefix the router's index says the
decode node holds; the worker pins what it still holds of it with the slot and the grant says
how much (D). Both relayed legs then carry ``relay_from_tokens = D``: the prefill relays only
``[D, L)`` (and the states), so a follow-up turn moves its new tokens' KV, not its history. A
decode that computed the prompt itself after all (its pinned prefix unusable) is counted
(``relay_pin_fallback``); the bytes not relayed are counted in ``prfaas_relay_bytes_saved``.

Lost workers (``router/links.py`` puts a ``WorkerLost`` error ``Tokens`` from the dead worker
into every flight it had a leg in): the prefill lost before t1 is a failed prefill (the decode
node runs the whole request); the prefill lost after t1 while the decode still waits for its
relayed KV (no decode token yet) makes the decode node compute the prompt itself at once: the
held leg is cancelled and the same leg (prompt + t1, one draw skipped) is submitted again without
a transfer under the leg id ``<request id>~local``; the decode lost at any point raises
``WorkerLost`` (the orchestrator re-routes the request if the client has no token yet).
``worker_silence_s`` stays as the stopgap for a prefill worker whose connection is up but which
sends nothing, not even load reports (a wedged process: libzmq still answers its heartbeats).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

from msgspec.structs import replace

from trtllm_prfaas.engines.tokenizer import ByteTokenizer, Tokenizer
from trtllm_prfaas.errors import PrfaasError, WorkerLost
from trtllm_prfaas.policy.route import RouteDecision
from trtllm_prfaas.router.api import GenerateRequest, TokenChunk
from trtllm_prfaas.router.cluster import WorkerState
from trtllm_prfaas.router.control import ControlLoop
from trtllm_prfaas.router.detokenize import IncrementalDetokenizer
from trtllm_prfaas.router.links import WorkerLinks
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.vocabulary import error_from_wire, is_kind
from trtllm_prfaas.worker import protocol as p

__all__ = ["Flight", "Handoff"]

log = get_logger(__name__)

_LIVENESS_CHECK_S = 0.5  # while waiting for t1: how often the prefill worker's silence is checked


class Flight:
    """``Tokens`` of one request from its two workers (a FIFO channel: ``put`` from the reader,
    ``get`` from the request's task), and when its legs began (monotonic s)."""

    __slots__ = (
        "decision",
        "decode_first_at",
        "leg_ids",
        "messages",
        "num_decoded",
        "prefill_first_at",
        "prefix_hashes",
        "prompt_tokens",
        "relay_from_tokens",
        "reservation_id",
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
        self.messages: deque[tuple[str, p.Tokens]] = deque()
        self.waiter: asyncio.Future[None] | None = None  # set while ``get`` waits
        self.leg_ids: list[str] = []  # extra ids its legs run under on workers (``~local``)
        self.reservation_id: str | None = None  # its decode slot's id (``Reserve``)
        self.prefix_hashes: list[int] = []  # the prompt's block hashes (the router's index)
        self.relay_from_tokens = 0  # D: the prefix its decode slot came with

    def involves(self, worker: str) -> bool:
        """``worker`` is this request's prefill or decode node."""
        return worker in (self.decision.prefill_node_id, self.decision.decode_node_id)

    def forget(self, source: str) -> None:
        """Drop what ``source`` sent so far (a decode node given up before any leg ran)."""
        self.messages = deque(m for m in self.messages if m[0] != source)

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


@dataclass(eq=False, kw_only=True)
class Handoff:
    """Runs flights over ``links``; one per orchestrator. ``counters`` is the orchestrator's
    (this adds ``prefill_fallback`` and ``relay_recomputed``)."""

    links: WorkerLinks
    control: ControlLoop
    counters: dict[str, int]
    metrics: RouterMetrics | None
    eos_id: int
    announce_timeout_s: float
    prefill_timeout_s: float
    worker_silence_s: float
    # The decode node answers a Reserve from its control loop, between engine steps (a dict
    # look-up): 5 s covers a slow step on a loaded CPU host; a worker silent that long is
    # treated as refusing (its late grant is cancelled) and another decode node is asked.
    reserve_timeout_s: float = 5.0
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)  # decodes the streamed text
    # transfer uuids: this router's random prefix + a counter (unique, like uuid4().hex)
    _transfer_prefix: str = field(init=False, default_factory=lambda: uuid.uuid4().hex[:20])
    _transfer_ids: Iterator[int] = field(init=False, default_factory=itertools.count)

    async def reserve(
        self, flight: Flight, decode: WorkerState, ttl_s: float, num_prefix_blocks: int = 0
    ) -> str | None:
        """Ask ``decode`` for a slot under ``flight.reservation_id`` (held ``ttl_s`` at most
        unused) with the first ``num_prefix_blocks`` of the prompt's blocks pinned; None when
        granted (``flight.relay_from_tokens`` is then what it pinned), else why not (refused,
        lost, or no answer in time)."""
        rid = flight.reservation_id
        assert rid is not None
        hashes = flight.prefix_hashes[:num_prefix_blocks]
        await self.links.send(decode.name, p.Reserve(rid, ttl_s, prefix_hashes=hashes))
        deadline = time.monotonic() + self.reserve_timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left_s):
                    source, message = await flight.get()
            except TimeoutError:
                break
            if source != decode.name:
                continue
            if _is_lost(message):
                return message.error_message or f"worker {decode.name} lost"
            if message.request_id != rid:
                continue
            if message.error_kind:
                return message.error_message or message.error_kind
            flight.relay_from_tokens = _granted_prefix(message, flight.prompt_tokens, decode)
            if flight.relay_from_tokens:
                self.counters["relay_pinned"] += 1
            return None
        return f"worker {decode.name} did not answer a Reserve within {self.reserve_timeout_s}s"

    async def run(
        self, request: GenerateRequest, flight: Flight, decode: WorkerState, prefill: WorkerState
    ) -> AsyncGenerator[TokenChunk, None]:
        """Prefill to t1 (KV relayed to the decode node), then decode from prompt + t1."""
        prompt, decoder = request.prompt_token_ids, IncrementalDetokenizer(self.tokenizer)
        transfer = None
        if request.max_tokens > 1:  # a one-token answer is t1 alone: nothing to relay
            transfer = f"{self._transfer_prefix}{next(self._transfer_ids):012x}"
        relay = decode.info.relay_endpoint if transfer else None
        relay_from = flight.relay_from_tokens if transfer else 0
        leg = _submit_to(request, flight, prompt, 1, transfer_uuid=transfer, relay_endpoint=relay,
                         relay_from_tokens=relay_from)  # fmt: skip
        await self.links.send(prefill.name, leg)
        first = await self._first_token(request, flight, prefill)
        if first is None:  # no t1: the decode node runs the whole request, no relay
            self.counters["prefill_fallback"] += 1
            leg = _submit_to(
                request, flight, prompt, request.max_tokens, reservation_id=flight.reservation_id
            )
            async for chunk in self._decode_leg(request, flight, decode, leg, decoder):
                yield chunk
            return
        is_eos = first == self.eos_id
        if is_eos or request.max_tokens == 1:
            text = decoder.push([first]) + decoder.flush()
            yield TokenChunk([first], text, True, "stop" if is_eos else "length")
            return
        yield TokenChunk([first], decoder.push([first]))
        leg = _submit_to(
            request,
            flight,
            [*prompt, first],
            request.max_tokens - 1,
            transfer_uuid=transfer,
            announce_timeout_s=self.announce_timeout_s,
            num_skipped_draws=1,
            reservation_id=flight.reservation_id,
            relay_from_tokens=relay_from,
        )
        async for chunk in self._decode_leg(request, flight, decode, leg, decoder, prefill.name):
            yield chunk

    async def _first_token(
        self, request: GenerateRequest, flight: Flight, prefill: WorkerState
    ) -> int | None:
        """The prefill leg's t1, or None when it failed (its worker lost included), took longer
        than ``prefill_timeout_s``, or its worker fell silent (no message, not even a load
        report, for ``worker_silence_s``: a wedged worker); the leg is then cancelled and the
        failure logged. Raises ``WorkerLost`` if the decode node is lost meanwhile."""
        deadline = time.monotonic() + self.prefill_timeout_s
        while True:
            now = time.monotonic()
            why = None
            if now >= deadline:
                why = f"no first token within {self.prefill_timeout_s}s"
            elif now - prefill.reported_at > self.worker_silence_s:
                why = f"worker {prefill.name} silent for {self.worker_silence_s}s"
            if why is not None:
                log.warning("prefill_given_up", request_id=request.request_id, why=why)
                await self.links.cancel(request.request_id, prefill.name)
                return None
            try:
                async with asyncio.timeout(_LIVENESS_CHECK_S):
                    source, message = await flight.get()
            except TimeoutError:
                continue
            if source != prefill.name:
                if _is_lost(message):  # the decode node died: nowhere to go on
                    raise _error(message)
                continue
            tokens = list(message.token_ids)
            self._observe(flight, False, len(tokens), bool(message.finished))
            if message.error_kind or (message.finished and not tokens):
                why = message.error_message or message.finish_reason or "no token"
                log.warning("prefill_failed", request_id=request.request_id, error=why)
                return None
            if tokens:
                return tokens[0]

    async def _decode_leg(
        self,
        request: GenerateRequest,
        flight: Flight,
        decode: WorkerState,
        leg: p.Submit,
        decoder: IncrementalDetokenizer,
        relay_source: str | None = None,
    ) -> AsyncGenerator[TokenChunk, None]:
        """Submit the decode leg and stream its tokens (messages of other legs are skipped).
        ``relay_source`` lost before the first decode token: the prompt is computed here."""
        if decode.is_lost:
            raise WorkerLost(f"worker {decode.name} lost before its decode leg")
        await self.links.send(decode.name, leg)
        while True:
            source, message = await flight.get()
            if source == relay_source and _is_lost(message) and flight.decode_first_at is None:
                leg, relay_source = (
                    await self._without_relay(request, flight, decode.name, leg),
                    None,
                )
                continue
            if source != decode.name or message.request_id != leg.request_id:
                continue  # the prefill's late messages, a cancelled leg's answer
            if message.error_kind:
                raise _error(message)
            tokens = list(message.token_ids)
            self._observe(flight, True, len(tokens), bool(message.finished))
            if message.finished:
                self._check_relayed(request, flight, message)
                self._check_pinned(request, flight, decode, message, leg)
                text = decoder.push(tokens) + decoder.flush()
                yield TokenChunk(tokens, text, True, message.finish_reason)
                return
            if tokens:
                yield TokenChunk(tokens, decoder.push(tokens))

    async def _without_relay(
        self, request: GenerateRequest, flight: Flight, decode_name: str, leg: p.Submit
    ) -> p.Submit:
        """The relay's source died before the decode began: cancel the held leg and submit it
        again with no transfer (the decode node computes the prompt); returns the new leg."""
        log.warning("relay_source_lost", request_id=request.request_id, decode=decode_name,
                    note="the decode node computes the prompt itself")  # fmt: skip
        await self.links.cancel(leg.request_id, decode_name)
        elapsed = time.monotonic() - flight.submitted_at
        leg_id = f"{request.request_id}~local"
        flight.leg_ids.append(leg_id)
        self.links.flights[leg_id] = flight
        local = replace(
            leg,
            request_id=leg_id,
            transfer_uuid=None,
            relay_from_tokens=0,
            deadline_s=max(request.deadline_s - elapsed, 0.001),
        )
        await self.links.send(decode_name, local)
        return local

    def _check_relayed(self, request: GenerateRequest, flight: Flight, message: p.Tokens) -> None:
        """An offloaded request's decode should have claimed the whole prompt (all L tokens
        before t1) over the relay; fewer means it recomputed them (correct tokens, lost
        offload): loud."""
        if not flight.decision.is_remote:
            return  # a failed prefill leg (no relay at all) counts as recomputed too
        # With block reuse the decode node supplies its cached prefix itself and claims the rest
        relayed = message.num_connector_tokens + message.num_cached_tokens >= flight.prompt_tokens
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

    def _check_pinned(
        self,
        request: GenerateRequest,
        flight: Flight,
        decode: WorkerState,
        message: p.Tokens,
        leg: p.Submit,
    ) -> None:
        """A relay from D: the decode used its pinned prefix (it claimed the relayed tokens:
        D x kv_bytes_per_token were not sent), or computed the prompt itself (fallback)."""
        start = leg.relay_from_tokens
        if not start:
            return
        is_used = message.num_connector_tokens > 0 and message.num_cached_tokens >= start
        if not is_used:
            self.counters["relay_pin_fallback"] += 1
            log.warning("relay_pin_fallback", request_id=request.request_id,
                        relay_from_tokens=start, cached_tokens=message.num_cached_tokens,
                        relayed_tokens=message.num_connector_tokens)  # fmt: skip
        if self.metrics:
            saved = start * decode.info.kv_bytes_per_token if is_used else 0
            self.metrics.record_relay_prefix("pinned" if is_used else "fallback", saved)

    def _observe(self, flight: Flight, is_decode: bool, num_tokens: int, finished: bool) -> None:
        """Leg timings for the control loop's online profiles."""
        now = time.monotonic()
        if not is_decode:
            if flight.prefill_first_at is None and num_tokens:
                flight.prefill_first_at = now
                is_remote = flight.decision.is_remote
                tokens = flight.decision.incremental_tokens  # what it computed (prefix cached)
                self.control.on_prefill(is_remote, tokens, now - flight.submitted_at)
            return
        if flight.decode_first_at is None and num_tokens:
            flight.decode_first_at = now
            if flight.decision.is_remote and flight.prefill_first_at is not None:
                self.control.on_relay_wait(now - flight.prefill_first_at)
        flight.num_decoded += num_tokens
        if finished and flight.decode_first_at is not None and flight.num_decoded > 1:
            self.control.on_decode(flight.num_decoded - 1, now - flight.decode_first_at)


def _submit_to(
    request: GenerateRequest, flight: Flight, prompt: list[int], max_tokens: int, **extra: Any
) -> p.Submit:
    """One leg's ``Submit``, its deadline what is left of the request's."""
    elapsed = time.monotonic() - flight.submitted_at
    return p.Submit(
        request_id=request.request_id,
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        temperature=request.temperature,
        seed=request.seed,
        deadline_s=max(request.deadline_s - elapsed, 0.001),
        **extra,
    )


def _granted_prefix(message: p.Tokens, prompt_tokens: int, decode: WorkerState) -> int:
    """D from a grant: what the decode worker pinned, if it can be a relay's start (a block
    multiple below L; anything else, from a confused worker, is ignored: relay everything)."""
    start, tpb = message.num_cached_tokens, decode.info.tokens_per_block
    return start if 0 < start < prompt_tokens and tpb and start % tpb == 0 else 0


def _is_lost(message: p.Tokens) -> bool:
    return is_kind(message.error_kind, WorkerLost)


def _error(message: p.Tokens) -> PrfaasError:
    return error_from_wire(message.error_kind, message.error_message,
                           request_id=message.request_id)  # fmt: skip
