"""Discrete-event simulator: queueing theory, conservation, fluid agreement, link, scenarios."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trtllm_prfaas.cli import main
from trtllm_prfaas.policy.model import Deployment, Workload, ttft_stats
from trtllm_prfaas.policy.profile import ClusterProfile, KvSize, QuadraticLatency, SystemProfile
from trtllm_prfaas.policy.rebalancer import RebalancerConfig
from trtllm_prfaas.sim.beyond import (
    BeyondScenario,
    fluid_bound,
    goodput,
    goodputs,
    p90_ttft_s,
    run_scale,
    scenario_config,
    worst_window_p90_s,
)
from trtllm_prfaas.sim.des import DesConfig, DesResult, ThresholdMode, Timeline, simulate
from trtllm_prfaas.sim.fluid import case_study_system, case_study_workload
from trtllm_prfaas.sim.link import LinkSchedule, link_drop
from trtllm_prfaas.sim.traffic import (
    OnOffArrivals,
    PoissonArrivals,
    PrefixModel,
    Trace,
    make_trace,
)

INF_LINK = LinkSchedule.constant(math.inf)


def mm1_trace(rate: float, mean_tokens: float, n: int, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    prompts = np.maximum(np.rint(rng.exponential(mean_tokens, n)), 1).astype(np.int64)
    zeros = np.zeros(n, dtype=np.int64)
    return Trace(arrivals, prompts, zeros, np.zeros(n, dtype=np.bool_), zeros - 1)


def single_queue_config(service_s_per_token: float) -> DesConfig:
    """One PD-P node whose service time is proportional to length; huge decode capacity."""
    kv = KvSize(0.0, 1.0)
    curve = QuadraticLatency(0.0, service_s_per_token, 0.0)
    pd = ClusterProfile("pd", curve, kv, decode_slots=100_000, decode_step_s=1e-9)
    system = SystemProfile(ClusterProfile("r", curve, kv), pd, link_gbps=1.0)
    workload = Workload(case_study_workload().lengths, output_tokens=1)
    return DesConfig(system, workload, Deployment(0, 1, 1), INF_LINK, math.inf)


def test_mm1_mean_sojourn_and_littles_law() -> None:
    # Exponential lengths x linear latency = exponential service: mean 1 s, arrivals 0.7/s.
    lam, n = 0.7, 40_000
    trace = mm1_trace(lam, 1000.0, n)
    result = simulate(single_queue_config(1e-3), trace)
    w = float(np.mean(result.ttft_s))
    assert w == pytest.approx(1 / (1.0 - lam), rel=0.08)  # M/M/1: W = 1 / (mu - lambda)
    # Little: time-average number in system (from the intervals) = lambda * W.
    start, end = trace.arrival_s, trace.arrival_s + result.ttft_s
    horizon = float(end.max())
    l_avg = float(np.sum(end - start)) / horizon
    assert l_avg == pytest.approx((n / horizon) * w, rel=1e-9)
    assert l_avg == pytest.approx(lam / (1 - lam), rel=0.1)


def test_every_request_finishes_and_routing_follows_t() -> None:
    system, workload = case_study_system(), case_study_workload()
    trace = make_trace(OnOffArrivals(3.0), workload.lengths, 3000, seed=3)
    cfg = DesConfig(system, workload, Deployment(4, 3, 5), link_drop(100.0, 100.0, 60.0, 0.1),
                    19_600.0)  # fmt: skip
    result = simulate(cfg, trace)
    assert not np.isnan(result.ttft_s).any() and (result.ttft_s > 0).all()
    np.testing.assert_array_equal(result.is_remote, trace.prompt_tokens > 19_600)


def test_infinite_link_without_queueing_equals_the_fluid_model() -> None:
    system, workload = case_study_system(), case_study_workload()
    trace = make_trace(PoissonArrivals(1.0), workload.lengths, 8000, seed=1)
    t = 19_635.0
    cfg = DesConfig(system, workload, Deployment(8000, 8000, 800), INF_LINK, t)
    result = simulate(cfg, trace)
    lengths = trace.prompt_tokens.astype(float)
    expected = np.where(
        lengths > t, system.prfaas.prefill.seconds(lengths), system.pd.prefill.seconds(lengths)
    )
    np.testing.assert_allclose(result.ttft_s, expected, rtol=1e-9)
    fluid = ttft_stats(system, workload, t)
    assert float(np.mean(result.ttft_s)) == pytest.approx(fluid.mean_s, rel=0.02)
    assert float(np.percentile(result.ttft_s, 90)) == pytest.approx(fluid.quantile_s, rel=0.03)


def test_link_schedule_integrates_the_rate() -> None:
    link = link_drop(100.0, 10.0, 60.0, 0.1)
    assert link.finish_s(0.0, 500.0) == pytest.approx(5.0)
    assert link.finish_s(9.0, 200.0) == pytest.approx(10.0 + 100.0 / 10.0)
    assert link.finish_s(60.0, 600.0) == pytest.approx(70.0 + 500 / 100.0)
    assert link.capacity_gb(80.0) == pytest.approx(1000 + 600 + 1000)


def test_prefix_hits_shorten_prefill_and_rebalancer_runs() -> None:
    system, workload = case_study_system(), case_study_workload()
    trace = make_trace(PoissonArrivals(0.5), workload.lengths, 2000, 5, PrefixModel(0.5), (4, 3))
    base = DesConfig(system, workload, Deployment(4, 3, 5), LinkSchedule.constant(100.0), 19_600.0)
    with_hits = simulate(base, trace)
    no_hits = simulate(base, make_trace(PoissonArrivals(0.5), workload.lengths, 2000, 5))
    assert np.mean(with_hits.ttft_s) < np.mean(no_hits.ttft_s)
    # Decode-heavy: 1 PD-D node for 3 req/s of 1024-token outputs; PD-P has slack.
    cfg = DesConfig(system, workload, Deployment(4, 6, 2), LinkSchedule.constant(100.0),
                    19_600.0, ThresholdMode.DYNAMIC, rebalancer=RebalancerConfig())  # fmt: skip
    result = simulate(cfg, make_trace(PoissonArrivals(1.5), workload.lengths, 1500, 2))
    assert result.num_conversions >= 1
    assert result.timeline.num_p[-1] < 6


def test_small_beyond_and_scale_runs(capsys: pytest.CaptureFixture[str]) -> None:
    sc = BeyondScenario(duration_s=120.0, drop_at_s=40.0, seeds=(0,), rate_tol=0.2)
    gp = goodput(sc)
    assert gp.static_rate > 0 and gp.dynamic_rate > 0 and gp.ratio > 0
    wall_s, result = run_scale(num_requests=20_000, num_gpus=1000)
    assert wall_s < 20 and not np.isnan(result.ttft_s).any()


def test_cli_des_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "des", "--requests", "300", "--arrivals", "onoff", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.strip())
    assert doc["num_requests"] == 300 and 0 <= doc["slo_attainment"] <= 1


def _result(arrival_s: list[float], ttft_s: list[float]) -> DesResult:
    empty = np.zeros(0)
    n = len(arrival_s)
    timeline = Timeline(empty, empty, empty, empty, empty, empty)
    return DesResult(np.asarray(arrival_s), np.asarray(ttft_s), np.zeros(n, dtype=np.bool_),
                     timeline, 0.0, 0)  # fmt: skip


def test_worst_window_p90_sees_a_bad_minute_the_whole_run_hides() -> None:
    # 600 requests over 600 s; the 50 arriving in [245, 295) wait 50 s, the others 1 s.
    arrival = [float(k) for k in range(600)]
    ttft = [50.0 if 245 <= a < 295 else 1.0 for a in arrival]
    runs = [_result(arrival, ttft)]
    assert p90_ttft_s(runs) == pytest.approx(1.0)  # 8% bad: invisible to a P90
    assert worst_window_p90_s(runs, 60.0, 10.0, 20) == pytest.approx(50.0)
    # too few requests per window: falls back to the whole-run P90
    assert worst_window_p90_s(runs, 60.0, 10.0, 1000) == pytest.approx(1.0)


def test_traces_share_lengths_across_rates_and_sizes() -> None:
    lengths = case_study_workload().lengths
    small = make_trace(OnOffArrivals(0.5), lengths, 300, seed=4)
    large = make_trace(OnOffArrivals(1.5), lengths, 900, seed=4)
    assert np.array_equal(small.prompt_tokens, large.prompt_tokens[:300])
    assert not np.array_equal(small.arrival_s, large.arrival_s[:300])
    other = make_trace(OnOffArrivals(0.5), lengths, 300, seed=5)
    assert not np.array_equal(small.prompt_tokens, other.prompt_tokens)


def test_dynamic_live_re_anchors_on_the_degraded_link_and_dynamic_does_not() -> None:
    # Same trace, same controller: before the drop both hold the solved t; during it the
    # live-anchored one relaxes towards the 5 Gbps optimum (~32K) on top of what link pressure
    # raises, so it sits higher.
    sc = BeyondScenario(duration_s=200.0, drop_at_s=60.0, seeds=(0,))
    trace = make_trace(PoissonArrivals(0.2), case_study_workload().lengths, 40, seed=1)
    rows = {}
    for mode in (ThresholdMode.DYNAMIC, ThresholdMode.DYNAMIC_LIVE):
        rows[mode] = simulate(scenario_config(sc, mode), trace).timeline
    base = scenario_config(sc, ThresholdMode.DYNAMIC).threshold_tokens
    tl, live = rows[ThresholdMode.DYNAMIC], rows[ThresholdMode.DYNAMIC_LIVE]
    before, during = tl.time_s < 60, (tl.time_s >= 60) & (tl.time_s < 120)
    assert np.all(tl.threshold_tokens[before] == base)
    assert np.all(live.threshold_tokens[before] == base)
    assert np.all(live.threshold_tokens[during] >= tl.threshold_tokens[during])
    assert np.max(live.threshold_tokens[during] - tl.threshold_tokens[during]) > 5_000


def test_fluid_bound_is_small_on_the_papers_link_and_large_on_a_tight_one() -> None:
    assert fluid_bound(BeyondScenario(link_gbps=100.0)) < 1.06
    assert fluid_bound(BeyondScenario(link_gbps=25.0)) > 1.5


def test_goodputs_in_processes_equal_goodputs_in_order() -> None:
    sc = BeyondScenario(duration_s=120.0, drop_at_s=40.0, seeds=(0,), rate_tol=0.2)
    jobs = [(sc, ThresholdMode.STATIC), (sc, ThresholdMode.DYNAMIC)]
    lines: list[str] = []
    serial = goodputs(jobs, 1, lines.append)
    assert goodputs(jobs, 2) == serial and all(rate > 0 for rate in serial)
    assert [line.split(" at ")[0] for line in lines] == ["static", "dynamic"]
