"""The ``des`` and ``beyond`` scenarios of ``prfaas simulate`` (arguments, runs, plots, output).

Kept apart from ``command.py`` (which routes) so each stays short; matplotlib is only imported
when ``--plots`` is given.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from trtllm_prfaas.policy.model import Deployment
from trtllm_prfaas.policy.rebalancer import RebalancerConfig
from trtllm_prfaas.policy.solver import solve
from trtllm_prfaas.sim.beyond import (
    BeyondScenario,
    fluid_bound,
    goodputs,
    run_scale,
    scenario_config,
    stderr_progress,
)
from trtllm_prfaas.sim.des import DesConfig, DesResult, ThresholdMode, simulate
from trtllm_prfaas.sim.fluid import case_study_system, case_study_workload
from trtllm_prfaas.sim.link import LinkSchedule, link_drop
from trtllm_prfaas.sim.traffic import (
    ArrivalProcess,
    OnOffArrivals,
    PoissonArrivals,
    PrefixModel,
    make_trace,
)

__all__ = ["add_beyond_arguments", "add_des_arguments", "run_beyond", "run_des", "summary"]


def add_des_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``prfaas simulate des`` (defaults: the case study at 2.5 req/s)."""
    p.add_argument("--rate", type=float, default=2.5, help="mean arrival rate, req/s")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--arrivals", choices=["poisson", "onoff"], default="poisson")
    p.add_argument("--peak-to-mean", type=float, default=2.0, help="onoff: on-state rate / mean")
    p.add_argument("--mode", choices=[m.value for m in ThresholdMode], default="static")
    p.add_argument("--split", default="4,3,5", help="N_prfaas,N_p,N_d")
    p.add_argument("--link-gbps", type=float, default=100.0)
    p.add_argument("--drop-at-s", type=float, default=0.0, help="0: no link drop")
    p.add_argument("--drop-s", type=float, default=60.0)
    p.add_argument("--drop-fraction", type=float, default=0.1)
    p.add_argument("--prefix-hit-rate", type=float, default=0.0)
    p.add_argument("--rebalance", action="store_true", help="run the long-timescale rebalancer")
    p.add_argument("--slo-s", type=float, default=10.0, help="TTFT SLO for the attainment figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plots", type=Path, default=None, help="write PNG figures to this folder")


