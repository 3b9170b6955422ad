"""``sim/live_profile.py``: a measured testbed profile fed to the simulator.

Checked: ``S_kv`` is the line through the probes' relayed bytes; the prefill curve goes through
local probes as measured, drops non-monotone noise and takes an offloaded probe net of its
store-and-forward transfer; scaling multiplies every time; the live trace replays exactly (same
arrivals and lengths) and an idle trace's simulated TTFT is the curve's (local) or the curve's
plus ``S_kv / B`` (remote); a drop to 10% of a link the static ``t`` relies on costs it capacity
that a re-solved ``t`` recovers (``drop_bound`` > 1), and a link that is never the bottleneck
gives a bound of 1.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.model import Deployment, Workload
from trtllm_prfaas.policy.solver import solve_fixed_split
from trtllm_prfaas.sim.des import ThresholdMode
from trtllm_prfaas.sim.live_profile import (
    LiveProfile,
    Probe,
    des_config,
    fit_kv,
    fluid_figures,
    prefill_points,
    scaled_lengths,
    simulate_trace,
)

KV_FIXED, KV_PER_TOKEN = 100_000.0, 512.0
MAX_LEN = 32_760


def probe(tokens: int, seconds: float, is_remote: bool = False) -> Probe:
    relayed = KV_FIXED + KV_PER_TOKEN * tokens
    return Probe(num_tokens=tokens, ttft_s=seconds, is_remote=is_remote, relay_bytes=relayed)


def profile(link_gbps: float = 0.02) -> LiveProfile:
    probes = (probe(300, 0.05), probe(1000, 0.2), probe(5000, 1.5), probe(10_000, 4.0),
              probe(20_000, 11.0), probe(32_000, 24.0))  # fmt: skip
    return LiveProfile(probes=probes, link_gbps=link_gbps, drop_link_gbps=link_gbps / 10,
                       decode_step_s=0.015)  # fmt: skip


def test_kv_size_is_the_line_through_the_relayed_bytes() -> None:
    kv = fit_kv(profile().probes)
    assert kv.fixed_bytes == pytest.approx(KV_FIXED, rel=1e-6)
    assert kv.per_token_bytes == pytest.approx(KV_PER_TOKEN, rel=1e-9)
    with pytest.raises(ConfigError, match="two lengths"):
        fit_kv([probe(300, 0.05)])


def test_the_curve_keeps_increasing_points_and_nets_out_a_remote_transfer() -> None:
    kv = fit_kv(profile().probes)
    noisy = [probe(300, 0.05), probe(600, 0.04), probe(1000, 0.2), probe(2000, 0.6)]
    tokens, seconds = prefill_points(noisy, kv, 0.02)
    assert tokens == (300.0, 1000.0, 2000.0) and seconds == (0.05, 0.2, 0.6)
    remote = probe(4000, 5.0, is_remote=True)
    _, with_remote = prefill_points([*noisy, remote], kv, 0.02)
    assert with_remote[-1] == pytest.approx(5.0 - kv.gigabits(4000) / 0.02)
    with pytest.raises(ConfigError, match="fewer than 2"):
        prefill_points([probe(300, 0.05)], kv, 0.02)


def test_unloaded_tt2t_is_the_curve_through_the_second_token_probes() -> None:
    base = profile()  # no probe measured a second token: TTFT plus one decode step
    assert base.unloaded_tt2t_s([5000])[0] == pytest.approx(1.5 + 0.015)
    probes = tuple(replace(p, tt2t_s=p.ttft_s + 0.1) for p in base.probes)
    measured = replace(base, probes=probes)
    assert measured.unloaded_tt2t_s([5000, 20_000]) == pytest.approx([1.6, 11.1])
    assert measured.scaled(2.0).unloaded_tt2t_s([5000])[0] == pytest.approx(3.2)


def test_scaled_multiplies_every_time() -> None:
    base = profile()
    slow = base.scaled(1.5)
    assert [p.ttft_s for p in slow.probes] == pytest.approx([1.5 * p.ttft_s for p in base.probes])
    assert slow.decode_step_s == pytest.approx(1.5 * base.decode_step_s)
    assert slow.kv == base.kv  # bytes do not change with the machine's speed
    with pytest.raises(ConfigError, match="factor"):
        base.scaled(0.0)


def test_an_idle_trace_replays_with_the_curve_and_the_link() -> None:
    p = profile()
    arrivals, lengths = [0.0, 100.0, 200.0], [1000, 20_000, 5000]
    config = des_config(p, max_prompt_tokens=MAX_LEN, output_tokens=8, threshold_tokens=10_000,
                        mode=ThresholdMode.STATIC, drop_at_s=500.0, drop_s=60.0)  # fmt: skip
    result = simulate_trace(config, arrivals, lengths)
    assert result.arrival_s.tolist() == arrivals
    assert result.is_remote.tolist() == [False, True, False]
    local = p.unloaded_ttft_s(lengths)
    want = local + np.array([0.0, p.kv.gigabits(20_000) / p.link_gbps, 0.0])
    assert result.ttft_s == pytest.approx(want, rel=1e-6)
    with pytest.raises(ConfigError, match="non-empty"):
        simulate_trace(config, [], [])


def optimum(p: LiveProfile) -> float:
    workload = Workload(scaled_lengths(MAX_LEN), 8)
    return solve_fixed_split(p.system(), workload, Deployment(1, 1, 1)).threshold_tokens


@pytest.mark.parametrize(("link_gbps", "bound"), [(0.02, "> 1.5"), (100.0, "== 1")])
def test_the_fluid_drop_bound(link_gbps: float, bound: str) -> None:
    p = profile(link_gbps)
    t = optimum(p)
    figures = fluid_figures(p, max_prompt_tokens=MAX_LEN, output_tokens=8, threshold_tokens=t)
    assert figures["local_only_capacity_rps"] < figures["capacity_rps"]  # offload adds capacity
    assert figures["drop_capacity_static_t_rps"] <= figures["drop_capacity_best_t_rps"]
    if bound == "> 1.5":  # the link the static t relies on drops to 2 Mbit/s
        assert figures["drop_bound"] > 1.5 and figures["drop_best_t_tokens"] > t
    else:  # 10 Gbps left: never the bottleneck, no threshold gains anything
        assert figures["drop_bound"] == pytest.approx(1.0, abs=0.01)


def test_scaled_lengths_are_the_papers_law_scaled_to_the_max() -> None:
    law = scaled_lengths(MAX_LEN)
    assert law.hi == MAX_LEN and law.lo == pytest.approx(128 * MAX_LEN / 131072)
    assert law.mean == pytest.approx(27_486 * MAX_LEN / 131072, rel=0.01)
