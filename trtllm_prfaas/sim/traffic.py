"""Request traces for the discrete-event simulator, generated up front with numpy.

A :class:`Trace` is plain arrays (one entry per request, arrival order): arrival times, prompt
lengths and an optional cached prefix with its holder. Generating everything before the run keeps
per-event Python work in the simulator to the minimum.

Arrival processes:

- :class:`PoissonArrivals`: exponential gaps at ``rate_per_s``.
- :class:`OnOffArrivals`: a two-state Markov-modulated Poisson process (MMPP-2). The "on" state
  runs at ``peak_to_mean * mean`` and holds for an exponential time of mean ``mean_on_s``; the
  "off" state's rate and mean holding time are set so that the long-run mean rate is
  ``rate_per_s`` and ``on_fraction`` of the time is spent on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.profile import FloatArray
from trtllm_prfaas.policy.workload import LengthDistribution, TruncatedLogNormal

__all__ = [
    "ArrivalProcess",
    "IntArray",
    "OnOffArrivals",
    "PoissonArrivals",
    "PrefixModel",
    "Trace",
    "make_trace",
    "sample_lengths",
]

IntArray = npt.NDArray[np.int64]

NO_HOLDER = -1  # prefix_node value of a request with no cached prefix
_LENGTH_BLOCK = 4096  # lengths are drawn in blocks this size (common random numbers)


class ArrivalProcess(Protocol):
    """Generates sorted arrival times (seconds from 0)."""

    @property
    def rate_per_s(self) -> float: ...

    def times(self, num_requests: int, rng: np.random.Generator) -> FloatArray:
        """``num_requests`` sorted arrival times."""
        ...


@dataclass(frozen=True)
class PoissonArrivals:
    """A Poisson process at ``rate_per_s``."""

    rate_per_s: float

    def times(self, num_requests: int, rng: np.random.Generator) -> FloatArray:
        """Cumulative exponential gaps."""
        return np.cumsum(rng.exponential(1.0 / self.rate_per_s, num_requests))


@dataclass(frozen=True)
class OnOffArrivals:
    """MMPP-2 with mean ``rate_per_s``; see the module doc."""

    rate_per_s: float
    peak_to_mean: float = 2.0
    on_fraction: float = 0.3
    mean_on_s: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.on_fraction < 1 or self.peak_to_mean * self.on_fraction > 1:
            raise ConfigError("OnOffArrivals needs 0 < on_fraction < 1, peak * on_fraction <= 1")

    def _segments(
        self, horizon_s: float, rng: np.random.Generator
    ) -> tuple[FloatArray, FloatArray]:
        """Alternating state boundaries and rates until ``horizon_s`` (starts in "on")."""
        mean_off_s = self.mean_on_s * (1 - self.on_fraction) / self.on_fraction
        n = int(horizon_s / (self.mean_on_s + mean_off_s)) * 2 + 64
        means = np.where(np.arange(n) % 2 == 0, self.mean_on_s, mean_off_s)
        bounds = np.concatenate([[0.0], np.cumsum(rng.exponential(means))])
        on_rate = self.rate_per_s * self.peak_to_mean
        off_rate = self.rate_per_s * (1 - self.peak_to_mean * self.on_fraction)
        off_rate /= 1 - self.on_fraction
        rates = np.where(np.arange(n) % 2 == 0, on_rate, off_rate)
        return bounds, rates

    def times(self, num_requests: int, rng: np.random.Generator) -> FloatArray:
        """Poisson points per state segment (vectorised), topped up until enough exist."""
        horizon = 1.5 * num_requests / self.rate_per_s + 10 * self.mean_on_s
        while True:
            bounds, rates = self._segments(horizon, rng)
            counts = rng.poisson(rates * np.diff(bounds))
            if counts.sum() >= num_requests:
                break
            horizon *= 2
        starts = np.repeat(bounds[:-1], counts)
        widths = np.repeat(np.diff(bounds), counts)
        points = np.sort(starts + rng.random(len(starts)) * widths)
        return np.asarray(points[:num_requests], dtype=np.float64)


def sample_lengths(dist: LengthDistribution, n: int, rng: np.random.Generator) -> IntArray:
    """``n`` prompt lengths (tokens, >= 1). Exact rejection sampling for the truncated
    log-normal; otherwise inverse-CDF through a 4,097-point quantile table."""
    if isinstance(dist, TruncatedLogNormal):
        out = np.empty(0)
        while len(out) < n:
            draw = np.exp(rng.normal(dist.mu, dist.sigma, int(n * 1.1) + 16))
            out = np.concatenate([out, draw[(draw >= dist.lo) & (draw <= dist.hi)]])
        return np.asarray(np.maximum(np.rint(out[:n]), 1), dtype=np.int64)
    qs = np.linspace(0.0, 1.0, 4097)
    table = np.asarray([dist.quantile(float(q)) for q in qs])
    return np.asarray(np.maximum(np.rint(np.interp(rng.random(n), qs, table)), 1), dtype=np.int64)


@dataclass(frozen=True)
class PrefixModel:
    """Optional prefix-cache hits: with probability ``hit_rate`` a request finds
    ``prefix_fraction`` of its prompt cached on one node, in the PD prefill pool with probability
    ``pd_share`` (else in the PrfaaS pool), the node chosen uniformly. Stationary: hits do not
    depend on earlier requests (a simple, explicit stand-in for session reuse)."""

    hit_rate: float
    prefix_fraction: float = 0.5
    pd_share: float = 0.5

    def __post_init__(self) -> None:
        fields = (self.hit_rate, self.prefix_fraction, self.pd_share)
        if any(not 0 <= x <= 1 for x in fields):
            raise ConfigError("PrefixModel fractions must be in [0, 1]")


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order. ``prefix_tokens[i] > 0`` means ``prefix_node[i]`` of cluster
    ``prefix_in_pd[i]`` (True: PD prefill pool, False: PrfaaS pool) caches that much of it.

    Token-level identity (``sim/conversations.py``): ``prompt_hashes[i]`` are request ``i``'s
    chained block hashes (``PrefixIndex.hashes_for`` of its prompt, blocks of
    ``tokens_per_block`` tokens); a simulator that models caches (``DesConfig.caches``) derives
    prefixes from them and ignores the three prefix arrays."""

    arrival_s: FloatArray
    prompt_tokens: IntArray
    prefix_tokens: IntArray
    prefix_in_pd: npt.NDArray[np.bool_]
    prefix_node: IntArray
    prompt_hashes: tuple[list[int], ...] | None = None
    tokens_per_block: int = 0

    @property
    def num_requests(self) -> int:
        """Number of requests."""
        return len(self.arrival_s)


