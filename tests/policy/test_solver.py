from __future__ import annotations

import time

import numpy as np
import pytest

from tests.policy.builders import toy_system, two_bin_workload
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.model import Deployment, Workload, evaluate, stage_rates
from trtllm_prfaas.policy.profile import SystemProfile
from trtllm_prfaas.policy.solver import naive_heterogeneous, solve, solve_homogeneous
from trtllm_prfaas.policy.workload import HistogramLengths
from trtllm_prfaas.sim.fluid import case_study_system, case_study_workload


def _brute_force(system: SystemProfile, workload: Workload, num_prfaas: int, num_local: int):
    ts = np.linspace(workload.lengths.lo, workload.lengths.hi, 20001)
    best = (-1.0, None, None)
    for n_p in range(num_local + 1):
        dep = Deployment(num_prfaas, n_p, num_local - n_p)
        lam = stage_rates(system, workload, dep, ts).lambda_max
        j = int(np.argmax(lam))
        if lam[j] > best[0]:
            best = (float(lam[j]), n_p, float(ts[j]))
    return best


def _live_histogram(seed: int = 7) -> Workload:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(9.9, 1.0, 20_000))
    hist = HistogramLengths.from_samples(lengths, lo=128, hi=131072, num_bins=64)
    return Workload(hist, output_tokens=1024)


@pytest.mark.parametrize("workload_kind", ["parametric", "histogram"])
def test_solver_agrees_with_brute_force(workload_kind: str) -> None:
    system = case_study_system()
    workload = case_study_workload() if workload_kind == "parametric" else _live_histogram()
    ours = solve(system, workload, 4, 8)
    lam, n_p, _t = _brute_force(system, workload, 4, 8)
    assert ours.deployment.num_p == n_p
    assert ours.lambda_max >= lam * (1 - 1e-6)
    assert ours.lambda_max <= lam * (1 + 1e-3)


@pytest.mark.parametrize(("num_prfaas", "num_local"), [(1, 4), (2, 6), (6, 6), (0, 5)])
def test_solver_agrees_with_brute_force_on_other_sizes(num_prfaas: int, num_local: int) -> None:
    system, workload = case_study_system(), _live_histogram(seed=num_local)
    ours = solve(system, workload, num_prfaas, num_local)
    lam, _n_p, _t = _brute_force(system, workload, num_prfaas, num_local)
    assert ours.lambda_max == pytest.approx(lam, rel=1e-3)


def test_solved_threshold_balances_eq7() -> None:
    e = solve(case_study_system(), case_study_workload(), 4, 8)
    p = e.offload_share
    assert e.theta_prfaas / p == pytest.approx(e.theta_pd_p / (1 - p), rel=1e-3)


def test_toy_solver_matches_hand_reasoning() -> None:
    # Link-bound PrfaaS: best is the split whose decode cap is not binding first.
    e = solve(toy_system(), two_bin_workload(), 2, 5)
    lam, n_p, _t = _brute_force(toy_system(), two_bin_workload(), 2, 5)
    assert e.deployment.num_p == n_p and e.lambda_max == pytest.approx(lam, rel=1e-3)


def test_baselines() -> None:
    system, workload = toy_system(), two_bin_workload()
    homog = solve_homogeneous(system, workload, 5)
    best = max(
        evaluate(system, workload, Deployment(0, n, 5 - n), 4000.0).lambda_max for n in range(6)
    )
    assert homog.lambda_max == pytest.approx(best)
    naive = naive_heterogeneous(system, workload, 2, 3)
    assert naive.offload_share == 1.0 and naive.deployment == Deployment(2, 0, 3)


def test_solver_is_fast_on_a_live_histogram() -> None:
    system, workload = case_study_system(), _live_histogram()
    solve(system, workload, 4, 8)
    start = time.perf_counter()
    for _ in range(5):
        solve(system, workload, 4, 8)
    assert (time.perf_counter() - start) / 5 < 0.5


def test_solver_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError):
        solve(toy_system(), two_bin_workload(), 1, 0)
