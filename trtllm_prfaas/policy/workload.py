"""Input-length distributions and the conditional moments the throughput model needs.

Two implementations share the :class:`LengthDistribution` interface:

- :class:`TruncatedLogNormal` — the paper's parametric workload, with exact closed-form
  probabilities and first moments (numeric quadrature only for nonlinear ``f``);
- :class:`HistogramLengths` — an empirical histogram of recent traffic (density uniform inside a
  bin), cheap enough to rebuild and re-solve every second.

Lengths are in tokens. Interval conventions: ``partial_*(a, b)`` integrate over ``a < L <= b``;
``cdf(x) = P(L <= x)``. All methods are pure; array methods are vectorised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Protocol

import numpy as np

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.profile import FloatArray, LatencyCurve

__all__ = [
    "HistogramLengths",
    "LengthDistribution",
    "TruncatedLogNormal",
    "conditional_expectation",
    "conditional_means",
    "curve_mixture_quantile",
]

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)
_ERF = np.frompyfunc(math.erf, 1, 1)
_STD_NORMAL = NormalDist()


class LengthDistribution(Protocol):
    """A distribution of (uncached) prompt lengths supported on ``[lo, hi]`` tokens."""

    @property
    def lo(self) -> float: ...

    @property
    def hi(self) -> float: ...

    @property
    def mean(self) -> float: ...

    def cdf(self, tokens: FloatArray) -> FloatArray:
        """``P(L <= x)`` for each ``x``; 0 below ``lo``, 1 at and above ``hi``."""
        ...

    def partial_mean(self, a: FloatArray, b: FloatArray) -> FloatArray:
        """``E[L * 1{a < L <= b}]`` elementwise (0 where ``b <= a``)."""
        ...

    def partial_expectation(
        self,
        f: Callable[[FloatArray], FloatArray],
        a: float,
        b: float,
        breakpoints: Sequence[float] = (),
    ) -> float:
        """``E[f(L) * 1{a < L <= b}]`` for a vectorised ``f`` (numeric quadrature).

        ``breakpoints`` are lengths where ``f`` has kinks; an implementation may split there."""
        ...

    def quantile(self, q: float) -> float:
        """The smallest ``x`` with ``P(L <= x) >= q``, for ``0 <= q <= 1``."""
        ...


def _norm_cdf(z: FloatArray) -> FloatArray:
    erf = np.asarray(_ERF(np.asarray(z, dtype=np.float64) / math.sqrt(2.0)), dtype=np.float64)
    return np.asarray(0.5 * (1.0 + erf), dtype=np.float64)


@dataclass(frozen=True)
class TruncatedLogNormal:
    """``ln L ~ Normal(mu, sigma)`` conditioned on ``lo <= L <= hi`` (tokens)."""

    mu: float
    sigma: float
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if self.sigma <= 0 or not 0 < self.lo < self.hi:
            raise ConfigError("TruncatedLogNormal needs sigma > 0 and 0 < lo < hi")

    def _std(self, x: FloatArray, shift: float = 0.0) -> FloatArray:
        """Standardised log length, optionally shifted by ``shift`` (for the k-th moment)."""
        clipped = np.clip(np.asarray(x, dtype=np.float64), self.lo, self.hi)
        return np.asarray((np.log(clipped) - self.mu - shift) / self.sigma, dtype=np.float64)

    @property
    def _mass(self) -> float:
        ends = _norm_cdf(self._std(np.asarray([self.lo, self.hi])))
        return float(ends[1] - ends[0])

    @property
    def mean(self) -> float:
        return float(self.partial_mean(np.asarray([self.lo]), np.asarray([self.hi]))[0])

    def cdf(self, tokens: FloatArray) -> FloatArray:
        base = _norm_cdf(self._std(np.asarray([self.lo])))[0]
        return np.asarray((_norm_cdf(self._std(tokens)) - base) / self._mass, dtype=np.float64)

    def partial_mean(self, a: FloatArray, b: FloatArray) -> FloatArray:
        s2 = self.sigma**2
        scale = math.exp(self.mu + s2 / 2) / self._mass
        diff = _norm_cdf(self._std(b, s2)) - _norm_cdf(self._std(a, s2))
        return np.asarray(scale * np.maximum(diff, 0.0), dtype=np.float64)

    def partial_expectation(
        self,
        f: Callable[[FloatArray], FloatArray],
        a: float,
        b: float,
        breakpoints: Sequence[float] = (),
        num_panels: int = 48,
    ) -> float:
        """Gauss-Legendre in log space over ``num_panels`` panels, split at ``breakpoints``
        (kinks of ``f``, e.g. the points of a piecewise curve) so each panel is smooth."""
        a, b = max(a, self.lo), min(b, self.hi)
        if b <= a:
            return 0.0
        ua, ub = math.log(a), math.log(b)
        cuts = [math.log(x) for x in breakpoints if a < x < b]
        edges = np.unique(np.concatenate([np.linspace(ua, ub, num_panels + 1), cuts]))
        half = np.diff(edges)[:, None] / 2
        u = edges[:-1, None] + half * (_GL_NODES[None, :] + 1)  # (panels, nodes)
        dens = np.exp(-0.5 * ((u - self.mu) / self.sigma) ** 2)
        dens /= self.sigma * math.sqrt(2 * math.pi) * self._mass
        return float(np.sum(half * _GL_WEIGHTS[None, :] * dens * f(np.exp(u))))

    def quantile(self, q: float) -> float:
        lo_p = float(_norm_cdf(self._std(np.asarray([self.lo])))[0])
        target = min(max(lo_p + q * self._mass, 1e-300), 1 - 1e-16)
        x = math.exp(self.mu + self.sigma * _STD_NORMAL.inv_cdf(target))
        return min(max(x, self.lo), self.hi)


@dataclass(frozen=True)
class HistogramLengths:
    """An empirical length histogram: ``counts[i]`` requests in ``(edges[i], edges[i+1]]``,
    density uniform inside each bin. Counts may be fractional (e.g. exponentially decayed)."""

    edges: tuple[float, ...]
    counts: tuple[float, ...]
    _e: FloatArray = field(init=False, repr=False, compare=False)
    _cum: FloatArray = field(init=False, repr=False, compare=False)
    _cum_l: FloatArray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        e = np.asarray(self.edges, dtype=np.float64)
        c = np.asarray(self.counts, dtype=np.float64)
        if len(e) != len(c) + 1 or len(c) < 1 or np.any(np.diff(e) <= 0) or e[0] < 0:
            raise ConfigError("HistogramLengths needs len(edges) == len(counts) + 1, increasing")
        if np.any(c < 0) or c.sum() <= 0:
            raise ConfigError("HistogramLengths needs non-negative counts with a positive total")
        m = c / c.sum()
        cum_l = np.concatenate([[0.0], np.cumsum(m * (e[:-1] + e[1:]) / 2)])
        object.__setattr__(self, "_e", e)
        object.__setattr__(self, "_cum", np.concatenate([[0.0], np.cumsum(m)]))
        object.__setattr__(self, "_cum_l", cum_l)

    @classmethod
    def from_samples(
        cls, tokens: Sequence[float] | FloatArray, lo: float, hi: float, num_bins: int = 64
    ) -> HistogramLengths:
        """Histogram of ``tokens`` over log-spaced bins on ``[lo, hi]`` (samples are clipped)."""
        edges = np.geomspace(lo, hi, num_bins + 1)
        clipped = np.clip(np.asarray(tokens, dtype=np.float64), lo, hi)
        counts, _ = np.histogram(clipped, bins=edges)
        return cls(tuple(edges.tolist()), tuple(float(x) for x in counts))

    @property
    def lo(self) -> float:
        return float(self._e[0])

    @property
    def hi(self) -> float:
        return float(self._e[-1])

    @property
    def mean(self) -> float:
        return float(self._cum_l[-1])

    def cdf(self, tokens: FloatArray) -> FloatArray:
        return np.asarray(np.interp(tokens, self._e, self._cum), dtype=np.float64)

    def _below_mean(self, x: FloatArray) -> FloatArray:
        """``E[L * 1{L <= x}]``: piecewise quadratic between edges."""
        e = self._e
        xc = np.clip(np.asarray(x, dtype=np.float64), e[0], e[-1])
        i = np.clip(np.searchsorted(e, xc, side="right") - 1, 0, len(e) - 2)
        dens = (self._cum[i + 1] - self._cum[i]) / (e[i + 1] - e[i])
        return np.asarray(self._cum_l[i] + dens * (xc**2 - e[i] ** 2) / 2, dtype=np.float64)

    def partial_mean(self, a: FloatArray, b: FloatArray) -> FloatArray:
        diff = self._below_mean(b) - self._below_mean(a)
        return np.asarray(np.maximum(diff, 0.0), dtype=np.float64)

    def partial_expectation(
        self,
        f: Callable[[FloatArray], FloatArray],
        a: float,
        b: float,
        breakpoints: Sequence[float] = (),
    ) -> float:
        """Gauss-Legendre inside each bin; ``breakpoints`` are split at too."""
        e = np.unique(np.concatenate([self._e, [x for x in breakpoints if self.lo < x < self.hi]]))
        dens = np.diff(self.cdf(e)) / np.diff(e)
        left, right = np.maximum(e[:-1], a), np.minimum(e[1:], b)
        width = np.maximum(right - left, 0.0)
        x = left[:, None] + width[:, None] * (_GL_NODES[None, :] + 1) / 2  # (bins, nodes)
        return float(np.sum(dens[:, None] * width[:, None] / 2 * _GL_WEIGHTS[None, :] * f(x)))

    def quantile(self, q: float) -> float:
        i = int(np.clip(np.searchsorted(self._cum, q, side="left"), 1, len(self._e) - 1))
        lo_c, hi_c = self._cum[i - 1], self._cum[i]
        frac = 0.0 if hi_c <= lo_c else (q - lo_c) / (hi_c - lo_c)
        return float(self._e[i - 1] + frac * (self._e[i] - self._e[i - 1]))


def conditional_means(
    dist: LengthDistribution, thresholds: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``(p, l_long, l_short)`` for each threshold ``t``: ``p = P(L > t)``,
    ``l_long = E[L | L > t]`` and ``l_short = E[L | L <= t]``. Where a side is empty its mean
    is reported as the boundary (``hi`` or ``lo``) so callers never see NaN."""
    t = np.asarray(thresholds, dtype=np.float64)
    below = dist.cdf(t)
    p = 1.0 - below
    lo, hi = np.full_like(t, dist.lo), np.full_like(t, dist.hi)
    mass_long = dist.partial_mean(t, hi)
    mass_short = dist.partial_mean(lo, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        l_long = np.where(p > 1e-12, mass_long / p, dist.hi)
        l_short = np.where(below > 1e-12, mass_short / below, dist.lo)
    return p, l_long, l_short


def conditional_expectation(
    dist: LengthDistribution, f: Callable[[FloatArray], FloatArray], a: float, b: float
) -> float:
    """``E[f(L) | a < L <= b]`` (NaN when the interval has no mass)."""
    mass = float(dist.cdf(np.asarray([b]))[0] - dist.cdf(np.asarray([a]))[0])
    return dist.partial_expectation(f, a, b) / mass if mass > 0 else math.nan


def curve_mixture_quantile(
    dist: LengthDistribution,
    q: float,
    pieces: Sequence[tuple[float, float, LatencyCurve]],
    tol_s: float = 1e-6,
) -> float:
    """The ``q``-quantile of ``Y = curve_i(L)`` where ``L`` falls in piece ``(a_i, b_i]``.

    Each curve is increasing, so ``P(Y <= v) = sum_i P(a_i < L <= min(b_i, curve_i^-1(v)))``
    exactly; ``v`` is found by bisection to ``tol_s``. This is how the P90 TTFT of a routing
    split (short on one hardware, long on another) is computed without sampling.
    """

    def prob_at_most(v: float) -> float:
        total = 0.0
        for a, b, curve in live:
            x = min(b, curve.tokens_for(v))
            if x > a:
                total += float(dist.cdf(np.asarray([x]))[0] - dist.cdf(np.asarray([a]))[0])
        return total

    live = [(a, b, c) for a, b, c in pieces if b > a]
    if not live:
        raise ValueError("curve_mixture_quantile needs at least one non-empty piece")
    ends = [float(c.seconds(np.asarray([x]))[0]) for a, b, c in live for x in (a, b)]
    lo_v, hi_v = min(ends), max(ends)
    while hi_v - lo_v > tol_s:
        mid = (lo_v + hi_v) / 2
        lo_v, hi_v = (lo_v, mid) if prob_at_most(mid) >= q else (mid, hi_v)
    return hi_v
