"""PNG figures (matplotlib, Agg backend): Fig. 5 of the paper and the simulator's results.

matplotlib is imported inside each function so that ``prfaas simulate`` without plots, and the
rest of the package, never need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trtllm_prfaas.policy.model import Deployment, Workload, stage_rates
from trtllm_prfaas.policy.profile import SystemProfile
from trtllm_prfaas.policy.solver import solve_fixed_split
from trtllm_prfaas.sim.des import DesResult

__all__ = ["plot_bounds_vs_t", "plot_split", "plot_timeline", "plot_ttft_cdf"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_split(
    system: SystemProfile, workload: Workload, num_prfaas: int, num_local: int, path: Path
) -> Path:
    """Fig. 5 (left): best ``lambda_max`` against the number of PD-P nodes (``Np + Nd`` fixed)."""
    splits = list(range(1, num_local))
    lams = [
        solve_fixed_split(system, workload, Deployment(num_prfaas, n, num_local - n)).lambda_max
        for n in splits
    ]
    fig, ax = _pyplot().subplots(figsize=(5, 3.5))
    ax.plot(splits, lams, marker="o")
    ax.set_xlabel(f"PD-P nodes N_p (N_p + N_d = {num_local})")
    ax.set_ylabel("Λ_max (req/s)")
    ax.set_title("Throughput vs the P/D split (optimal t per split)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bounds_vs_t(
    system: SystemProfile, workload: Workload, deployment: Deployment, path: Path
) -> Path:
    """Fig. 5 (right): ``theta_prfaas / p`` and ``theta_pd_p / (1 - p)`` against ``t``."""
    ts = np.geomspace(1024.0, workload.lengths.hi * 0.999, 200)
    r = stage_rates(system, workload, deployment, ts)
    with np.errstate(divide="ignore", invalid="ignore"):
        remote, local = r.theta_prfaas / r.offload_share, r.theta_pd_p / (1 - r.offload_share)
    fig, ax = _pyplot().subplots(figsize=(5, 3.5))
    ax.plot(ts / 1024, remote, label="Θ_prfaas / p")
    ax.plot(ts / 1024, local, label="Θ_pd-p / (1 − p)")
    ax.axhline(r.theta_pd_d, color="grey", ls=":", label="Θ_pd-d")
    ax.set_xscale("log")
    ax.set_ylim(0, 3 * float(np.nanmax(r.lambda_max)))
    ax.set_xlabel("threshold t (K tokens)")
    ax.set_ylabel("req/s")
    ax.set_title(f"Bounds vs t ({deployment.num_prfaas}/{deployment.num_p}/{deployment.num_d})")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_ttft_cdf(
    curves: Sequence[tuple[str, np.ndarray[Any, Any]]], path: Path, slo_s: float | None = None
) -> Path:
    """Empirical CDFs of TTFT samples (seconds), one line per ``(label, samples)``."""
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.5))
    for label, samples in curves:
        x = np.sort(samples)
        ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=label)
    if slo_s is not None:
        ax.axvline(slo_s, color="grey", ls=":", label=f"SLO {slo_s:g} s")
    ax.axhline(0.9, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, incl. queueing and KV transfer)")
    ax.set_ylabel("CDF")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_timeline(results: Sequence[tuple[str, DesResult]], path: Path) -> Path:
    """Threshold and link rate over time for each run (control-tick resolution)."""
    fig, (top, bottom) = _pyplot().subplots(2, 1, figsize=(6, 4.5), sharex=True)
    for label, res in results:
        top.plot(res.timeline.time_s, res.timeline.threshold_tokens / 1024, label=label)
    top.set_ylabel("t (K tokens)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    first = results[0][1].timeline
    bottom.plot(first.time_s, first.link_gbps, color="black")
    bottom.set_ylabel("link (Gbps)")
    bottom.set_xlabel("time (s)")
    bottom.grid(alpha=0.3)
    return _save(fig, path)
