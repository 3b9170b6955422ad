"""The router's Prometheus endpoint, scraped before and after a run, and the deltas the bench
reports. Metric names are those of ``telemetry/metrics.py``:

- ``prfaas_requests_total{route, status}``: the remote share is
  ``delta(route="remote") / delta(all routes)``;
- ``prfaas_relay_bytes_total{link}``: bytes relayed is the delta summed over links, and egress
  Gbps is those bytes * 8 / 1e9 over the seconds between the two scrapes.

A value whose metric is declared by neither scrape (a server without a router's metrics), or
whose denominator is zero (no request was routed), is ``None``: printed "n/a", never invented.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from trtllm_prfaas.errors import PrfaasError

__all__ = ["MetricsSnapshot", "MetricsUnavailable", "RouterDelta", "router_delta", "scrape"]

REQUESTS_TOTAL = "prfaas_requests_total"
RELAY_BYTES_TOTAL = "prfaas_relay_bytes_total"
REMOTE_ROUTE = "remote"

Labels = frozenset[tuple[str, str]]


class MetricsUnavailable(PrfaasError):
    """The metrics endpoint could not be read or parsed; the message says why."""


@dataclass(frozen=True)
class MetricsSnapshot:
    """Every sample of one scrape, ``(sample name, labels) -> value``, and when it was taken."""

    taken_at: float  # monotonic seconds
    samples: dict[tuple[str, Labels], float]
    families: frozenset[str] = frozenset()  # declared families, even those without samples

    def has(self, name: str) -> bool:
        """True when the endpoint declares metric ``name`` (a counter's ``_total`` included)."""
        if name in self.families or name.removesuffix("_total") in self.families:
            return True
        return any(sample == name for sample, _ in self.samples)

    def total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
        wanted = set(labels.items())
        return sum(v for (sample, have), v in self.samples.items()
                   if sample == name and wanted <= have)  # fmt: skip


def parse(text: str, taken_at: float) -> MetricsSnapshot:
    """Parse Prometheus text exposition; raises MetricsUnavailable on malformed input."""
    samples: dict[tuple[str, Labels], float] = {}
    families: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = float(s.value)
    except ValueError as exc:
        raise MetricsUnavailable(f"cannot parse the metrics: {exc}") from exc
    return MetricsSnapshot(taken_at, samples, frozenset(families))


def scrape(url: str, taken_at: float, timeout_s: float = 5.0) -> MetricsSnapshot:
    """GET ``url`` (blocking, at most ``timeout_s``) and parse it; raises MetricsUnavailable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MetricsUnavailable(f"cannot read {url}: {exc}") from exc
    return parse(text, taken_at)


@dataclass(frozen=True)
class RouterDelta:
    """What the router did during the run; ``None`` where the metric was absent."""

    num_routed: float | None  # requests finished by the orchestrator, every route
    remote_share: float | None  # 0..1
    relay_bytes: float | None
    egress_gbps: float | None


def router_delta(before: MetricsSnapshot, after: MetricsSnapshot) -> RouterDelta:
    """The router's counters between two scrapes (see the module docstring)."""
    num_routed = remote_share = relay_bytes = egress_gbps = None
    if before.has(REQUESTS_TOTAL) or after.has(REQUESTS_TOTAL):
        num_routed = after.total(REQUESTS_TOTAL) - before.total(REQUESTS_TOTAL)
        remote = after.total(REQUESTS_TOTAL, route=REMOTE_ROUTE) - before.total(
            REQUESTS_TOTAL, route=REMOTE_ROUTE
        )
        remote_share = remote / num_routed if num_routed > 0 else None
    if before.has(RELAY_BYTES_TOTAL) or after.has(RELAY_BYTES_TOTAL):
        relay_bytes = after.total(RELAY_BYTES_TOTAL) - before.total(RELAY_BYTES_TOTAL)
        seconds = after.taken_at - before.taken_at
        egress_gbps = relay_bytes * 8 / 1e9 / seconds if seconds > 0 else None
    return RouterDelta(num_routed, remote_share, relay_bytes, egress_gbps)
