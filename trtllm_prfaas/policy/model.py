"""The throughput model of the paper's section 3.4 (Eqs 3 to 6) and the TTFT it implies.

A request whose uncached length ``l`` exceeds the threshold ``t`` is prefilled on the PrfaaS
cluster and its KV crosses the link; otherwise a local PD-P node prefills it. Every request
decodes on a PD-D node. With ``p = P(L > t)``, ``l_long = E[L | L > t]``,
``l_short = E[L | L <= t]``:

- Eq 3  ``theta_prfaas = min(N_prfaas / T_prfaas(l_long), B_out / S_kv(l_long))``
- Eq 4  ``theta_pd_p   = N_p / T_pd(l_short)``
- Eq 5  ``theta_pd_d   = N_d * BS_max / (T_decode * L_out)``
- Eq 6  ``lambda_max   = min(theta_prfaas / p, theta_pd_p / (1 - p), theta_pd_d)``

Prefill times are evaluated at the conditional mean length (as the paper does); TTFT is prefill
latency on the hardware that ran the request, with no queueing, averaged (or its quantile taken)
over the length distribution. Rates are in requests per second. Functions take arrays of
thresholds where the solver needs them vectorised; everything here is pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.profile import (
    BITS_PER_BYTE,
    ClusterProfile,
    FloatArray,
    LatencyCurve,
    PiecewiseLatency,
    SystemProfile,
)
from trtllm_prfaas.policy.workload import (
    LengthDistribution,
    conditional_means,
    curve_mixture_quantile,
)

__all__ = [
    "Deployment",
    "StageRates",
    "ThroughputEstimate",
    "TtftStats",
    "Workload",
    "evaluate",
    "kv_throughput_gbps",
    "max_arrival_rate",
    "pd_decode_rate",
    "pd_prefill_rate",
    "prfaas_rate",
    "stage_rates",
    "ttft_stats",
]


@dataclass(frozen=True)
class Deployment:
    """Instance counts: PrfaaS prefill, local PD-P prefill, local PD-D decode."""

    num_prfaas: int
    num_p: int
    num_d: int

    def __post_init__(self) -> None:
        if min(self.num_prfaas, self.num_p, self.num_d) < 0:
            raise ConfigError("Deployment counts must be >= 0")


@dataclass(frozen=True)
class Workload:
    """Input lengths (uncached tokens) and the fixed output length L_out (tokens)."""

    lengths: LengthDistribution
    output_tokens: int

    def __post_init__(self) -> None:
        if self.output_tokens <= 0:
            raise ConfigError("output_tokens must be > 0")


@dataclass(frozen=True)
class StageRates:
    """Eqs 3-6 evaluated over an array of thresholds (all arrays share one shape)."""

    thresholds: FloatArray
    offload_share: FloatArray  # p
    long_tokens: FloatArray  # l_long
    short_tokens: FloatArray  # l_short
    theta_prfaas: FloatArray
    theta_pd_p: FloatArray
    theta_pd_d: float
    lambda_max: FloatArray


@dataclass(frozen=True)
class ThroughputEstimate:
    """The model at one operating point. ``egress_gbps`` is the PrfaaS link load at
    ``lambda_max``: ``lambda_max * p * S_kv(l_long)`` (exact, since S_kv is linear)."""

    threshold_tokens: float
    deployment: Deployment
    offload_share: float
    long_tokens: float
    short_tokens: float
    theta_prfaas: float
    theta_pd_p: float
    theta_pd_d: float
    lambda_max: float
    egress_gbps: float


@dataclass(frozen=True)
class TtftStats:
    """Mean and one quantile (default P90) of TTFT in seconds, without queueing."""

    mean_s: float
    quantile_s: float
    quantile: float


def _at(curve: LatencyCurve, tokens: FloatArray) -> FloatArray:
    return curve.seconds(np.asarray(tokens, dtype=np.float64))


def prfaas_rate(system: SystemProfile, num_prfaas: int, long_tokens: FloatArray) -> FloatArray:
    """Eq 3: PrfaaS throughput, the smaller of its compute and its link bound (req/s)."""
    compute = num_prfaas / _at(system.prfaas.prefill, long_tokens)
    kv = system.prfaas.kv
    kv_gb = (kv.fixed_bytes + kv.per_token_bytes * np.asarray(long_tokens)) * BITS_PER_BYTE / 1e9
    return np.asarray(np.minimum(compute, system.link_gbps / kv_gb), dtype=np.float64)


def pd_prefill_rate(system: SystemProfile, num_p: int, short_tokens: FloatArray) -> FloatArray:
    """Eq 4: local PD-P throughput (req/s)."""
    return np.asarray(num_p / _at(system.pd.prefill, short_tokens), dtype=np.float64)


def pd_decode_rate(system: SystemProfile, num_d: int, output_tokens: int) -> float:
    """Eq 5: local PD-D throughput (req/s): slots over the time one request holds a slot."""
    return num_d * system.pd.decode_slots / (system.pd.decode_step_s * output_tokens)


def max_arrival_rate(
    theta_prfaas: FloatArray, theta_pd_p: FloatArray, theta_pd_d: float, p: FloatArray
) -> FloatArray:
    """Eq 6. A stage that receives no traffic (``p == 0`` or ``p == 1``) does not bound it."""
    with np.errstate(divide="ignore", invalid="ignore"):
        remote = np.where(p > 0, theta_prfaas / p, math.inf)
        local = np.where(p < 1, theta_pd_p / (1 - p), math.inf)
    return np.asarray(np.minimum(np.minimum(remote, local), theta_pd_d), dtype=np.float64)


def stage_rates(
    system: SystemProfile, workload: Workload, deployment: Deployment, thresholds: FloatArray
) -> StageRates:
    """Eqs 3-6 for each threshold in ``thresholds`` (tokens)."""
    t = np.asarray(thresholds, dtype=np.float64)
    p, l_long, l_short = conditional_means(workload.lengths, t)
    th_prfaas = prfaas_rate(system, deployment.num_prfaas, l_long)
    th_pd_p = pd_prefill_rate(system, deployment.num_p, l_short)
    th_pd_d = pd_decode_rate(system, deployment.num_d, workload.output_tokens)
    lam = max_arrival_rate(th_prfaas, th_pd_p, th_pd_d, p)
    return StageRates(t, p, l_long, l_short, th_prfaas, th_pd_p, th_pd_d, lam)


def evaluate(
    system: SystemProfile, workload: Workload, deployment: Deployment, threshold_tokens: float
) -> ThroughputEstimate:
    """The model at one threshold. ``threshold <= lo`` offloads everything (naive
    heterogeneous); ``threshold >= hi`` offloads nothing (homogeneous PD)."""
    r = stage_rates(system, workload, deployment, np.asarray([threshold_tokens]))
    p, l_long, lam = float(r.offload_share[0]), float(r.long_tokens[0]), float(r.lambda_max[0])
    egress = lam * p * system.prfaas.kv.gigabits(l_long) if p > 0 else 0.0
    return ThroughputEstimate(
        threshold_tokens=float(threshold_tokens),
        deployment=deployment,
        offload_share=p,
        long_tokens=l_long,
        short_tokens=float(r.short_tokens[0]),
        theta_prfaas=float(r.theta_prfaas[0]),
        theta_pd_p=float(r.theta_pd_p[0]),
        theta_pd_d=r.theta_pd_d,
        lambda_max=lam,
        egress_gbps=egress,
    )


def _kinks(curve: LatencyCurve) -> tuple[float, ...]:
    return curve.tokens if isinstance(curve, PiecewiseLatency) else ()


def ttft_stats(
    system: SystemProfile, workload: Workload, threshold_tokens: float, quantile: float = 0.9
) -> TtftStats:
    """TTFT over the length distribution: PD prefill latency for ``L <= t``, PrfaaS prefill
    latency for ``L > t``; no queueing and no transfer time (layer-wise streaming hides it)."""
    dist = workload.lengths
    t = min(max(threshold_tokens, dist.lo), dist.hi)
    local, remote = system.pd.prefill, system.prfaas.prefill
    mean = dist.partial_expectation(local.seconds, dist.lo, t, _kinks(local))
    mean += dist.partial_expectation(remote.seconds, t, dist.hi, _kinks(remote))
    pieces = [(dist.lo, t, local), (t, dist.hi, remote)]
    q = curve_mixture_quantile(dist, quantile, pieces)
    return TtftStats(mean_s=mean, quantile_s=q, quantile=quantile)


def kv_throughput_gbps(cluster: ClusterProfile, tokens: float) -> float:
    """Phi_kv(l) = S_kv(l) / T_prefill(l): the KV egress one busy instance produces (Gbps)."""
    return cluster.kv.gigabits(tokens) / float(_at(cluster.prefill, np.asarray([tokens]))[0])
