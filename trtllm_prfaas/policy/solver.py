"""The 2-D solver over (t, Np/Nd) and the two baselines of the paper's case study.

For a fixed PrfaaS size and a fixed local size ``Np + Nd``, :func:`solve` returns the operating
point that maximises ``lambda_max`` (Eq 6):

1. every split ``Np = 0 .. Np+Nd`` is scored on a log-spaced grid of thresholds, vectorised
   (the threshold terms do not depend on Np, so they are computed once);
2. for the splits within 2% of the best grid score, ``t`` is refined by bisection on Eq 7,
   ``theta_prfaas / p = theta_pd_p / (1 - p)``, between the grid points that bracket it;
3. the best refined point wins; ties go to the split closest to Eq 8
   (``theta_prfaas + theta_pd_p = theta_pd_d``).

Cost: one vectorised pass over the grid plus ~40 scalar model evaluations per refined split;
well under 50 ms on a 64-bin histogram (``bench/solver.py`` measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.model import (
    Deployment,
    ThroughputEstimate,
    Workload,
    evaluate,
    pd_decode_rate,
    pd_prefill_rate,
    prfaas_rate,
)
from trtllm_prfaas.policy.profile import FloatArray, SystemProfile
from trtllm_prfaas.policy.workload import conditional_means

__all__ = [
    "SolverOptions",
    "max_local_threshold",
    "min_remote_threshold",
    "naive_heterogeneous",
    "solve",
    "solve_fixed_split",
    "solve_homogeneous",
    "solve_threshold",
]

_REFINE_WITHIN = 0.98  # refine every split whose grid score is within 2% of the best


@dataclass(frozen=True)
class SolverOptions:
    """``grid_size`` thresholds (log-spaced over the support) and the bisection tolerance."""

    grid_size: int = 256
    tol_tokens: float = 1.0
    max_iterations: int = 60

    def __post_init__(self) -> None:
        if self.grid_size < 3 or self.tol_tokens <= 0 or self.max_iterations < 1:
            raise ConfigError("SolverOptions needs grid_size >= 3, tol_tokens > 0, iterations >= 1")


def _grid(workload: Workload, size: int) -> FloatArray:
    lo, hi = workload.lengths.lo, workload.lengths.hi
    return np.asarray(np.geomspace(max(lo, 1.0), hi, size), dtype=np.float64)


def _balance_gap(
    system: SystemProfile, workload: Workload, deployment: Deployment, t: float
) -> float:
    """Eq 7 residual ``theta_prfaas / p - theta_pd_p / (1 - p)`` (increasing in ``t``)."""
    p, l_long, l_short = conditional_means(workload.lengths, np.asarray([t]))
    remote = float(prfaas_rate(system, deployment.num_prfaas, l_long)[0])
    local = float(pd_prefill_rate(system, deployment.num_p, l_short)[0])
    pv = float(p[0])
    a = remote / pv if pv > 0 else math.inf
    b = local / (1 - pv) if pv < 1 else math.inf
    return a - b


def solve_threshold(
    system: SystemProfile,
    workload: Workload,
    deployment: Deployment,
    bracket: tuple[float, float],
    options: SolverOptions = SolverOptions(),
) -> float:
    """Bisection on Eq 7 inside ``bracket`` (tokens), whose ends have opposite residual signs.

    Returns the threshold where the PrfaaS and PD-P bounds meet (to ``options.tol_tokens``)."""
    lo, hi = bracket
    for _ in range(options.max_iterations):
        if hi - lo <= options.tol_tokens:
            break
        mid = (lo + hi) / 2
        if _balance_gap(system, workload, deployment, mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _grid_scores(
    system: SystemProfile, workload: Workload, num_prfaas: int, num_local: int, ts: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """``(lambda[np_index, t_index], eq7_gap[np_index, t_index])`` for every split."""
    p, l_long, l_short = conditional_means(workload.lengths, ts)
    with np.errstate(divide="ignore", invalid="ignore"):
        remote = np.where(p > 0, prfaas_rate(system, num_prfaas, l_long) / p, math.inf)
        per_p = np.where(p < 1, pd_prefill_rate(system, 1, l_short) / (1 - p), math.inf)
    splits = np.arange(num_local + 1, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore"):  # 0 * inf where no PD-P node and nothing stays local
        local = np.where(per_p[None, :] == math.inf, math.inf, splits * per_p[None, :])
    decode = np.asarray(
        [pd_decode_rate(system, num_local - int(n), workload.output_tokens) for n in splits[:, 0]]
    )
    lam = np.minimum(np.minimum(remote[None, :], local), decode[:, None])
    with np.errstate(invalid="ignore"):
        gap = remote[None, :] - local
    return np.asarray(lam, dtype=np.float64), np.asarray(gap, dtype=np.float64)


def _refine(
    system: SystemProfile,
    workload: Workload,
    deployment: Deployment,
    ts: FloatArray,
    gap: FloatArray,
    grid_best: int,
    options: SolverOptions,
) -> ThroughputEstimate:
    """Best of the grid point and the Eq 7 crossing nearest to it, if one exists."""
    best = evaluate(system, workload, deployment, float(ts[grid_best]))
    signs = np.nonzero((gap[:-1] < 0) & (gap[1:] >= 0))[0]
    if len(signs) == 0:
        return best
    k = int(signs[np.argmin(np.abs(signs - grid_best))])
    t = solve_threshold(system, workload, deployment, (float(ts[k]), float(ts[k + 1])), options)
    crossing = evaluate(system, workload, deployment, t)
    return crossing if crossing.lambda_max >= best.lambda_max * (1 - 1e-12) else best


def _eq8_gap(e: ThroughputEstimate) -> float:
    return abs(e.theta_prfaas + e.theta_pd_p - e.theta_pd_d)


def solve(
    system: SystemProfile,
    workload: Workload,
    num_prfaas: int,
    num_local: int,
    options: SolverOptions = SolverOptions(),
) -> ThroughputEstimate:
    """Maximise ``lambda_max`` over the threshold and the split ``Np + Nd = num_local``."""
    if num_prfaas < 0 or num_local < 1:
        raise ConfigError("solve needs num_prfaas >= 0 and num_local >= 1")
    ts = _grid(workload, options.grid_size)
    lam, gap = _grid_scores(system, workload, num_prfaas, num_local, ts)
    row_best = lam.max(axis=1)
    candidates = np.nonzero(row_best >= row_best.max() * _REFINE_WITHIN)[0]
    results = []
    for n_p in candidates:
        dep = Deployment(num_prfaas, int(n_p), num_local - int(n_p))
        j = int(np.argmax(lam[n_p]))
        results.append(_refine(system, workload, dep, ts, gap[n_p], j, options))
    top = max(r.lambda_max for r in results)
    return min((r for r in results if r.lambda_max >= top * (1 - 1e-9)), key=_eq8_gap)


def solve_fixed_split(
    system: SystemProfile,
    workload: Workload,
    deployment: Deployment,
    options: SolverOptions = SolverOptions(),
) -> ThroughputEstimate:
    """Best threshold for a fixed split (after a role conversion, or on a changed link):
    the grid maximum of ``lambda_max``, refined by bisection on Eq 7 near it."""
    ts = _grid(workload, options.grid_size)
    p, l_long, l_short = conditional_means(workload.lengths, ts)
    with np.errstate(divide="ignore", invalid="ignore"):
        remote = np.where(p > 0, prfaas_rate(system, deployment.num_prfaas, l_long) / p, math.inf)
        local = np.where(p < 1, pd_prefill_rate(system, deployment.num_p, l_short) / (1 - p),
                         math.inf)  # fmt: skip
    decode = pd_decode_rate(system, deployment.num_d, workload.output_tokens)
    lam_row = np.minimum(np.minimum(remote, local), decode)
    j = int(np.argmax(lam_row))
    return _refine(system, workload, deployment, ts, remote - local, j, options)


def max_local_threshold(
    system: SystemProfile,
    workload: Workload,
    deployment: Deployment,
    arrival_rate_per_s: float,
    max_utilisation: float,
    options: SolverOptions = SolverOptions(),
) -> float:
    """The largest ``t`` at which the PD-P stage stays at or below ``max_utilisation`` for the
    measured arrival rate: ``rate * (1 - p(t)) / theta_pd_p(t) <= max_utilisation`` (Eq 4).

    The short-timescale controller raises ``t`` to relieve the link; this is the ceiling that
    keeps it from pushing the local prefill stage into overload. Returns the support's lower end
    when even ``t = lo`` overloads it (or there is no PD-P node) and ``hi`` when nothing does.
    """
    ts = _grid(workload, options.grid_size)
    if deployment.num_p == 0:
        return float(ts[0])
    p, _, l_short = conditional_means(workload.lengths, ts)
    load = arrival_rate_per_s * (1 - p) / pd_prefill_rate(system, deployment.num_p, l_short)
    ok = np.nonzero(load <= max_utilisation)[0]
    return float(ts[ok[-1]]) if len(ok) else float(ts[0])


def min_remote_threshold(
    system: SystemProfile,
    workload: Workload,
    deployment: Deployment,
    arrival_rate_per_s: float,
    max_utilisation: float,
    options: SolverOptions = SolverOptions(),
) -> float:
    """The smallest ``t`` at which the PrfaaS stage (compute and link, Eq 3 at
    ``system.link_gbps``) stays at or below ``max_utilisation``:
    ``rate * p(t) / theta_prfaas(t) <= max_utilisation``. The floor for a controller that
    offloads more when PD-P is backlogged. Returns ``hi`` when no ``t`` qualifies."""
    ts = _grid(workload, options.grid_size)
    if deployment.num_prfaas == 0:
        return float(ts[-1])
    p, l_long, _ = conditional_means(workload.lengths, ts)
    load = arrival_rate_per_s * p / prfaas_rate(system, deployment.num_prfaas, l_long)
    ok = np.nonzero(load <= max_utilisation)[0]
    return float(ts[ok[0]]) if len(ok) else float(ts[-1])


def solve_homogeneous(
    system: SystemProfile, workload: Workload, num_instances: int
) -> ThroughputEstimate:
    """Homogeneous PD baseline: only local instances, nothing offloaded, best ``Np/Nd``."""
    t = workload.lengths.hi
    splits = [Deployment(0, n, num_instances - n) for n in range(num_instances + 1)]
    return max((evaluate(system, workload, d, t) for d in splits), key=lambda e: e.lambda_max)


def naive_heterogeneous(
    system: SystemProfile, workload: Workload, num_prfaas: int, num_d: int
) -> ThroughputEstimate:
    """Naive heterogeneous baseline: PrfaaS prefills every request, PD nodes only decode."""
    return evaluate(system, workload, Deployment(num_prfaas, 0, num_d), workload.lengths.lo)
