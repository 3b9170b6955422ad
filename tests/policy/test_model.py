"""Eqs 3-6 on a hand-computed case (see builders: toy_system, two_bin_workload).

At t = 2000: p = 0.5, l_long = 3000, l_short = 1000.
Eq 3: compute 2 / (0.1 + 0.3) = 5; link 100 Gbps / (3000 * 1e6 * 8 / 1e9 = 24 Gb) = 4.1667.
Eq 4: 3 / (0.5 + 0.5) = 3.   Eq 5: 2 * 10 / (0.05 * 100) = 4.
Eq 6: min(4.1667 / 0.5, 3 / 0.5, 4) = 4.   Egress at 4 req/s: 4 * 0.5 * 24 = 48 Gbps.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.policy.builders import toy_system, two_bin_workload
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.model import (
    Deployment,
    Workload,
    evaluate,
    kv_throughput_gbps,
    max_arrival_rate,
    ttft_stats,
)


def test_equations_on_hand_computed_case() -> None:
    e = evaluate(toy_system(), two_bin_workload(), Deployment(2, 3, 2), 2000.0)
    assert e.offload_share == pytest.approx(0.5)
    assert (e.long_tokens, e.short_tokens) == pytest.approx((3000.0, 1000.0))
    assert e.theta_prfaas == pytest.approx(100 / 24)
    assert e.theta_pd_p == pytest.approx(3.0)
    assert e.theta_pd_d == pytest.approx(4.0)
    assert e.lambda_max == pytest.approx(4.0)
    assert e.egress_gbps == pytest.approx(48.0)


def test_compute_bound_prfaas_when_link_is_wide() -> None:
    e = evaluate(toy_system(link_gbps=1000.0), two_bin_workload(), Deployment(2, 3, 2), 2000.0)
    assert e.theta_prfaas == pytest.approx(5.0)


def test_extreme_thresholds_are_the_baselines() -> None:
    system, workload = toy_system(), two_bin_workload()
    homogeneous = evaluate(system, workload, Deployment(0, 3, 2), 4000.0)
    assert homogeneous.offload_share == 0.0 and homogeneous.egress_gbps == 0.0
    assert homogeneous.lambda_max == pytest.approx(min(3 / (0.5 + 5e-4 * 2000), 4.0))
    naive = evaluate(system, workload, Deployment(2, 0, 2), 0.0)
    assert naive.offload_share == 1.0
    assert naive.lambda_max == pytest.approx(min(2 / (0.1 + 0.2), 100 / 16, 4.0))


def test_eq6_ignores_a_stage_without_traffic_and_zero_capacity_blocks() -> None:
    lam = max_arrival_rate(
        np.asarray([0.0, 1.0, 0.0]), np.asarray([2.0, 0.0, 0.0]), 9.0, np.asarray([0.0, 1.0, 0.5])
    )
    assert lam.tolist() == [2.0, 1.0, 0.0]


def test_ttft_mean_and_p90_hand_computed() -> None:
    # long (2000, 4000] on fast: TTFT uniform on (0.3, 0.5]; short on slow: uniform on (0.5, 1.5].
    stats = ttft_stats(toy_system(), two_bin_workload(), 2000.0)
    assert stats.mean_s == pytest.approx(0.5 * 0.4 + 0.5 * 1.0)
    assert stats.quantile_s == pytest.approx(1.3, abs=1e-5)


def test_kv_throughput_is_size_over_latency() -> None:
    system = toy_system()
    assert kv_throughput_gbps(system.prfaas, 1000.0) == pytest.approx(8.0 / 0.2)


def test_invalid_inputs_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        Deployment(-1, 0, 0)
    with pytest.raises(ConfigError):
        Workload(two_bin_workload().lengths, 0)
    with pytest.raises(ConfigError):
        toy_system(link_gbps=0.0)
