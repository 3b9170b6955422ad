"""Per-request records and the statistics the bench reports. Pure: no I/O, no clocks.

Timing conventions (seconds on one monotonic clock, measured by the client):

- TTFT: the request was sent -> the first response carrying at least one token arrived;
- TPOT: ``(last token arrival - first token arrival) / (num_output_tokens - 1)``, per request,
  so only requests with two or more tokens have one;
- throughput: successful requests (and their output tokens) over the run's wall time, first
  send to last completion.

Percentiles interpolate linearly between order statistics (numpy's default ``"linear"``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["OK", "LatencySummary", "RequestRecord", "RunStats", "percentile", "summarize"]

OK = "OK"  # the status of a request that got its final response


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one sent request. ``status`` is ``OK`` or a failure name (a gRPC status
    code name such as ``DEADLINE_EXCEEDED``, or ``IN_STREAM_ERROR``); ``reason`` says why."""

    index: int
    num_prompt_tokens: int
    sent_at: float
    finished_at: float
    status: str = OK
    reason: str = ""
    num_output_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def is_ok(self) -> bool:
        return self.status == OK

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_at is None or self.last_token_at is None:
            return None
        if self.num_output_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.num_output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear interpolation; NaN when empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


@dataclass(frozen=True)
class LatencySummary:
    """Mean and percentiles in milliseconds over ``num`` samples; ``None`` when there are none."""

    num: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencySummary:
        if not seconds:
            return cls(0, None, None, None, None)
        ms = [s * 1e3 for s in seconds]
        return cls(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 90),
                   percentile(ms, 99))  # fmt: skip


@dataclass(frozen=True)
class RunStats:
    """The client-side results of a run."""

    num_sent: int
    num_ok: int
    num_failed: int
    elapsed_s: float
    ttft: LatencySummary
    tpot: LatencySummary
    request_throughput_rps: float
    output_tokens_per_s: float
    num_output_tokens: int
    num_prompt_tokens: int
    failures: dict[str, int]  # status name -> count
    failure_reasons: dict[str, str]  # status name -> the first reason seen


def summarize(records: Sequence[RequestRecord]) -> RunStats:
    """Aggregate ``records``; failed requests count in ``failures`` only, not in latencies."""
    ok = [r for r in records if r.is_ok]
    failed = [r for r in records if not r.is_ok]
    elapsed_s = 0.0
    if records:
        elapsed_s = max(r.finished_at for r in records) - min(r.sent_at for r in records)
    num_output_tokens = sum(r.num_output_tokens for r in ok)
    reasons: dict[str, str] = {}
    for r in failed:
        reasons.setdefault(r.status, r.reason)
    return RunStats(
        num_sent=len(records),
        num_ok=len(ok),
        num_failed=len(failed),
        elapsed_s=elapsed_s,
        ttft=LatencySummary.of([t for r in ok if (t := r.ttft_s) is not None]),
        tpot=LatencySummary.of([t for r in ok if (t := r.tpot_s) is not None]),
        request_throughput_rps=len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        output_tokens_per_s=num_output_tokens / elapsed_s if elapsed_s > 0 else 0.0,
        num_output_tokens=num_output_tokens,
        num_prompt_tokens=sum(r.num_prompt_tokens for r in records),
        failures=dict(sorted(Counter(r.status for r in failed).items())),
        failure_reasons=dict(sorted(reasons.items())),
    )
