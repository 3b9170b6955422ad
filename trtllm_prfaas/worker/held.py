"""Decode requests held until their relayed KV is here, and the plans of relayed requests.

A relayed decode request is the prompt followed by t1; its plan (``decode_plan``) covers all but
that last token. The worker holds it (``HeldDecodes.hold``) until its transfer has fully arrived
in host memory on every tensor-parallel rank, so the connector's load cannot fail once it claimed
the tokens. ``HeldDecodes.release`` checks every held decode and returns what to do with those
decided (``Release``): a COMPLETE transfer joins the engine with its plan; one that failed, or was
not announced within ``announce_timeout_s``, is computed here without a plan (or, when
``fallback`` is ``"fail"``, answered with a ``TransferTimeout`` error); one still arriving at the
request's deadline is answered with ``DeadlineExceeded``. The rest stay held. A relayed prefill's
plan (``prefill_plan``) covers its whole prompt and names the decode's relay endpoints; both
plans carry ``relay_from_tokens`` (D: the prefix the decode node holds itself).

Where a transfer's status comes from (``transfer_status``, which the server passes to ``release``
through its own ``_transfer_status``): the in-process receiver of the connector runtime (a
dictionary look-up), or, when the connector runs inside a remote engine (Triton, LLM API: a
``RemoteTransfers``), that engine's answer over every rank, one round trip per rank, so asked at
most every ``REMOTE_POLL_S``. The same engine tells how a remote decode's load went
(``remote_load``), asked once at the request's first output.

Plain bookkeeping on the serve loop's thread: the server acts on the releases (its engine, its
control socket).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from trtllm_prfaas.connector.plans import Plan, tokens_digest
from trtllm_prfaas.connector.prfaas_runtime import PrfaasRuntime, transfer_id_for
from trtllm_prfaas.engines.base import Engine
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import InboundStatus
from trtllm_prfaas.worker import protocol as p

__all__ = [
    "HeldDecodes",
    "Release",
    "RemoteTransfers",
    "decode_plan",
    "prefill_plan",
    "remote_load",
    "transfer_status",
]

log = get_logger(__name__)

StatusOf = Callable[[p.Submit], InboundStatus | None]  # a held decode's transfer status now

LOCAL_POLL_S = 0.001  # held decodes, in-process receiver: a dictionary look-up per check
REMOTE_POLL_S = 0.01  # held decodes, remote engine: one round trip per rank per check


@runtime_checkable
class RemoteTransfers(Protocol):
    """An engine whose connector runs elsewhere and reports its transfers (Triton, LLM API)."""

    def transfer_status(self, transfer_uuid: str, num_tokens: int) -> InboundStatus | None: ...

    def load_outcome(self, transfer_uuid: str, num_tokens: int) -> str: ...


@dataclass
class _Held:
    identity: bytes
    submit: p.Submit
    announce_deadline: float  # monotonic s: the transfer must be announced by then
    deadline: float  # monotonic s: the request's own deadline


@dataclass(frozen=True)
class Release:
    """A held decode decided: ``error_kind`` set means answer the request with that error (a class
    name from ``errors.py``) and drop it; otherwise it joins the engine with ``plan`` (None: it
    computes its prompt here)."""

    identity: bytes
    submit: p.Submit
    plan: Plan | None = None
    error_kind: str = ""
    error_message: str = ""


class HeldDecodes:
    """The relayed decode requests waiting for their KV, in arrival order."""

    def __init__(self, fallback: str) -> None:
        self.fallback = fallback  # "recompute" or "fail": a transfer that failed or never came
        self._held: list[_Held] = []
        self._next_status_at = 0.0  # remote engines: when held decodes' transfers are next asked

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: object) -> bool:
        return any(held.submit.request_id == request_id for held in self._held)

    def request_ids(self) -> list[str]:
        return [held.submit.request_id for held in self._held]

    def hold(self, identity: bytes, submit: p.Submit, now: float) -> None:
        self._held.append(
            _Held(identity, submit, now + submit.announce_timeout_s, now + submit.deadline_s)
        )

    def drop(self, request_id: str) -> None:
        self._held = [held for held in self._held if held.submit.request_id != request_id]

    def poll_s(self, is_remote: bool) -> float:
        """How long the serve loop may wait when held decodes are all it has."""
        return REMOTE_POLL_S if is_remote else LOCAL_POLL_S

    def release(self, now: float, status_of: StatusOf, is_remote: bool) -> list[Release]:
        """Decode requests whose transfer has fully arrived join the engine with their plan; if
        the transfer failed or was not announced in time, they compute the prompt here (or fail,
        per ``fallback``); one still arriving at the request's deadline fails. ``status_of`` is
        ``transfer_status`` over the worker's runtime and engine; ``is_remote`` when that engine
        runs the connector (its answers cost round trips)."""
        if not self._held or now < self._next_status_at:
            return []
        if is_remote:  # each status check is a round trip to every remote rank
            self._next_status_at = now + REMOTE_POLL_S
        released: list[Release] = []
        waiting: list[_Held] = []
        for held in self._held:
            status = status_of(held.submit)
            if status is InboundStatus.COMPLETE:
                released.append(Release(held.identity, held.submit, decode_plan(held.submit)))
            elif status is InboundStatus.FAILED:
                released.append(self._fall_back(held, "failed"))
            elif status is None and now >= held.announce_deadline:
                released.append(self._fall_back(held, "was not announced in time"))
            elif now >= held.deadline:
                message = (
                    f"request {held.submit.request_id}: relayed KV still arriving at its deadline"
                )
                released.append(
                    Release(held.identity, held.submit, None, "DeadlineExceeded", message)
                )
            else:
                waiting.append(held)
        self._held = waiting
        return released

    def _fall_back(self, held: _Held, why: str) -> Release:
        request_id = held.submit.request_id
        log.warning(
            "relayed_kv_unavailable", request_id=request_id, why=why, fallback=self.fallback
        )
        if self.fallback == "fail":
            return Release(held.identity, held.submit, None, "TransferTimeout", f"relayed KV {why}")
        return Release(held.identity, held.submit)


def transfer_status(
    submit: p.Submit, runtime: PrfaasRuntime | None, engine: Engine
) -> InboundStatus | None:
    """The transfer's status on this node: the in-process receiver, or, when the connector
    runs inside a remote engine, that engine's answer over every rank."""
    assert submit.transfer_uuid is not None
    if runtime is None:
        assert isinstance(engine, RemoteTransfers)
        claimed_len = len(submit.prompt_token_ids) - 1  # the prompt without t1
        return engine.transfer_status(submit.transfer_uuid, claimed_len)
    assert runtime.receiver is not None
    claimed = submit.prompt_token_ids[:-1]  # the prompt without t1
    tid = transfer_id_for(submit.transfer_uuid, claimed, runtime.key)
    return runtime.receiver.status(tid)


