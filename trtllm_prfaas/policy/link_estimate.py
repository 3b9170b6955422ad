"""A live estimate of the PrfaaS egress link's capacity that tells a slow link from a slow producer.

Relay goodput alone cannot: a prefill worker that produces KV at 2 Gbps on a 10 Gbps link
shows 2 Gbps of goodput, exactly like a link that can carry only 2. What differs is what the
relay *sender* sees while it sends (``transport/stats.py``, reported in ``LoadReport``):

- **link-bound time**: the sender had credited bytes ready to send and was held back by the
  link, i.e. by its pacer (``RelayConfig.link_gbps``) or by full stream queues (zmq's high-water
  mark reached: the kernel's send buffers are full). Bytes handed over during that time, divided
  by it, is the rate the link drains at: a capacity sample. A slow producer leaves the sender
  with nothing to send, a slow consumer (decode not releasing buffers) leaves it waiting for
  **credit**; neither is link-bound, so neither produces a sample.
- **the kernel's link-bound time** (Linux ``TCP_INFO``, read with ``getsockopt`` on the
  sender's own connections by its I/O thread about every 20 ms): time during which some
  connection had unsent bytes queued in the kernel (``tcpi_notsent_bytes > 0``) and a
  delivery-rate sample not marked application-limited (at two reads in a row), and the bytes
  TCP saw acknowledged over that time (``tcpi_bytes_acked``), the rate the link delivered while
  it was the bottleneck.
  That is what a link shaped below the sender's buffers (``tc`` ``tbf``) shows, where the
  receiver's credit, not the sender's queues, holds the sender back. Where ``TCP_INFO`` is
  unavailable (not Linux) this signal is 0 and the estimate rests on the sender's own view.

One update per control period (:func:`update`), from every PrfaaS worker's period:

- some worker link-bound (either view, for at least ``bound_fraction`` of the period): capacity
  sample = the link-bound rate of the bound workers (the larger of the two views) plus what the
  others delivered in the period (they share the egress); the estimate moves to it at once
  when lower, half-way when higher;
- none bound: the estimate holds; after ``recover_s`` without any bound period it relaxes
  towards the prior by ``recover_factor`` per period, or at once to what the link is known to
  have delivered (bytes the receivers acknowledged) if that is more, never past a provisioned
  rate (acknowledgements come per transfer: one period can count more than the link moved).
  A link that came back shows nothing while producers are slower than it, so the estimate
  must return by itself; if the link is still slow, the next busy period is link-bound again
  and pulls it down (a probe, like TCP's own).

The prior is the provisioned rate when configured; otherwise the highest rate ever estimated or
carried (before any sample, a default). An idle or producer-bound relay never lowers the
estimate. Pure: plain data in, time passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trtllm_prfaas.errors import ConfigError

__all__ = [
    "LinkEstimate",
    "LinkEstimateConfig",
    "RelayCounters",
    "RelayPeriod",
    "initial_estimate",
    "period",
    "retransmit_ratio",
    "update",
]


@dataclass(frozen=True)
class LinkEstimateConfig:
    """``alpha_up``: weight of a capacity sample above the estimate (0.5: a recovering link
    shows within ~2 periods, one outlier moves the estimate half-way); ``alpha_down``: below it
    (1.0: a link-bound period measures the drain rate directly, and following a slower link at
    once only raises ``t_min``, the safe direction); ``bound_fraction``: share of a period a
    worker must be link-bound for its sample to count (0.2: 200 ms of a 1 s period is already
    hundreds of chunks at any rate worth estimating); ``recover_s``: time without any bound
    period before relaxing towards the prior (5 s: a few request lifetimes, so a link still
    down is re-measured before the estimate climbs far); ``recover_factor``: x1.25 per update
    (from 10% back to 100% in ~10 periods)."""

    alpha_up: float = 0.5
    alpha_down: float = 1.0
    bound_fraction: float = 0.2
    recover_s: float = 5.0
    recover_factor: float = 1.25

    def __post_init__(self) -> None:
        if not all(0 < x <= 1 for x in (self.alpha_up, self.alpha_down, self.bound_fraction)):
            raise ConfigError("link estimate: alphas and bound_fraction must be in (0, 1]")
        if self.recover_s < 0 or self.recover_factor <= 1:
            raise ConfigError("link estimate: recover_s must be >= 0 and recover_factor > 1")


@dataclass(frozen=True)
class RelayCounters:
    """One worker's relay sender counters at ``now_s`` (cumulative since the worker started,
    summed over its senders; ``LoadReport``'s ``relay_*`` fields)."""

    now_s: float
    bytes_sent: int = 0  # payload handed to the streams
    link_wait_s: float = 0.0  # held back by the pacer or full stream queues with data ready
    link_wait_bytes: int = 0  # payload handed over during that time
    credit_wait_s: float = 0.0  # data ready, no credit from the receiver
    tcp_bound_s: float = 0.0  # the kernel showed the link limiting (TCP_INFO; 0 without)
    tcp_bound_gbit: float = 0.0  # its delivery rate integrated over that time
    tcp_retrans: int = 0
    tcp_segs_out: int = 0
    bytes_acked: int = 0  # payload of transfers the receiver acknowledged (delivered)


@dataclass(frozen=True)
class RelayPeriod:
    """One worker over one period: rates and shares derived from two :class:`RelayCounters`."""

    duration_s: float
    sent_gbps: float
    link_bound_share: float
    bound_gbps: float  # handed-over rate while link-bound (0 if never bound)
    credit_wait_share: float
    tcp_bound_share: float
    tcp_gbps: float  # the kernel's link rate while it showed the link limiting (0 if never)
    retransmits: int
    segments: int
    acked_gbps: float = 0.0  # delivered: what the link is known to have carried