def add_beyond_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``prfaas simulate beyond``."""
    p.add_argument("--json", action="store_true")
    p.add_argument("--scale-requests", type=int, default=1_000_000)
    p.add_argument("--slo-s", type=float, default=BeyondScenario.slo_p90_s)
    p.add_argument("--link-gbps", type=float, default=BeyondScenario.link_gbps)
    p.add_argument("--sweep-gbps", default="100,25", help="other line rates to compare ('' none)")
    p.add_argument("--workers", type=int, default=2, help="processes for the goodput searches")
    p.add_argument("--plots", type=Path, default=None, help="write PNG figures to this folder")


def summary(result: DesResult, slo_s: float) -> dict[str, float]:
    """TTFT statistics (s), offload share and SLO attainment of one run."""
    ttft = result.ttft_s
    return {
        "num_requests": float(len(ttft)),
        "mean_ttft_s": float(np.mean(ttft)),
        "p50_ttft_s": float(np.percentile(ttft, 50)),
        "p90_ttft_s": float(np.percentile(ttft, 90)),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "offload_share": float(np.mean(result.is_remote)),
        "slo_attainment": float(np.mean(ttft <= slo_s)),
        "num_conversions": float(result.num_conversions),
        "sim_wall_s": result.wall_s,
    }


def _des_config(args: argparse.Namespace) -> DesConfig:
    system, workload = case_study_system(), case_study_workload()
    n_prfaas, n_p, n_d = (int(x) for x in args.split.split(","))
    dep = Deployment(n_prfaas, n_p, n_d)
    t = solve(system, workload, n_prfaas, n_p + n_d).threshold_tokens
    system = replace(system, link_gbps=args.link_gbps)
    link = LinkSchedule.constant(args.link_gbps)
    if args.drop_at_s > 0:
        link = link_drop(args.link_gbps, args.drop_at_s, args.drop_s, args.drop_fraction)
    rebalancer = RebalancerConfig() if args.rebalance else None
    mode = ThresholdMode(args.mode)
    return DesConfig(system, workload, dep, link, t, mode, rebalancer=rebalancer)


def run_des(args: argparse.Namespace) -> int:
    """One scenario; prints a summary (one JSON line with ``--json``); optional figures."""
    config = _des_config(args)
    arrivals: ArrivalProcess = PoissonArrivals(args.rate)
    if args.arrivals == "onoff":
        arrivals = OnOffArrivals(args.rate, args.peak_to_mean)
    prefix = PrefixModel(args.prefix_hit_rate) if args.prefix_hit_rate > 0 else None
    nodes = (config.deployment.num_prfaas, config.deployment.num_p)
    trace = make_trace(arrivals, config.workload.lengths, args.requests, args.seed, prefix, nodes)
    result = simulate(config, trace)
    out = summary(result, args.slo_s)
    print(json.dumps(out) if args.json else "\n".join(f"{k:<18}{v:>12.3f}" for k, v in out.items()))
    if args.plots is not None:
        _des_plots(config, result, args.plots, args.slo_s)
    return 0


def _des_plots(config: DesConfig, result: DesResult, folder: Path, slo_s: float) -> None:
    from trtllm_prfaas.sim import plots

    dep = config.deployment
    plots.plot_split(config.system, config.workload, dep.num_prfaas, dep.num_p + dep.num_d,
                     folder / "fig5_split.png")  # fmt: skip
    plots.plot_bounds_vs_t(config.system, config.workload, dep, folder / "fig5_bounds.png")
    inf = replace(config, link=LinkSchedule.constant(float("inf")))
    empty = replace(inf, deployment=Deployment(10_000, 10_000, 10_000))
    rate = len(result.arrival_s) / float(result.arrival_s[-1])
    trace = make_trace(PoissonArrivals(rate), config.workload.lengths, len(result.ttft_s), 99)
    fluid = simulate(empty, trace).ttft_s  # no queueing, infinite link: the fluid model's TTFT
    curves = [("fluid (no queueing)", fluid), (f"DES at {rate:.2f} req/s", result.ttft_s)]
    plots.plot_ttft_cdf(curves, folder / "ttft_cdf_des.png", slo_s)


def run_beyond(args: argparse.Namespace) -> int:
    """Goodput of static vs dynamic ``t`` (headline link, whole-run SLO, other line rates),
    then the 1M-request scale run. Progress goes to stderr."""
    sc = BeyondScenario(slo_p90_s=args.slo_s, link_gbps=args.link_gbps)
    whole = replace(sc, window_s=None)
    sweep = [replace(sc, link_gbps=float(g)) for g in args.sweep_gbps.split(",") if g.strip()]
    static, dynamic, live = ThresholdMode.STATIC, ThresholdMode.DYNAMIC, ThresholdMode.DYNAMIC_LIVE
    jobs = [(sc, static), (sc, dynamic), (sc, live), (whole, static), (whole, dynamic)]
    jobs += [(s, mode) for s in sweep for mode in (static, dynamic)]
    rate = dict(zip(jobs, goodputs(jobs, args.workers, stderr_progress), strict=True))
    stderr_progress(f"scale run: {args.scale_requests} requests")
    scale_s, scale = run_scale(args.scale_requests)
    out = {
        "dynamic_over_static_goodput": _ratio(rate[sc, dynamic], rate[sc, static]),
        "static_goodput_rps": rate[sc, static],
        "dynamic_goodput_rps": rate[sc, dynamic],
        "dynamic_live_goodput_rps": rate[sc, live],
        "slo": f"P90 TTFT <= {sc.slo_p90_s:g} s in every {sc.window_s:g} s window",
        "slo_p90_ttft_s": sc.slo_p90_s,
        "link_gbps": sc.link_gbps,
        "drop_to_gbps": sc.link_gbps * sc.drop_fraction,
        "fluid_bound": round(fluid_bound(sc), 4),
        "whole_run_p90": _pair(rate[whole, static], rate[whole, dynamic]),
        "by_link_gbps": {
            f"{s.link_gbps:g}": {
                **_pair(rate[s, static], rate[s, dynamic]),
                "fluid_bound": round(fluid_bound(s), 4),
            }
            for s in sweep
        },
        "static_t_tokens": scenario_config(sc, static).threshold_tokens,
        "seeds": len(sc.seeds),
        "scale_1m_requests_s": scale_s,
        "scale_num_requests": args.scale_requests,
        "scale_p90_ttft_s": float(np.percentile(scale.ttft_s, 90)),
    }
    print(json.dumps(out) if args.json else "\n".join(f"{k:<30}{v}" for k, v in out.items()))
    if args.plots is not None:
        _beyond_plots(sc, rate[sc, static], args.plots)
    return 0


def _pair(static: float, dynamic: float) -> dict[str, float]:
    ratio = _ratio(dynamic, static)
    return {"static_goodput_rps": static, "dynamic_goodput_rps": dynamic, "ratio": ratio}


def _ratio(num: float, den: float) -> float:
    return round(num / den, 4) if den > 0 else float("inf")


def _beyond_plots(sc: BeyondScenario, rate: float, folder: Path) -> None:
    from trtllm_prfaas.sim import plots

    runs = []
    for mode in ThresholdMode:
        config = scenario_config(sc, mode)
        arrivals = OnOffArrivals(rate, sc.peak_to_mean, sc.on_fraction, sc.mean_on_s)
        trace = make_trace(arrivals, config.workload.lengths, int(rate * sc.duration_s), 0)
        runs.append((f"{mode.value} t", simulate(config, trace)))
    curves = [(label, r.ttft_s) for label, r in runs]
    plots.plot_ttft_cdf(curves, folder / "beyond_ttft_cdf.png", sc.slo_p90_s)
    plots.plot_timeline(runs, folder / "beyond_timeline.png")
