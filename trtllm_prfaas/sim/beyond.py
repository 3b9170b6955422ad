"""Going past the paper in the discrete-event simulator: dynamic vs static ``t``, and scale.

``dynamic_over_static_goodput``: goodput is the largest mean arrival rate (req/s) at which the
P90 TTFT over the whole run stays within the SLO (the DistServe-style definition); the ratio is
the dynamic policy's goodput over the static optimal ``t``'s, on the same traces (common random
numbers: the same seeds at every rate for both policies).

Scenario (:class:`BeyondScenario`; values and reasons in docs/simulation.md): the case-study
hardware (4 PrfaaS + 3 PD-P + 5 PD-D, Table 6's split), MMPP-2 bursty arrivals, and a link
that runs at ``link_gbps`` except for ``drop_s`` seconds at ``drop_fraction`` of it.

``scale_1m_requests_s``: wall seconds to simulate 1M requests on a 10,000-GPU deployment
(1,250 8-GPU instances: the case-study mix scaled up ~104x), with the dynamic controller on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from trtllm_prfaas.policy.model import Deployment
from trtllm_prfaas.policy.solver import solve
from trtllm_prfaas.sim.des import DesConfig, DesResult, ThresholdMode, simulate
from trtllm_prfaas.sim.fluid import case_study_system, case_study_workload
from trtllm_prfaas.sim.link import LinkSchedule, link_drop
from trtllm_prfaas.sim.traffic import OnOffArrivals, PoissonArrivals, make_trace

__all__ = [
    "BeyondScenario",
    "GoodputResult",
    "goodput",
    "p90_ttft_s",
    "run_scale",
    "scenario_config",
]


@dataclass(frozen=True)
class BeyondScenario:
    """Everything the dynamic-vs-static comparison depends on."""

    slo_p90_s: float = 10.0
    duration_s: float = 600.0
    link_gbps: float = 100.0
    drop_at_s: float = 240.0
    drop_s: float = 60.0
    drop_fraction: float = 0.1
    peak_to_mean: float = 2.0
    on_fraction: float = 0.3
    mean_on_s: float = 20.0
    seeds: tuple[int, ...] = (0, 1, 2)
    rate_lo: float = 0.2
    rate_hi: float = 3.4
    rate_tol: float = 0.02
    offload_below_opt: bool = True


@dataclass(frozen=True)
class GoodputResult:
    """Goodput (req/s) of each policy and their ratio, with the scenario used."""

    static_rate: float
    dynamic_rate: float
    ratio: float
    static_t: float
    scenario: BeyondScenario


def p90_ttft_s(results: list[DesResult]) -> float:
    """P90 of TTFT pooled over runs."""
    return float(np.percentile(np.concatenate([r.ttft_s for r in results]), 90))


def scenario_config(sc: BeyondScenario, mode: ThresholdMode) -> DesConfig:
    """The case-study deployment at its solved optimum under the scenario's link."""
    system, workload = case_study_system(), case_study_workload()
    best = solve(system, workload, 4, 8)
    system = replace(system, link_gbps=sc.link_gbps)
    link = link_drop(sc.link_gbps, sc.drop_at_s, sc.drop_s, sc.drop_fraction)
    return DesConfig(
        system,
        workload,
        best.deployment,
        link,
        best.threshold_tokens,
        mode,
        offload_below_opt=sc.offload_below_opt,
    )


def _p90_at(sc: BeyondScenario, config: DesConfig, rate: float) -> float:
    arrivals = OnOffArrivals(rate, sc.peak_to_mean, sc.on_fraction, sc.mean_on_s)
    n = max(int(rate * sc.duration_s), 10)
    lengths = config.workload.lengths
    return p90_ttft_s([simulate(config, make_trace(arrivals, lengths, n, s)) for s in sc.seeds])


def goodput_rate(sc: BeyondScenario, config: DesConfig) -> float:
    """Largest rate in ``[rate_lo, rate_hi]`` (to ``rate_tol``) with P90 TTFT <= SLO, by
    bisection (P90 grows with the rate on common random numbers); 0 if even ``rate_lo`` fails."""
    lo, hi = sc.rate_lo, sc.rate_hi
    if _p90_at(sc, config, lo) > sc.slo_p90_s:
        return 0.0
    if _p90_at(sc, config, hi) <= sc.slo_p90_s:
        return hi
    while hi - lo > sc.rate_tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _p90_at(sc, config, mid) <= sc.slo_p90_s else (lo, mid)
    return lo


def goodput(sc: BeyondScenario = BeyondScenario()) -> GoodputResult:
    """Goodput of the static optimal ``t`` and of the dynamic controller, and the ratio."""
    static_cfg = scenario_config(sc, ThresholdMode.STATIC)
    static = goodput_rate(sc, static_cfg)
    dynamic = goodput_rate(sc, scenario_config(sc, ThresholdMode.DYNAMIC))
    ratio = dynamic / static if static > 0 else float("inf")
    return GoodputResult(static, dynamic, ratio, static_cfg.threshold_tokens, sc)


def scale_config(num_gpus: int = 10_000, gpus_per_instance: int = 8) -> DesConfig:
    """The case-study mix (4 : 3 : 5 of 12) scaled to ``num_gpus``; link scaled alike."""
    num = num_gpus // gpus_per_instance
    n_prfaas, n_p = round(num * 4 / 12), round(num * 3 / 12)
    dep = Deployment(n_prfaas, n_p, num - n_prfaas - n_p)
    system, workload = case_study_system(), case_study_workload()
    link_gbps = 100.0 * n_prfaas / 4
    system = replace(system, link_gbps=link_gbps)
    t = solve(case_study_system(), workload, 4, 8).threshold_tokens
    link = LinkSchedule.constant(link_gbps)
    return DesConfig(system, workload, dep, link, t, ThresholdMode.DYNAMIC)


def run_scale(num_requests: int = 1_000_000, num_gpus: int = 10_000) -> tuple[float, DesResult]:
    """Wall seconds (trace generation + simulation) and the result; Poisson arrivals at 80%
    of the scaled deployment's ``lambda_max``."""
    started = time.perf_counter()
    config = scale_config(num_gpus)
    scale = (config.deployment.num_prfaas + config.deployment.num_p + config.deployment.num_d) / 12
    rate = 0.8 * 3.2 * scale
    trace = make_trace(PoissonArrivals(rate), config.workload.lengths, num_requests, seed=7)
    result = simulate(config, trace)
    return time.perf_counter() - started, result