def period(before: RelayCounters, after: RelayCounters) -> RelayPeriod | None:
    """The period between two reports, or ``None`` if the counters went back (a restarted
    worker or sender) or no time passed."""
    dt = after.now_s - before.now_s
    sent = after.bytes_sent - before.bytes_sent
    wait_s = after.link_wait_s - before.link_wait_s
    wait_bytes = after.link_wait_bytes - before.link_wait_bytes
    tcp_s = after.tcp_bound_s - before.tcp_bound_s
    tcp_gbit = after.tcp_bound_gbit - before.tcp_bound_gbit
    if dt <= 0 or min(sent, wait_s, wait_bytes) < 0:
        return None
    return RelayPeriod(
        duration_s=dt,
        sent_gbps=sent * 8 / 1e9 / dt,
        link_bound_share=min(wait_s / dt, 1.0),
        bound_gbps=wait_bytes * 8 / 1e9 / wait_s if wait_s > 0 else 0.0,
        credit_wait_share=min(max(after.credit_wait_s - before.credit_wait_s, 0.0) / dt, 1.0),
        tcp_bound_share=min(max(tcp_s, 0.0) / dt, 1.0),
        tcp_gbps=tcp_gbit / tcp_s if tcp_s > 0 and tcp_gbit > 0 else 0.0,
        retransmits=max(after.tcp_retrans - before.tcp_retrans, 0),
        segments=max(after.tcp_segs_out - before.tcp_segs_out, 0),
        acked_gbps=max(after.bytes_acked - before.bytes_acked, 0) * 8 / 1e9 / dt,
    )


@dataclass(frozen=True)
class LinkEstimate:
    """The estimate (Gbps), the prior it relaxes to, when a period was last link-bound."""

    gbps: float
    prior_gbps: float
    is_prior_fixed: bool  # the provisioned rate: the prior never moves
    last_bound_s: float | None = None
    last_sample_gbps: float | None = None  # the last period's capacity sample, if bound
    peak_gbps: float = 0.0  # highest rate estimated or carried (an unconfigured link's prior)

    @property
    def is_link_bound(self) -> bool:
        """True when the last update found a link-bound period."""
        return self.last_sample_gbps is not None


def initial_estimate(provisioned_gbps: float | None, default_gbps: float) -> LinkEstimate:
    """Start at the provisioned rate (fixed prior) or at ``default_gbps`` (prior that learns)."""
    rate = provisioned_gbps if provisioned_gbps is not None else default_gbps
    if not rate > 0:
        raise ConfigError(f"link estimate: a link rate must be > 0 Gbps, got {rate}")
    return LinkEstimate(rate, rate, provisioned_gbps is not None)


def _is_bound(c: LinkEstimateConfig, p: RelayPeriod) -> bool:
    return _app_rate(c, p) > 0 or _tcp_rate(c, p) > 0


def _capacity_sample(c: LinkEstimateConfig, periods: list[RelayPeriod]) -> float | None:
    """Bound workers' link rate plus the others' throughput; ``None`` when none is bound."""
    bound = [p for p in periods if _is_bound(c, p)]
    if not bound:
        return None
    free = sum(p.acked_gbps for p in periods if not _is_bound(c, p))
    return free + sum(max(_app_rate(c, p), _tcp_rate(c, p)) for p in bound)


def _app_rate(c: LinkEstimateConfig, p: RelayPeriod) -> float:
    return p.bound_gbps if p.link_bound_share >= c.bound_fraction else 0.0


def _tcp_rate(c: LinkEstimateConfig, p: RelayPeriod) -> float:
    return p.tcp_gbps if p.tcp_bound_share >= c.bound_fraction else 0.0


def update(
    c: LinkEstimateConfig, est: LinkEstimate, periods: list[RelayPeriod], now_s: float
) -> LinkEstimate:
    """Fold one control period's worker periods into the estimate (see the module doc)."""
    sample = _capacity_sample(c, periods)
    carried = sum(p.acked_gbps for p in periods)
    if sample is not None:
        first = not est.is_prior_fixed and est.last_bound_s is None  # the default was a guess
        alpha = 1.0 if first else c.alpha_up if sample > est.gbps else c.alpha_down
        gbps = est.gbps + alpha * (sample - est.gbps)
        new = replace(est, gbps=gbps, last_bound_s=now_s, last_sample_gbps=sample)
        return _learn(new, max(est.peak_gbps, gbps, carried))
    gbps, quiet_since = est.gbps, est.last_bound_s
    if quiet_since is None or now_s - quiet_since >= c.recover_s:
        lifted = max(carried, min(gbps * c.recover_factor, est.prior_gbps))
        gbps = max(gbps, min(lifted, est.prior_gbps) if est.is_prior_fixed else lifted)
    new = replace(est, gbps=gbps, last_sample_gbps=None)
    return _learn(new, max(est.peak_gbps, carried))


def _learn(est: LinkEstimate, peak_gbps: float) -> LinkEstimate:
    """An unconfigured link's prior becomes the highest rate estimated or carried once the link
    has been measured (link-bound) at least once; before that it is the default."""
    if est.is_prior_fixed or est.last_bound_s is None:
        return replace(est, peak_gbps=peak_gbps)
    return replace(est, peak_gbps=peak_gbps, prior_gbps=peak_gbps)


def retransmit_ratio(periods: list[RelayPeriod]) -> float:
    """Retransmitted over sent TCP segments in the period (0 without ``TCP_INFO``)."""
    segments = sum(p.segments for p in periods)
    return sum(p.retransmits for p in periods) / segments if segments else 0.0
