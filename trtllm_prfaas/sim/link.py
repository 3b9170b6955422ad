"""The PrfaaS egress link with a bandwidth that changes over time (piecewise constant).

Transfers cross the link first come, first served (one FIFO over the whole link: the relay's
multi-stream TCP shares one bottleneck, and FIFO keeps the sum of completion times honest while
being O(log n) per transfer). A transfer of ``g`` gigabits that starts at ``s`` ends at
``C^-1(C(s) + g)`` where ``C(t)`` is the cumulative capacity in gigabits, a piecewise linear
function; both directions are binary searches over the schedule's breakpoints.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from trtllm_prfaas.errors import ConfigError

__all__ = ["LinkSchedule", "link_drop"]


@dataclass(frozen=True)
class LinkSchedule:
    """``gbps[i]`` from ``start_s[i]`` until ``start_s[i + 1]`` (the last rate holds forever).

    ``start_s[0]`` must be 0. An infinite rate means transfers take no time.
    """

    start_s: tuple[float, ...]
    gbps: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.start_s or len(self.start_s) != len(self.gbps) or self.start_s[0] != 0:
            raise ConfigError("LinkSchedule needs matching tuples starting at 0 s")
        if any(b <= a for a, b in zip(self.start_s, self.start_s[1:], strict=False)):
            raise ConfigError("LinkSchedule start times must increase")
        if min(self.gbps) <= 0:
            raise ConfigError("LinkSchedule rates must be > 0")
        cum = [0.0]
        for i in range(len(self.start_s) - 1):
            cum.append(cum[-1] + self.gbps[i] * (self.start_s[i + 1] - self.start_s[i]))
        object.__setattr__(self, "_cum", cum)

    @classmethod
    def constant(cls, gbps: float) -> LinkSchedule:
        """A link that never changes."""
        return cls((0.0,), (gbps,))

    @property
    def is_infinite(self) -> bool:
        """True when every rate is infinite."""
        return all(math.isinf(g) for g in self.gbps)

    def rate_at(self, t_s: float) -> float:
        """Gbps in force at ``t_s``."""
        return self.gbps[max(bisect.bisect_right(self.start_s, t_s) - 1, 0)]

    def capacity_gb(self, t_s: float) -> float:
        """``C(t)``: gigabits the link could have carried in ``[0, t_s]``."""
        i = max(bisect.bisect_right(self.start_s, t_s) - 1, 0)
        cum: list[float] = self._cum  # type: ignore[attr-defined]
        return cum[i] + self.gbps[i] * (t_s - self.start_s[i])

    def finish_s(self, start_s: float, gigabits: float) -> float:
        """When a transfer of ``gigabits`` that starts (alone) at ``start_s`` ends."""
        if gigabits <= 0:
            return start_s
        i = max(bisect.bisect_right(self.start_s, start_s) - 1, 0)
        if math.isinf(self.gbps[i]):
            return start_s
        cum: list[float] = self._cum  # type: ignore[attr-defined]
        target = cum[i] + self.gbps[i] * (start_s - self.start_s[i]) + gigabits
        j = max(bisect.bisect_right(cum, target) - 1, i)
        return self.start_s[j] + (target - cum[j]) / self.gbps[j]


def link_drop(
    base_gbps: float, drop_at_s: float, duration_s: float, fraction: float
) -> LinkSchedule:
    """``base_gbps``, then ``fraction`` of it for ``duration_s`` from ``drop_at_s``, then back."""
    if drop_at_s <= 0 or duration_s <= 0 or not 0 < fraction <= 1:
        raise ConfigError("link_drop needs drop_at_s > 0, duration_s > 0, 0 < fraction <= 1")
    return LinkSchedule(
        (0.0, drop_at_s, drop_at_s + duration_s), (base_gbps, base_gbps * fraction, base_gbps)
    )
