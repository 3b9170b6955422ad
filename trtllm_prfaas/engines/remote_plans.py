"""Plans for a connector that runs in another process (inside Triton, or in ``LLM``'s workers).

``TritonEngine`` and ``TrtllmEngine`` cannot hand a PrfaaS plan to their connector in-process:
the connector lives in TensorRT-LLM's worker processes (``docs/design/trtllm_path.md`` section 3).
``RemotePlans`` posts each plan to the connector's plan server (rank 0) with a
``connector.plans.PlanClient`` and waits for the acknowledgement before the engine sends the
request, and asks every rank whether a transfer has fully arrived.

A plan is keyed by the digest of the tokens the connector will claim, computed by the CONNECTOR on
the token ids the engine itself sees. So before posting, the engine's view of the prompt (for
Triton: ``encode(decode(ids))`` with the served model's tokenizer) is checked against the plan:
the claimed tokens (a prefill plan, which names relay endpoints: all of them; a decode plan: all
but the last, t1) must have the plan's length and digest. When they do not, the plan is skipped,
counted (``plans_skipped``) and logged (``prfaas_plan_skipped``): the request then runs without it
(a prefill exports nothing; a decode computes the prompt). A plan that cannot be posted (refused,
no answer within ``timeout_s``) is counted (``plans_failed``) and logged the same way; never
silent. Not thread-safe: the worker's thread only. A context manager; ``close()`` closes the
client's sockets.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from types import TracebackType

from trtllm_prfaas.connector.plans import Plan, PlanClient, tokens_digest
from trtllm_prfaas.errors import ConfigError, PrfaasError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import InboundStatus
from trtllm_prfaas.transport.config import RelaySecurity

__all__ = ["RemotePlans", "combine_statuses"]

log = get_logger(__name__)


class RemotePlans:
    """Posts plans and queries transfer status over a ``PlanClient`` (see module docstring).

    ``endpoints`` are the connector ranks' plan servers in rank order (empty: no plan carrier is
    configured, and every plan is dropped, counted and logged as ``plans_unconfigured``)."""

    def __init__(
        self, endpoints: Sequence[str], security: RelaySecurity | None, timeout_s: float
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"plan timeout must be > 0, got {timeout_s}")
        if endpoints and security is None:
            raise ConfigError("plan endpoints need a security setting (Curve keys or plaintext)")
        self.timeout_s = timeout_s
        self.counts: collections.Counter[str] = collections.Counter()
        self._client = PlanClient(list(endpoints), security) if endpoints and security else None

    @property
    def num_ranks(self) -> int:
        return 0 if self._client is None else self._client.num_ranks

    def submit(self, plan: Plan, seen_tokens: Sequence[int], request_id: int) -> bool:
        """Post ``plan`` if it matches the tokens the connector will see; True once acknowledged.
        Blocks at most ``timeout_s``. Never raises for a plan it cannot carry (see above)."""
        why = _mismatch(plan, seen_tokens)
        if why is not None:
            return self._drop("plans_skipped", plan, request_id, why)
        if self._client is None:
            return self._drop("plans_unconfigured", plan, request_id, "no plan endpoint")
        try:
            self._client.post(plan, self.timeout_s)
        except PrfaasError as exc:
            return self._drop("plans_failed", plan, request_id, str(exc))
        self.counts["plans_posted"] += 1
        return True

    def _drop(self, counter: str, plan: Plan, request_id: int, why: str) -> bool:
        self.counts[counter] += 1
        log.error("prfaas_plan_skipped", request_id=request_id, transfer_uuid=plan.transfer_uuid,
                  reason=counter, why=why)  # fmt: skip
        return False

    def transfer_status(self, transfer_uuid: str, num_tokens: int) -> InboundStatus | None:
        """The transfer's state over every rank (``combine_statuses``); None when it is unknown
        everywhere, or when the ranks cannot be asked (counted ``status_failed`` and logged)."""
        statuses = self._statuses(transfer_uuid, num_tokens)
        return None if statuses is None else combine_statuses(statuses)

    def load_outcome(self, transfer_uuid: str, num_tokens: int) -> str:
        """What the connector did with a decode's transfer, over every rank: ``loaded`` (every
        rank's copies into the pool completed), ``load_failed`` (some rank's load failed: the
        response is not to be trusted), or ``unclaimed`` (the connector computed the prompt, or
        the ranks could not be asked)."""
        statuses = self._statuses(transfer_uuid, num_tokens)
        if statuses is None:
            return "unclaimed"
        if "load_failed" in statuses:
            return "load_failed"
        return "loaded" if statuses and all(s == "loaded" for s in statuses) else "unclaimed"

    def _statuses(self, transfer_uuid: str, num_tokens: int) -> list[str] | None:
        """Every rank's answer; None without a plan carrier or when a rank cannot be asked
        (counted ``status_failed`` and logged)."""
        if self._client is None:
            return None
        try:
            return self._client.statuses(transfer_uuid, num_tokens, self.timeout_s)
        except PrfaasError as exc:
            self.counts["status_failed"] += 1
            log.warning("prfaas_transfer_status_failed", transfer_uuid=transfer_uuid,
                        error=str(exc))  # fmt: skip
            return None

    def close(self) -> None:
        """Close the client's sockets. Idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> RemotePlans:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _mismatch(plan: Plan, seen_tokens: Sequence[int]) -> str | None:
    """Why ``plan`` does not cover the tokens its connector will claim (None: it does)."""
    claimed = list(seen_tokens) if plan.relay_endpoints else list(seen_tokens[:-1])
    if len(claimed) != plan.num_tokens:
        return f"the engine's view claims {len(claimed)} tokens, the plan {plan.num_tokens}"
    if tokens_digest(claimed) != plan.tokens_digest:
        return "the engine's view of the claimed tokens differs from the router's ids"
    return None


def combine_statuses(statuses: Sequence[str]) -> InboundStatus | None:
    """One state from every rank's: COMPLETE only when complete on all; FAILED when any failed or
    was cancelled; None when no rank knows the transfer; else RECEIVING (announced somewhere)."""
    known = [s for s in statuses if s]
    if not known:
        return None
    if any(s in (InboundStatus.FAILED.value, InboundStatus.CANCELLED.value) for s in known):
        return InboundStatus.FAILED
    if len(known) == len(statuses) and all(s == InboundStatus.COMPLETE.value for s in known):
        return InboundStatus.COMPLETE
    return InboundStatus.RECEIVING
