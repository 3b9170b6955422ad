"""Figures and plots of ``bench/live_drop.py``: the SLO, goodput, the worst window's P90 TTFT,
per-second series from the router's scrapes, and the PNG timeline. Pure except the plot.

**SLO (per request).** ``TT2T <= SLO_FACTOR x max(unloaded(L), unloaded(mean L))``: TT2T is
the time to the second token, ``unloaded`` the profiled unloaded TT2T by length (local probes).
Why the second token: the router streams t1 from the prefill leg the moment it has it, before
any KV crosses a link, so TTFT cannot see the link at all (a prompt offloaded into the dropped
link shows t1 after its prefill, then stalls for the tens of seconds its KV takes); the second
token is the decode node's first, when the KV is usable: the simulator's TTFT (decode start)
and the paper's. A user sees that stall as one (DistServe's goodput counts a TPOT SLO too).
Why 3x: a request may take 3x what it takes on an idle testbed (the simulator's headline SLO,
P90 <= 10 s, is about 3x the fluid P90 too); the floor at the mean length's unloaded TT2T is the
head-of-line wait behind one typical prefill, which any FIFO prefill queue imposes on a short
prompt whatever the link does, so it should not count against the threshold policy. A failed
request misses it. TTFT (t1) is reported beside it.

**Goodput** = requests that met the SLO per second of offered load (the trace's span). At one
offered rate this is the DistServe-style goodput: the rate of requests served within the SLO;
the dynamic/static ratio is what the issue's ``live_dynamic_over_static_goodput`` reports.

**Worst-window P90**: P90 TT2T (and TTFT) over requests arriving in each ``window_s`` window
(10 s steps), the largest; a failed request counts as infinite. P90 is the order statistic at
or above the 90% rank (numpy's ``higher``: no interpolation towards an infinite neighbour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SLO_FACTOR",
    "Outcome",
    "outcome",
    "plot_timeline",
    "series",
    "worst_window_p90",
]

SLO_FACTOR = 3.0
WINDOW_STEP_S = 10.0
SHARE_WINDOW_S = 30.0  # at 0.35 req/s, ~10 requests a window
_GAUGES = {  # series name -> the router's gauge (telemetry/metrics.py)
    "threshold_tokens": "prfaas_threshold_tokens",  # the live t
    "threshold_opt_tokens": "prfaas_threshold_opt_tokens",  # the anchor t_opt
    "threshold_min_tokens": "prfaas_threshold_min_tokens",  # the floor t_min (live link)
}


@dataclass(frozen=True)
class Outcome:
    """One mode's figures (live or simulated)."""

    num_requests: int
    num_ok: int
    num_slo_met: int
    goodput_rps: float
    worst_window_p90_tt2t_s: float
    worst_window_start_s: float  # of the worst TT2T window
    p90_tt2t_s: float
    worst_window_p90_ttft_s: float | None  # None: not measured (the simulator has no t1)
    p90_ttft_s: float | None
    offload_share: float | None

    def as_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else
                    round(v, 4) if isinstance(v, float) else v)
                for k, v in self.__dict__.items()}  # fmt: skip


def worst_window_p90(
    arrivals_s: np.ndarray, ttft_s: np.ndarray, window_s: float, span_s: float
) -> tuple[float, float]:
    """(largest P90 TTFT over ``window_s`` arrival windows, that window's start)."""
    worst, where = -math.inf, 0.0
    for start in np.arange(0.0, max(span_s - window_s, 0.0) + 1e-9, WINDOW_STEP_S):
        inside = ttft_s[(arrivals_s >= start) & (arrivals_s < start + window_s)]
        if inside.size:
            p90 = float(np.percentile(inside, 90, method="higher"))  # no inf - inf
            if p90 > worst:
                worst, where = p90, float(start)
    return worst, where


