"""The bench's report: one JSON object (``as_dict``, for ``--json``) or a few lines of text.

JSON fields (``null`` where the text says "n/a"):

- run: ``url``, ``model``, ``arrivals`` (``poisson`` | ``concurrency``), ``rate_rps``,
  ``concurrency``, ``max_tokens``, ``prompt_kind``, ``seed``, ``max_prompt_tokens`` and
  ``max_prompt_tokens_source`` (``flag`` | ``server`` | ``default``), ``duration_s``;
- counts: ``num_requests`` (planned) ``== num_ok + num_failed + num_not_sent``, ``num_sent``;
- latency: ``ttft_ms`` {``mean``, ``p50``, ``p90``, ``p99``}, ``tpot_ms`` {``mean``, ``p50``,
  ``p90``} over successful requests;
- throughput: ``request_throughput_rps``, ``output_tokens_per_s``, ``num_output_tokens``,
  ``num_prompt_tokens`` (sent requests);
- failures: ``failures`` {status: count}, ``failure_reasons`` {status: first reason};
- router (from ``--metrics-url``): ``remote_share`` (0..1), ``relay_bytes``, ``egress_gbps``,
  ``num_routed``, and ``metrics_error`` when the endpoint could not be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtllm_prfaas.loadgen.scrape import RouterDelta
from trtllm_prfaas.loadgen.stats import LatencySummary, RunStats

__all__ = ["BenchReport"]


@dataclass(frozen=True)
class BenchReport:
    url: str
    model: str
    mode: dict[str, Any]  # arrivals, rate_rps, concurrency, max_tokens, prompt_kind, seed
    num_requests: int
    max_prompt_tokens: int
    max_prompt_tokens_source: str
    stats: RunStats
    router: RouterDelta | None  # None: no --metrics-url, or it could not be read
    metrics_error: str | None = None

    @property
    def num_not_sent(self) -> int:
        return self.num_requests - self.stats.num_sent

    def as_dict(self) -> dict[str, Any]:
        s, router = self.stats, self.router
        return {
            "url": self.url, "model": self.model, **self.mode,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_prompt_tokens_source": self.max_prompt_tokens_source,
            "duration_s": s.elapsed_s, "num_requests": self.num_requests,
            "num_sent": s.num_sent, "num_ok": s.num_ok, "num_failed": s.num_failed,
            "num_not_sent": self.num_not_sent,
            "ttft_ms": _latency(s.ttft, p99=True), "tpot_ms": _latency(s.tpot, p99=False),
            "request_throughput_rps": s.request_throughput_rps,
            "output_tokens_per_s": s.output_tokens_per_s,
            "num_output_tokens": s.num_output_tokens, "num_prompt_tokens": s.num_prompt_tokens,
            "failures": s.failures, "failure_reasons": s.failure_reasons,
            "remote_share": router.remote_share if router else None,
            "relay_bytes": router.relay_bytes if router else None,
            "egress_gbps": router.egress_gbps if router else None,
            "num_routed": router.num_routed if router else None,
            "metrics_error": self.metrics_error,
        }  # fmt: skip

    def format_text(self) -> str:
        s, router, m = self.stats, self.router, self.mode
        arrivals = (f"poisson {m['rate_rps']:g} req/s" if m["arrivals"] == "poisson"
                    else f"concurrency {m['concurrency']}")  # fmt: skip
        lines = [
            f"prfaas bench  {self.url}  model {self.model}  {arrivals}  seed {m['seed']}",
            f"  workload     max prompt {self.max_prompt_tokens} tokens "
            f"({self.max_prompt_tokens_source}), {m['prompt_kind']} prompts, "
            f"max tokens {m['max_tokens']}",
            f"  requests     {self.num_requests} planned: ok {s.num_ok}  failed {s.num_failed}"
            f"  not sent {self.num_not_sent}  in {s.elapsed_s:.2f} s",
            f"  TTFT (ms)    {_line(s.ttft, p99=True)}",
            f"  TPOT (ms)    {_line(s.tpot, p99=False)}",
            f"  throughput   {s.request_throughput_rps:.2f} req/s  "
            f"{s.output_tokens_per_s:.1f} output tok/s  ({s.num_prompt_tokens} prompt tokens sent)",
        ]
        for status, count in s.failures.items():
            lines.append(f"  failed       {status} {count}: {s.failure_reasons[status]}")
        if router is None:
            why = self.metrics_error or "no --metrics-url"
            lines.append(f"  router       n/a ({why})")
            return "\n".join(lines)
        share = "n/a" if router.remote_share is None else f"{100 * router.remote_share:.1f} %"
        relayed = "n/a" if router.relay_bytes is None else f"{router.relay_bytes:.0f} bytes"
        egress = "n/a" if router.egress_gbps is None else f"{router.egress_gbps:.3f} Gbps"
        lines.append(f"  router       routed remote {share}  relayed {relayed}  egress {egress}")
        return "\n".join(lines)


def _latency(summary: LatencySummary, p99: bool) -> dict[str, float | None]:
    values = {"mean": summary.mean_ms, "p50": summary.p50_ms, "p90": summary.p90_ms}
    return {**values, "p99": summary.p99_ms} if p99 else values


def _line(summary: LatencySummary, p99: bool) -> str:
    return "  ".join(f"{name} {'n/a' if v is None else f'{v:.2f}'}"
                     for name, v in _latency(summary, p99).items())  # fmt: skip
