"""Token-bucket pacing that emulates a WAN link of ``link_gbps`` without root or tc."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """Pace bytes to ``rate_gbps``; time is passed in (seconds, monotonic).

    The bucket starts empty and holds at most ``burst_bytes`` (at least one chunk), so a
    transfer of ``n`` bytes takes at least ``(n - burst_bytes) / rate`` and, when each send
    waits for its full size in tokens, at least ``n / rate`` from the first send.
    """

    def __init__(self, rate_gbps: float, burst_bytes: int, now_s: float) -> None:
        self.rate_bytes_per_s = rate_gbps * 1e9 / 8
        self.burst_bytes = burst_bytes
        self._tokens = 0.0
        self._stamp_s = now_s

    def _refill(self, now_s: float) -> None:
        elapsed = max(0.0, now_s - self._stamp_s)
        self._tokens = min(float(self.burst_bytes), self._tokens + elapsed * self.rate_bytes_per_s)
        self._stamp_s = now_s

    def try_take(self, nbytes: int, now_s: float) -> bool:
        """Take ``nbytes`` tokens if available now (a chunk above the burst needs a full bucket)."""
        self._refill(now_s)
        need = min(float(nbytes), float(self.burst_bytes))
        if self._tokens < need:
            return False
        self._tokens -= nbytes  # may go negative for chunks above the burst: pays it back later
        return True

    def wait_s(self, nbytes: int, now_s: float) -> float:
        """Seconds until ``try_take(nbytes)`` can succeed (0 if it can now)."""
        self._refill(now_s)
        need = min(float(nbytes), float(self.burst_bytes))
        return max(0.0, (need - self._tokens) / self.rate_bytes_per_s)
