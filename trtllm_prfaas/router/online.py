"""Online estimates the router's control loop feeds the pure policy: EWMAs, latency fits, lengths.

Everything here is plain state updated from what the router observes (no clocks, no I/O); the
control loop (:mod:`trtllm_prfaas.router.control`) owns the clock and calls :meth:`snapshot`.

- :class:`Ewma`: ``v += alpha * (x - v)``; the first sample is taken as is.
- :class:`LatencyFit`: prefill latency as a line ``seconds = c0 + c1 * tokens``, fitted by
  exponentially weighted least squares (each new sample decays the old ones by ``1 - alpha``),
  so it follows a cluster whose speed changes (a co-tenant, a role change) within ~1/alpha legs.
- :class:`OnlineProfiles`: per-cluster prefill fits, decode step time, output length, the
  recent prompt lengths (a bounded window) and the relay wait of offloaded requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from trtllm_prfaas.policy.model import Workload
from trtllm_prfaas.policy.profile import ClusterProfile, KvSize, QuadraticLatency, SystemProfile
from trtllm_prfaas.policy.workload import HistogramLengths

__all__ = ["Ewma", "LatencyFit", "OnlineProfiles", "ProfileSnapshot"]

# Floors that keep a fitted line a valid (strictly increasing, positive) latency curve.
_MIN_C0_S = 1e-4
_MIN_C1_S_PER_TOKEN = 1e-7


class Ewma:
    """An exponentially weighted moving average; ``value`` is ``None`` before the first sample."""

    def __init__(self, alpha: float, initial: float | None = None) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("Ewma alpha must be in (0, 1]")
        self.alpha = alpha
        self.value = initial

    def update(self, sample: float) -> float:
        """Fold in one sample; returns the new average."""
        v = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        self.value = v
        return v

    def get(self, default: float) -> float:
        """The average, or ``default`` before any sample."""
        return default if self.value is None else self.value


class LatencyFit:
    """Exponentially weighted least-squares line through ``(tokens, seconds)`` samples."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.num_samples = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, tokens: float, seconds: float) -> None:
        """One observed prefill leg of ``tokens`` prompt tokens that took ``seconds``."""
        keep = 1.0 - self.alpha
        self._w = self._w * keep + 1.0
        self._x = self._x * keep + tokens
        self._y = self._y * keep + seconds
        self._xx = self._xx * keep + tokens * tokens
        self._xy = self._xy * keep + tokens * seconds
        self.num_samples += 1

    def coefficients(self) -> tuple[float, float] | None:
        """``(c0_s, c1_s_per_token)`` clamped to a valid curve, or ``None`` before any sample.

        With one distinct length only the mean rate is known: the line goes through the origin
        (all latency proportional to the length), which is what a single point can support."""
        if self._w <= 0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var <= 1e-9 * max(mx * mx, 1.0):
            return _MIN_C0_S, max(my / max(mx, 1.0), _MIN_C1_S_PER_TOKEN)
        slope = (self._xy / self._w - mx * my) / var
        c1 = max(slope, _MIN_C1_S_PER_TOKEN)
        return max(my - c1 * mx, _MIN_C0_S), c1

    def curve(self) -> QuadraticLatency | None:
        """The fitted latency curve (linear), or ``None`` before any sample."""
        coef = self.coefficients()
        return None if coef is None else QuadraticLatency(coef[0], coef[1], 0.0)


@dataclass(frozen=True)
class ProfileSnapshot:
    """What the solver needs at one tick: hardware profile and the recent workload."""

    system: SystemProfile
    workload: Workload


class OnlineProfiles:
    """The router's running estimates (see module doc). Not thread-safe: one event loop."""

    def __init__(self, alpha: float, window: int, num_bins: int) -> None:
        self.alpha = alpha
        self.num_bins = num_bins
        self.prefill = {"prfaas": LatencyFit(alpha), "pd": LatencyFit(alpha)}
        self.decode_step_s = Ewma(alpha)
        self.output_tokens = Ewma(alpha)
        self.relay_wait_s = Ewma(alpha, 0.0)
        self.leg_s = {"prfaas": Ewma(alpha), "pd": Ewma(alpha)}
        self.lengths: deque[int] = deque(maxlen=window)

    def on_request(self, prompt_tokens: int, max_tokens: int) -> None:
        """A routed request: its length joins the histogram window."""
        self.lengths.append(prompt_tokens)
        self.output_tokens.update(float(max_tokens))

    def on_prefill(self, is_remote: bool, tokens: int, seconds: float) -> None:
        """A prefill leg: submit to the prefill worker's first token."""
        cluster = "prfaas" if is_remote else "pd"
        self.prefill[cluster].add(float(tokens), seconds)
        self.leg_s[cluster].update(seconds)

    def on_decode(self, num_tokens: int, seconds: float) -> None:
        """A decode leg: ``num_tokens`` after the first took ``seconds`` in all."""
        if num_tokens > 0:
            self.decode_step_s.update(seconds / num_tokens)

    def is_warm(self, min_requests: int, min_legs: int) -> bool:
        """Enough requests and prefill legs on both clusters for the solver to mean something."""
        legs = min(fit.num_samples for fit in self.prefill.values())
        return len(self.lengths) >= min_requests and legs >= min_legs

    def snapshot(
        self, kv: KvSize, decode_slots: int, link_gbps: float, max_seq_len: int
    ) -> ProfileSnapshot | None:
        """The measured system and workload, or ``None`` while a prefill fit has no sample."""
        remote, local = self.prefill["prfaas"].curve(), self.prefill["pd"].curve()
        if remote is None or local is None or not self.lengths or decode_slots <= 0:
            return None
        step = self.decode_step_s.get(0.02)
        system = SystemProfile(
            ClusterProfile("prfaas", remote, kv),
            ClusterProfile("pd", local, kv, decode_slots, max(step, 1e-6)),
            max(link_gbps, 1e-6),
        )
        hist = HistogramLengths.from_samples(
            list(self.lengths), 1.0, float(max(max_seq_len, 2)), self.num_bins
        )
        output = max(1, round(self.output_tokens.get(1.0)))
        return ProfileSnapshot(system, Workload(hist, output))
