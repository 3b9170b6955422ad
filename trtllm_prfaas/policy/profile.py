"""Hardware profiles for the throughput model: prefill latency curves, KV size, decode slots, link.

Units are in the names: lengths in tokens, latencies in seconds, sizes in bytes, links in Gbps
(1 Gbps = 1e9 bit/s). The paper's tables use 1K = 1024 tokens and MiB = 2**20 bytes; the
constants :data:`TOKENS_PER_K` and :data:`BYTES_PER_MIB` make those conversions explicit.

Every latency curve is monotone increasing in the prompt length and exposes its inverse, so a
quantile of the time-to-first-token can be computed exactly from a length distribution.
Curves accept numpy arrays (vectorised) and return arrays of the same shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np
import numpy.typing as npt

from trtllm_prfaas.errors import ConfigError

__all__ = [
    "BITS_PER_BYTE",
    "BYTES_PER_MIB",
    "TOKENS_PER_K",
    "ClusterProfile",
    "FloatArray",
    "Interpolation",
    "KvSize",
    "LatencyCurve",
    "PiecewiseLatency",
    "QuadraticLatency",
    "SystemProfile",
]

FloatArray = npt.NDArray[np.float64]

TOKENS_PER_K = 1024
BYTES_PER_MIB = 2**20
BITS_PER_BYTE = 8


class LatencyCurve(Protocol):
    """Prefill latency of one instance as a function of the (uncached) prompt length."""

    def seconds(self, tokens: FloatArray) -> FloatArray:
        """Latency in seconds for each length in ``tokens`` (same shape); monotone increasing."""
        ...

    def tokens_for(self, seconds: float) -> float:
        """Inverse of :meth:`seconds`: the length whose latency is ``seconds`` (may be <= 0)."""
        ...


class Interpolation(Enum):
    """How :class:`PiecewiseLatency` fills the gaps between measured points."""

    LINEAR = "linear"  # straight lines in (tokens, seconds)
    LOGLOG = "loglog"  # straight lines in (log tokens, log seconds): a power law per segment


@dataclass(frozen=True)
class PiecewiseLatency:
    """A latency curve through measured ``(tokens, seconds)`` points (e.g. the paper's Table 5).

    Outside the measured range the end segments are extended. ``LOGLOG`` is the default because
    profiling points are geometrically spaced (1K, 8K, 32K, 128K) and a power law per segment
    follows the sub-linear-then-superlinear shape of prefill better than chords do; the paper
    only says "interpolate" (see docs/simulation.md for the effect of the choice).
    """

    tokens: tuple[float, ...]
    latency_s: tuple[float, ...]
    interpolation: Interpolation = Interpolation.LOGLOG

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.latency_s) or len(self.tokens) < 2:
            raise ConfigError("PiecewiseLatency needs >= 2 points and equal-length tuples")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)):
            raise ConfigError("PiecewiseLatency tokens must be strictly increasing")
        if any(b <= a for a, b in zip(self.latency_s, self.latency_s[1:], strict=False)):
            raise ConfigError("PiecewiseLatency latencies must be strictly increasing")
        if min(self.tokens) <= 0 or min(self.latency_s) <= 0:
            raise ConfigError("PiecewiseLatency points must be positive")

    def _axes(self) -> tuple[FloatArray, FloatArray]:
        x = np.asarray(self.tokens, dtype=np.float64)
        y = np.asarray(self.latency_s, dtype=np.float64)
        if self.interpolation is Interpolation.LOGLOG:
            return np.log(x), np.log(y)
        return x, y

    def seconds(self, tokens: FloatArray) -> FloatArray:
        """Latency in seconds; end segments are extended beyond the measured points."""
        x, y = self._axes()
        q = np.asarray(tokens, dtype=np.float64)
        if self.interpolation is Interpolation.LOGLOG:
            q = np.log(np.maximum(q, 1e-9))
        out = _extended_interp(q, x, y)
        return np.exp(out) if self.interpolation is Interpolation.LOGLOG else out

    def tokens_for(self, seconds: float) -> float:
        """Inverse of :meth:`seconds` (the curve is strictly increasing, so it is a function)."""
        x, y = self._axes()
        if self.interpolation is Interpolation.LOGLOG and seconds <= 0:
            return 0.0
        s = math.log(seconds) if self.interpolation is Interpolation.LOGLOG else seconds
        q = float(_extended_interp(np.asarray([s]), y, x)[0])
        return math.exp(q) if self.interpolation is Interpolation.LOGLOG else q


def _extended_interp(q: FloatArray, x: FloatArray, y: FloatArray) -> FloatArray:
    """``np.interp`` that extends the first and last segments instead of clamping."""
    out = np.interp(q, x, y)
    lo_slope = (y[1] - y[0]) / (x[1] - x[0])
    hi_slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
    out = np.where(q < x[0], y[0] + (q - x[0]) * lo_slope, out)
    return np.where(q > x[-1], y[-1] + (q - x[-1]) * hi_slope, out)


@dataclass(frozen=True)
class QuadraticLatency:
    """``T(l) = c0_s + c1_s_per_token * l + c2_s_per_token2 * l**2`` (all coefficients >= 0)."""

    c0_s: float
    c1_s_per_token: float
    c2_s_per_token2: float

    def __post_init__(self) -> None:
        if min(self.c0_s, self.c1_s_per_token, self.c2_s_per_token2) < 0:
            raise ConfigError("QuadraticLatency coefficients must be >= 0")
        if self.c1_s_per_token == 0 and self.c2_s_per_token2 == 0:
            raise ConfigError("QuadraticLatency must grow with the length")

    def seconds(self, tokens: FloatArray) -> FloatArray:
        """Latency in seconds for each length."""
        q = np.asarray(tokens, dtype=np.float64)
        return self.c0_s + q * (self.c1_s_per_token + q * self.c2_s_per_token2)

    def tokens_for(self, seconds: float) -> float:
        """The positive root of ``T(l) = seconds`` (negative when ``seconds < c0_s``)."""
        a, b, c = self.c2_s_per_token2, self.c1_s_per_token, self.c0_s - seconds
        if a == 0:
            return -c / b
        return (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)


@dataclass(frozen=True)
class KvSize:
    """KV cache bytes of one request: ``fixed_bytes + per_token_bytes * l``.

    The fixed part is the linear-attention recurrent state (request-level, length-independent);
    the per-token part is the full-attention KV.
    """

    fixed_bytes: float
    per_token_bytes: float

    def __post_init__(self) -> None:
        if self.fixed_bytes < 0 or self.per_token_bytes <= 0:
            raise ConfigError("KvSize needs fixed_bytes >= 0 and per_token_bytes > 0")

    def bytes(self, tokens: float) -> float:
        """KV size in bytes of a request of ``tokens`` uncached tokens."""
        return self.fixed_bytes + self.per_token_bytes * tokens

    def gigabits(self, tokens: float) -> float:
        """KV size in gigabits (1e9 bits), the unit the link is measured in."""
        return self.bytes(tokens) * BITS_PER_BYTE / 1e9

    @classmethod
    def fit(cls, tokens: tuple[float, ...], size_bytes: tuple[float, ...]) -> KvSize:
        """Least-squares line through measured ``(tokens, bytes)`` points."""
        if len(tokens) != len(size_bytes) or len(tokens) < 2:
            raise ConfigError("KvSize.fit needs >= 2 points and equal-length tuples")
        a = np.vstack([np.ones(len(tokens)), np.asarray(tokens, dtype=np.float64)]).T
        coef = np.linalg.lstsq(a, np.asarray(size_bytes, dtype=np.float64), rcond=None)[0]
        return cls(fixed_bytes=float(coef[0]), per_token_bytes=float(coef[1]))


@dataclass(frozen=True)
class ClusterProfile:
    """One cluster kind's instance: prefill curve, KV size, and decode capacity.

    ``decode_slots`` is BS_max (concurrent decode requests per instance at the decode SLO) and
    ``decode_step_s`` the time of one decode step at that batch size (1 / SLO tokens per second).
    """

    name: str
    prefill: LatencyCurve
    kv: KvSize
    decode_slots: int = 0
    decode_step_s: float = 0.0

    def __post_init__(self) -> None:
        if self.decode_slots < 0 or self.decode_step_s < 0:
            raise ConfigError(f"{self.name}: decode_slots and decode_step_s must be >= 0")


@dataclass(frozen=True)
class SystemProfile:
    """The two cluster kinds and the link between them.

    ``prfaas`` is the remote prefill-only kind; ``pd`` the local kind that prefills short requests
    and decodes everything; ``link_gbps`` is B_out, the PrfaaS cluster's usable egress.
    """

    prfaas: ClusterProfile
    pd: ClusterProfile
    link_gbps: float

    def __post_init__(self) -> None:
        if self.link_gbps <= 0:
            raise ConfigError("link_gbps must be > 0")
        if self.pd.decode_slots <= 0 or self.pd.decode_step_s <= 0:
            raise ConfigError("the PD cluster needs decode_slots > 0 and decode_step_s > 0")