def _seconds(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([math.inf if t is None or math.isnan(t) else t for t in values])


def _p90(values: np.ndarray) -> float:
    return float(np.percentile(values, 90, method="higher")) if len(values) else math.nan


def outcome(
    arrivals_s: Sequence[float],
    tt2t_s: Sequence[float | None],
    slo_s: Sequence[float] | np.ndarray,
    *,
    window_s: float,
    span_s: float,
    ttft_s: Sequence[float | None] | None = None,
    is_remote: Sequence[bool] | None = None,
) -> Outcome:
    """Figures for one mode: the SLO on ``tt2t_s``; ``ttft_s`` reported beside it when given.
    None (or NaN) for a failed request."""
    arrivals = np.asarray(arrivals_s, dtype=np.float64)
    tt2t = _seconds(tt2t_s)
    met = tt2t <= np.asarray(slo_s, dtype=np.float64)
    worst, where = worst_window_p90(arrivals, tt2t, window_s, span_s)
    ttft = None if ttft_s is None else _seconds(ttft_s)
    share = None if is_remote is None else float(np.mean(np.asarray(is_remote, dtype=bool)))
    return Outcome(
        num_requests=len(arrivals),
        num_ok=int(np.isfinite(tt2t).sum()),
        num_slo_met=int(met.sum()),
        goodput_rps=float(met.sum()) / span_s,
        worst_window_p90_tt2t_s=worst,
        worst_window_start_s=where,
        p90_tt2t_s=_p90(tt2t),
        worst_window_p90_ttft_s=None
        if ttft is None
        else worst_window_p90(arrivals, ttft, window_s, span_s)[0],
        p90_ttft_s=None if ttft is None else _p90(ttft),
        offload_share=share,
    )


def series(samples: Sequence[Any]) -> dict[str, list[float]]:
    """Per-second series from the scrapes: time, the thresholds (t, t_opt, t_min; NaN where the
    router has no such gauge), offload share (over the last ``SHARE_WINDOW_S``, from the routed
    counters), the link estimate the router uses, the tc rate in force and the WAN egress
    measured from tc's byte counter (Mbit/s)."""
    names = ("time_s", *_GAUGES, "offload_share", "link_estimate_mbps", "wan_rate_mbps",
             "wan_egress_mbps")  # fmt: skip
    out: dict[str, list[float]] = {k: [] for k in names}
    lag = max(int(SHARE_WINDOW_S), 1)
    for i, s in enumerate(samples):
        out["time_s"].append(round(s.time_s, 2))
        for key, gauge in _GAUGES.items():
            out[key].append(round(s.gauges.get(gauge, math.nan), 1))
        old = samples[max(i - lag, 0)]
        routed = s.num_routed - old.num_routed
        share = (s.num_remote - old.num_remote) / routed if routed > 0 else math.nan
        out["offload_share"].append(round(share, 3))
        link = s.gauges.get("prfaas_link_estimate_gbps", math.nan) * 1e3
        out["link_estimate_mbps"].append(round(link, 2))
        out["wan_rate_mbps"].append(round(s.wan_rate_bps / 1e6, 2))
        prev = samples[max(i - 1, 0)]
        dt = s.time_s - prev.time_s
        egress = (s.wan_bytes - prev.wan_bytes) * 8 / 1e6 / dt if dt > 0 else 0.0
        out["wan_egress_mbps"].append(round(egress, 2))
    return out


def plot_timeline(
    path: Path,
    runs: dict[str, dict[str, Any]],
    drop: tuple[float, float],
    title: str,
) -> Path:
    """Four panels against time, one line per mode: the WAN (tc rate and measured egress), the
    threshold, the offload share and each request's time to the second token (by arrival;
    x: failed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    colours = {"static": "tab:red", "dynamic": "tab:blue"}
    for mode, run in runs.items():
        s, c = run["series"], colours.get(mode, "tab:gray")
        axes[0].plot(s["time_s"], s["wan_egress_mbps"], color=c, alpha=0.6,
                     label=f"{mode}: WAN egress (tc bytes)")  # fmt: skip
        axes[0].step(s["time_s"], s["wan_rate_mbps"], color=c, linestyle=":", where="post",
                     label=f"{mode}: tc rate")  # fmt: skip
        axes[1].step(s["time_s"], s["threshold_tokens"], color=c, where="post", label=f"{mode}: t")
        if mode == "dynamic":
            axes[1].step(s["time_s"], s["threshold_min_tokens"], color=c, where="post",
                         linestyle=":", label="dynamic: t_min (live link)")  # fmt: skip
            axes[0].plot(s["time_s"], s["link_estimate_mbps"], color=c, linestyle="--",
                         label="dynamic: router's link estimate")  # fmt: skip
        axes[2].plot(s["time_s"], s["offload_share"], color=c, label=mode)
        ok = [(a, t) for a, t in zip(run["arrival_s"], run["tt2t_s"], strict=True) if t is not None]
        bad = [a for a, t in zip(run["arrival_s"], run["tt2t_s"], strict=True) if t is None]
        if ok:
            axes[3].scatter(*zip(*ok, strict=True), s=10, color=c, alpha=0.7, label=mode)
        if bad:
            axes[3].scatter(bad, [0.0] * len(bad), marker="x", color=c)
    labels = ("WAN Mbit/s", "threshold t (tokens)", f"offload share ({SHARE_WINDOW_S:g} s)",
              "time to 2nd token (s) by arrival")  # fmt: skip
    for ax, label in zip(axes, labels, strict=True):
        ax.axvspan(*drop, color="0.85", zorder=0)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_yscale("log")  # the 10x drop, and a link estimate far off the tc rate
    axes[3].set_yscale("log")
    axes[-1].set_xlabel("seconds since the run started (grey: the WAN at 10%)")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