def make_trace(
    arrivals: ArrivalProcess,
    lengths: LengthDistribution,
    num_requests: int,
    seed: int,
    prefix: PrefixModel | None = None,
    num_nodes: tuple[int, int] = (1, 1),
) -> Trace:
    """A reproducible trace; ``num_nodes = (prfaas, pd_prefill)`` bounds the prefix holders.

    Arrivals, lengths and prefix hits draw from independent streams of ``seed``, and lengths
    are drawn in blocks of ``_LENGTH_BLOCK``: traces of one seed at different rates or sizes
    share their prompt lengths (common random numbers), so comparing rates or policies compares
    like with like instead of a new sample of the heavy-tailed length distribution each time.
    """
    arrival_rng, length_rng, rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    times = arrivals.times(num_requests, arrival_rng)
    num_drawn = -(-num_requests // _LENGTH_BLOCK) * _LENGTH_BLOCK
    prompts = sample_lengths(lengths, num_drawn, length_rng)[:num_requests]
    zeros = np.zeros(num_requests, dtype=np.int64)
    if prefix is None or prefix.hit_rate == 0:
        no = np.zeros(num_requests, dtype=np.bool_)
        return Trace(times, prompts, zeros, no, zeros + NO_HOLDER)
    hit = rng.random(num_requests) < prefix.hit_rate
    pfx = np.where(hit, np.floor(prompts * prefix.prefix_fraction), 0).astype(np.int64)
    in_pd = rng.random(num_requests) < prefix.pd_share
    size = np.where(in_pd, max(num_nodes[1], 1), max(num_nodes[0], 1))
    node = np.where(hit, (rng.random(num_requests) * size).astype(np.int64), NO_HOLDER)
    return Trace(times, prompts, pfx, in_pd, node)
