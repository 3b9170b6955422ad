"""Moving a cached prefix across before a prefill (issue 15 item 5, the paper's abundant-bandwidth
rule: when the cluster holding the longer prefix is not the one chosen for compute, move that
cache first).

The move reuses the relay. ``PrefixMover.move`` runs two legs before the request's own:

1. the *move leg* on the source node (the prefill node whose cache holds the prefix, P tokens,
   block aligned): the prompt's first P tokens, ``max_tokens=1``, relayed under a fresh transfer
   uuid to the target's relay receiver. The source reuses its cached prefix and computes at
   most its last block; its connector relays every block of ``[0, P)`` and the states (for a
   hybrid model the state after P, block aligned, which the target keeps as a snapshot);
2. the *fill leg* on the target (the chosen prefill node, which must accept cache moves:
   ``WorkerConfig.accept_cache_moves``, a relay endpoint in its ``WorkerInfo``): the same P
   tokens plus the move leg's token, ``fills_cache=True``. The target holds it until the
   transfer is whole, claims the P tokens as a decode leg would, and its prefix cache keeps the
   blocks (and the snapshot).

The request's real prefill leg then runs on the target as routed, reusing ``[0, P)`` and
computing ``[P, L)``. Every step has a deadline (``timeout_s``, and the request's own); any
failure (a refusal, a lost or silent worker, a transfer that never came) is logged and counted
(``cache_move_failed``), both legs are cancelled and their late messages dropped, and the
prefill simply computes what the target lacks: slower, never wrong. A fill leg whose relay was
late computes the prefix itself (the worker's fallback): the cache is filled, the move counted
failed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass

from trtllm_prfaas.router.cluster import WorkerState
from trtllm_prfaas.router.flight import Flight
from trtllm_prfaas.router.links import WorkerLinks
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.worker import protocol as p

__all__ = ["PrefixMover"]

log = get_logger(__name__)


class _MoveFailed(Exception):
    """One step of a move did not work out (the message says which and why)."""


@dataclass(eq=False, kw_only=True)
class PrefixMover:
    """Runs cache moves over ``links``; one per orchestrator. ``counters`` is the
    orchestrator's (this adds ``cache_move_done`` and ``cache_move_failed``)."""

    links: WorkerLinks
    counters: dict[str, int]
    metrics: RouterMetrics | None
    announce_timeout_s: float
    timeout_s: float  # the whole move (both legs) at most this long

    async def move(
        self,
        request_id: str,
        prompt: list[int],
        flight: Flight,
        source: WorkerState,
        target: WorkerState,
        num_tokens: int,
        deadline_s: float,
    ) -> bool:
        """Move the first ``num_tokens`` of ``prompt`` from ``source``'s cache into
        ``target``'s; True when the target claimed all of them over the relay. Never raises
        for the move's own failure (the caller's prefill then computes what it lacks)."""
        move_id, fill_id = f"{request_id}~move", f"{request_id}~fill"
        for leg_id in (move_id, fill_id):
            self.links.flights[leg_id] = flight
        started, is_done = time.monotonic(), False
        try:
            async with asyncio.timeout(min(self.timeout_s, deadline_s)):
                transfer, prefix = uuid.uuid4().hex, prompt[:num_tokens]
                token = await self._move_leg(flight, move_id, transfer, prefix, source, target)
                fill = [*prefix, token]
                await self._fill_leg(flight, fill_id, transfer, fill, target, deadline_s)
            is_done = True
        except (TimeoutError, _MoveFailed) as exc:
            why = str(exc) or f"not done within {min(self.timeout_s, deadline_s):.1f}s"
            log.warning("cache_move_failed", request_id=request_id, source=source.name,
                        target=target.name, tokens=num_tokens, why=why)  # fmt: skip
        finally:
            for leg_id in (move_id, fill_id):  # late messages of these legs are dropped
                self.links.flights.pop(leg_id, None)
            flight.messages = deque(
                m for m in flight.messages if m[1].request_id not in (move_id, fill_id)
            )
            if not is_done:
                await self.links.cancel(move_id, source.name)
                await self.links.cancel(fill_id, target.name)
        self._count(is_done, num_tokens, time.monotonic() - started, request_id, source, target)
        return is_done

    async def _move_leg(
        self,
        flight: Flight,
        leg_id: str,
        transfer: str,
        prefix: list[int],
        source: WorkerState,
        target: WorkerState,
    ) -> int:
        """The source relays the prefix's KV to the target; returns the token it sampled."""
        submit = p.Submit(
            leg_id, prefix, 1, transfer_uuid=transfer, relay_endpoint=target.info.relay_endpoint,
            deadline_s=self.timeout_s,
        )  # fmt: skip
        await self.links.send(source.name, submit)
        message = await self._answer(flight, leg_id, source.name)
        if not message.token_ids:
            raise _MoveFailed(f"move leg on {source.name}: no token")
        return message.token_ids[0]

    async def _fill_leg(
        self,
        flight: Flight,
        leg_id: str,
        transfer: str,
        prompt: list[int],
        target: WorkerState,
        deadline_s: float,
    ) -> None:
        """The target claims the relayed prefix (prompt = prefix + the move leg's token)."""
        submit = p.Submit(
            leg_id, prompt, 1, transfer_uuid=transfer, fills_cache=True,
            announce_timeout_s=self.announce_timeout_s, deadline_s=min(self.timeout_s, deadline_s),
        )  # fmt: skip
        await self.links.send(target.name, submit)
        message = await self._answer(flight, leg_id, target.name, until_finished=True)
        claimed = message.num_connector_tokens + message.num_cached_tokens
        if claimed < len(prompt) - 1:
            raise _MoveFailed(
                f"fill leg on {target.name} claimed {claimed} of {len(prompt) - 1} tokens "
                "(the relay failed or was late: it computed the prefix itself)"
            )

    async def _answer(
        self, flight: Flight, leg_id: str, worker: str, until_finished: bool = False
    ) -> p.Tokens:
        """The leg's first token (or, ``until_finished``, its finishing message)."""
        while True:
            source, message = await flight.get()
            if source != worker or message.request_id != leg_id:
                continue
            if message.error_kind:
                raise _MoveFailed(f"{leg_id} on {worker}: {message.error_message}")
            if message.finished or (message.token_ids and not until_finished):
                return message

    def _count(
        self,
        is_done: bool,
        num_tokens: int,
        elapsed_s: float,
        request_id: str,
        source: WorkerState,
        target: WorkerState,
    ) -> None:
        outcome = "done" if is_done else "failed"
        self.counters[f"cache_move_{outcome}"] += 1
        if self.metrics is not None:
            self.metrics.record_cache_move(outcome, num_tokens if is_done else 0)
        if is_done:
            log.info("cache_moved", request_id=request_id, source=source.name, target=target.name,
                     tokens=num_tokens, elapsed_s=round(elapsed_s, 4))  # fmt: skip