def remote_load(engine: Engine, submit: p.Submit) -> int | None:
    """How a remote decode's load went, asked of every connector rank: the number of relayed
    tokens it claimed when loaded, 0 when nothing was loaded, None when the load failed on
    some rank (TensorRT-LLM cannot fail a parked request, so its output is suspect)."""
    assert submit.transfer_uuid is not None
    assert isinstance(engine, RemoteTransfers)
    claimed = len(submit.prompt_token_ids) - 1  # the prompt without t1
    outcome = engine.load_outcome(submit.transfer_uuid, claimed)
    if outcome == "load_failed":
        return None
    return claimed if outcome == "loaded" else 0


def prefill_plan(submit: p.Submit) -> Plan:
    """The plan of a relayed prefill: all L prompt tokens, to the decode's ranks' receivers."""
    assert submit.transfer_uuid is not None
    tokens = submit.prompt_token_ids
    endpoints = [e.strip() for e in (submit.relay_endpoint or "").split(",") if e.strip()]
    digest, start = tokens_digest(tokens), submit.relay_from_tokens
    return Plan(submit.transfer_uuid, len(tokens), digest, endpoints, relay_from_tokens=start)


def decode_plan(submit: p.Submit) -> Plan:
    """The plan of a decode request (the prompt followed by t1): the L tokens before t1."""
    assert submit.transfer_uuid is not None
    claimed = submit.prompt_token_ids[:-1]
    start = submit.relay_from_tokens  # the transfer holds blocks from D on
    return Plan(submit.transfer_uuid, len(claimed), tokens_digest(claimed), relay_from_tokens=start)
