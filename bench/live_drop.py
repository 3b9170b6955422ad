"""The live link drop: static against dynamic ``t`` on the namespace testbed, and the simulator's
prediction of the same scenario from the testbed's measured profile (issue 16, items 2-4).

    sudo .venv/bin/python bench/live_drop.py --json          # ~15 min; PNGs in bench/out/live_drop
    sudo .venv/bin/python bench/live_drop.py --quick --json  # ~4 min, tiny model (the test's)

Three testbeds (``prfaas netns``: dc-remote and dc-local namespaces, a tc-tbf WAN, real worker
and router processes; the two prefill workers pinned to a core each, torch at one thread):

1. **profile**: the WAN's TCP goodput at its rate and at the drop rate, then unloaded probes
   through the router (local and offloaded) -> ``sim.live_profile.LiveProfile``; the static
   ``t`` is the solver's optimum on that profile unless ``--threshold-tokens`` says.
2. **static** (``--fixed-threshold``) and 3. **dynamic** (the router's control loop), each fed
   the same trace: Poisson arrivals (``loadgen.runner.poisson_gaps``) with the paper's lengths
   scaled to the model's max (``loadgen.lengths.LengthSampler``), the WAN cut to
   ``--drop-fraction`` of its rate (``tc qdisc change``) for ``--drop-s`` in the middle. The
   router's ``prfaas_*`` gauges and the WAN's tc counters are scraped every second.

Then the simulator (``sim/des.py``) runs the same trace on the profile, both modes, and the
bench prints one JSON line: per mode the worst-window P90 of the time to the second token
(TT2T: the decode node's first token, when the KV arrived) and of TTFT (t1, streamed by the
prefill leg before any KV crosses a link, so blind to the link), goodput at the SLO on TT2T
(``_live_report`` says which and why), the offload share; ``live_dynamic_over_static_goodput``,
``sim_live_goodput_error`` and the per-second series; ``invariants`` (tokens equal a single
engine's for the checked requests and between the two modes, every failure has a reason, the
drop showed in tc's rate). The PNG timeline goes to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _live_profile import measure_link_gbps, probe
from _live_report import SLO_FACTOR, Outcome, outcome, plot_timeline, series
from _live_run import LiveRun, run_live, start_testbed

from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.loadgen.client import RequestSpec
from trtllm_prfaas.loadgen.lengths import LengthSampler
from trtllm_prfaas.loadgen.prompts import prompt_ids
from trtllm_prfaas.loadgen.runner import poisson_gaps
from trtllm_prfaas.policy.model import Deployment, Workload
from trtllm_prfaas.policy.solver import solve_fixed_split
from trtllm_prfaas.sim.des import DesResult, ThresholdMode
from trtllm_prfaas.sim.live_profile import (
    LiveProfile,
    des_config,
    fluid_figures,
    scaled_lengths,
    simulate_trace,
)
from trtllm_prfaas.testbed.netns import WanShape, missing_requirements, parse_rate_bits
from trtllm_prfaas.testbed.spec import TestbedConfig

TEMPERATURE = 0.7  # sampled, so a token relayed or computed differently shows
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "live_drop"
PROBE_INDEX = 1_000_000  # probe prompts' index: no prefix shared with the trace's


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """One experiment; ``quick()`` is the test's short version."""

    model_preset: str = "default"
    max_prompt_tokens: int = 0  # 0: the model's max_seq_len - max_tokens
    max_tokens: int = 8
    rate_rps: float = 0.35
    wan_rate: str = "20mbit"
    drop_fraction: float = 0.1
    before_s: float = 150.0  # the control loop warms up on 32 requests and 4 legs per cluster
    drop_s: float = 60.0
    after_s: float = 60.0
    seed: int = 0
    threshold_tokens: int = 0  # 0: the solver's optimum on the measured profile
    probe_fractions: tuple[float, ...] = (0.01, 0.03, 0.08, 0.15, 0.3, 0.6, 0.97)
    link_probe_s: float = 4.0
    request_timeout_s: float = 300.0
    # Requests checked against a single engine (-1: all): the shortest ones on each side of the
    # static t, half each (those above it crossed the WAN in the static run). Each is a whole
    # prefill on this machine's shared cores, so the full run checks a few.
    check_tokens: int = 6
    num_blocks: int = 8192

    @classmethod
    def quick(cls) -> Settings:
        return cls(model_preset="tiny", max_prompt_tokens=2048, max_tokens=6, rate_rps=2.0,
                   wan_rate="20mbit", before_s=15.0, drop_s=10.0, after_s=10.0,
                   probe_fractions=(0.03, 0.1, 0.2, 0.4, 0.7, 0.97), link_probe_s=2.0,
                   request_timeout_s=120.0, check_tokens=-1, num_blocks=2048)  # fmt: skip

    @property
    def span_s(self) -> float:
        return self.before_s + self.drop_s + self.after_s

    @property
    def drop_rate(self) -> str:
        return f"{parse_rate_bits(self.wan_rate) * self.drop_fraction / 1e3:.0f}kbit"

    def prompt_max(self) -> int:
        max_seq = model_preset(self.model_preset).max_seq_len
        return self.max_prompt_tokens or max_seq - self.max_tokens

    def testbed(self, threshold_tokens: int) -> TestbedConfig:
        return TestbedConfig(model_preset=self.model_preset, grpc_port=0, metrics_port=0,
                             threshold_tokens=threshold_tokens, num_blocks=self.num_blocks,
                             num_threads=1)  # fmt: skip


# ---------------------------------------------------------------------------- the trace
def make_trace(s: Settings) -> tuple[list[RequestSpec], list[float]]:
    """The requests and their arrival times (s), the same for both modes: Poisson gaps and the
    paper's scaled lengths, each from its own seeded stream; arrivals past the span are cut."""
    num = max(int(s.rate_rps * s.span_s * 3), 16)
    arrivals = np.concatenate([[0.0], np.cumsum(poisson_gaps(s.rate_rps, s.seed, num - 1))])
    arrivals = arrivals[arrivals < s.span_s]
    lengths = LengthSampler(s.prompt_max(), s.seed).sample(len(arrivals))
    specs = [_spec(i, n, s) for i, n in enumerate(lengths)]
    return specs, [float(a) for a in arrivals]


def _spec(index: int, num_tokens: int, s: Settings) -> RequestSpec:
    return RequestSpec(index, num_tokens, prompt_ids(num_tokens, index, s.seed), s.max_tokens,
                       TEMPERATURE, s.seed + index)  # fmt: skip


# ---------------------------------------------------------------------------- phases
def profile_testbed(s: Settings, log: Any) -> tuple[LiveProfile, dict[str, Any]]:
    """Phase 1: link goodput (full and dropped rate) and unloaded probes on their own testbed
    (its fixed ``t`` is the max length: every probe prefills locally, on the same engine
    and core count as the PrfaaS worker, and its KV crosses the local relay, whose bytes give
    ``S_kv``; the simulator adds the WAN itself, from the measured goodput)."""
    max_len = s.prompt_max()
    hosts = start_testbed(s.testbed(max_len), WanShape(rate=s.wan_rate), True)
    run_id = hosts.run_id
    try:
        link = measure_link_gbps(hosts, s.link_probe_s)
        hosts.set_wan_rate(s.drop_rate)
        dropped = measure_link_gbps(hosts, s.link_probe_s)
        hosts.set_wan_rate(s.wan_rate)
        log(f"WAN TCP goodput {link * 1e3:.1f} Mbit/s, dropped {dropped * 1e3:.2f} Mbit/s")
        lengths = sorted({max(int(f * max_len), 16) for f in s.probe_fractions})
        specs = [_spec(PROBE_INDEX + i, n, s) for i, n in enumerate([lengths[0], *lengths])]
        probes, failures = probe(hosts, specs, s.request_timeout_s)
        probes = probes[1:]  # the first request warms the engines up
    finally:
        hosts.close()
    if failures:
        raise SystemExit(f"profile probes failed: {failures}")
    tpots = [p.tpot_s for p in probes if p.tpot_s is not None]
    profile = LiveProfile(probes=tuple(probes), link_gbps=link, drop_link_gbps=dropped,
                          decode_step_s=float(np.median(tpots)) if tpots else 0.05)  # fmt: skip
    kv, curve = profile.kv, profile.curve
    detail = {"run_id": run_id, "link_gbps": round(link, 5), "drop_link_gbps": round(dropped, 6),
              "decode_step_s": round(profile.decode_step_s, 4),
              "kv_fixed_bytes": round(kv.fixed_bytes),
              "kv_per_token_bytes": round(kv.per_token_bytes, 1),
              "prefill_curve": {"tokens": curve.tokens,
                                "seconds": [round(x, 4) for x in curve.latency_s]},
              "probes": [dataclasses.asdict(p) for p in probes]}  # fmt: skip
    return profile, detail


def solver_threshold(profile: LiveProfile, s: Settings) -> int:
    """The fluid optimum ``t`` for the measured profile at the provisioned link."""
    workload = Workload(scaled_lengths(s.prompt_max()), s.max_tokens)
    dep = Deployment(profile.num_prfaas, profile.num_p, profile.num_d)
    return round(solve_fixed_split(profile.system(), workload, dep).threshold_tokens)


def live_mode(
    s: Settings, mode: str, t: int, specs: list[RequestSpec], arrivals: list[float]
) -> tuple[LiveRun, dict[str, int]]:
    """Phases 2/3: one testbed, a calibration probe, the trace with the drop; returns the run
    (``calibration``: the probe's TTFT, for ``LiveProfile.scaled``) and exit codes."""
    hosts = start_testbed(s.testbed(t), WanShape(rate=s.wan_rate), mode == "static")
    pinned = {name: cpu for name, cpu in _pins(hosts).items()}
    try:
        probes, failures = probe(hosts, calibration_specs(s, t), s.request_timeout_s)
        if failures or len(probes) != 2:
            raise SystemExit(f"{mode}: the calibration probe failed: {failures}")
        run = run_live(hosts, mode, specs, arrivals, drop_at_s=s.before_s, drop_s=s.drop_s,
                       drop_rate=s.drop_rate, timeout_s=s.request_timeout_s)  # fmt: skip
    finally:
        codes = hosts.close()
    run.pinned, run.calibration = pinned, probes[1]
    return run, codes


def calibration_specs(s: Settings, t: int) -> list[RequestSpec]:
    """A warm-up and one probe at the profile's length nearest ``t / 3`` (local in both modes):
    the machine's speed now against the profile's (other work shares these cores)."""
    lengths = [max(int(f * s.prompt_max()), 16) for f in s.probe_fractions]
    length = min(lengths, key=lambda n: abs(n - t / 3))
    return [_spec(PROBE_INDEX + 100 + i, n, s) for i, n in enumerate((lengths[0], length))]


def _pins(hosts: Any) -> dict[str, int]:
    out = {}
    for name, worker in hosts.workers.items():
        cpus = os.sched_getaffinity(worker.process.pid)
        if len(cpus) == 1:
            out[name] = next(iter(cpus))
    return out


# ---------------------------------------------------------------------------- checks
def reference_tokens(s: Settings, spec: RequestSpec) -> list[int]:
    """The same request on one engine in this process (the workers' model and sampling)."""
    blocks = -(-(spec.num_prompt_tokens + s.max_tokens) // 16) + 8
    engine = ReferenceEngine(EngineConfig(model=model_preset(s.model_preset), num_blocks=blocks))
    sampling = SamplingParams(spec.max_tokens, spec.temperature, spec.seed, ignore_eos=False)
    assert isinstance(spec.prompt, list)
    return engine.generate([spec.prompt], sampling)[0]


def invariants(
    s: Settings, runs: dict[str, LiveRun], specs: list[RequestSpec], t: int
) -> dict[str, Any]:
    """Tokens against a single engine (a sample, or all), between modes, and the drop in tc."""
    ok_both = [i for i in range(len(specs)) if all(r.records[i].is_ok for r in runs.values())]
    same = sum(runs["static"].records[i].token_ids == runs["dynamic"].records[i].token_ids
               for i in ok_both)  # fmt: skip
    every = [i for i in range(len(specs))
             if any(r.records[i].is_ok for r in runs.values())]  # fmt: skip
    by_length = sorted(every, key=lambda i: specs[i].num_prompt_tokens)
    half = max(s.check_tokens // 2, 1)
    above = [i for i in by_length if specs[i].num_prompt_tokens > t][:half]
    checked = every if s.check_tokens < 0 else [*by_length[:half], *above]
    mismatched = []
    for i in checked:
        want = tuple(reference_tokens(s, specs[i]))
        for mode, run in runs.items():
            if run.records[i].is_ok and run.records[i].token_ids != want:
                mismatched.append(f"{mode}:{i}")
    failures = [r for run in runs.values() for r in run.records if not r.is_ok]
    expected_bps = parse_rate_bits(s.drop_rate)
    return {
        "num_requests": len(specs),
        "num_ok_both_modes": len(ok_both),
        "num_same_tokens_both_modes": int(same),
        "num_checked_against_single_engine": len(checked),
        "mismatched_against_single_engine": mismatched,
        "failures_without_reason": sum(not r.reason for r in failures),
        "failure_statuses": sorted({r.status for r in failures}),
        "drop_seen_in_tc": {
            mode: abs(run.wan_rate_during_drop_bps - expected_bps) <= 0.02 * expected_bps
            for mode, run in runs.items()
        },
    }


# ---------------------------------------------------------------------------- main
def run_experiment(s: Settings, out_dir: Path, log: Any) -> dict[str, Any]:
    """The three phases, the simulator and the figures (the module doc); the JSON object."""
    started = time.monotonic()
    specs, arrivals = make_trace(s)
    log(f"trace: {len(specs)} requests over {s.span_s:g} s, max prompt {s.prompt_max()}")
    profile, profile_detail = profile_testbed(s, log)
    t = s.threshold_tokens or solver_threshold(profile, s)
    log(f"static t = {t} tokens")
    runs, codes = {}, {}
    for mode in ("static", "dynamic"):
        log(f"{mode} run ...")
        runs[mode], codes[mode] = live_mode(s, mode, t, specs, arrivals)
    mean_len = scaled_lengths(s.prompt_max()).mean
    floor = float(profile.unloaded_tt2t_s([round(mean_len)])[0])
    lengths = [spec.num_prompt_tokens for spec in specs]
    slo = SLO_FACTOR * np.maximum(profile.unloaded_tt2t_s(lengths), floor)
    live = {m: live_outcome(s, run, arrivals, slo) for m, run in runs.items()}
    factors = {m: contention(profile, run) for m, run in runs.items()}
    sims = {m: simulated(s, profile.scaled(factors[m]), run, t, arrivals, lengths)
            for m, run in runs.items()}  # fmt: skip
    # The DES's TTFT is its decode start (the KV usable); its second token one decode step on.
    sim = {m: outcome(arrivals, list(r.ttft_s + profile.decode_step_s * factors[m]), slo,
                      window_s=s.drop_s, span_s=s.span_s, is_remote=list(r.is_remote))
           for m, r in sims.items()}  # fmt: skip
    per_mode = {m: {"series": series(run.samples), "arrival_s": arrivals,
                    "ttft_s": [r.ttft_s if r.is_ok else None for r in run.records],
                    "tt2t_s": [r.tt2t_s if r.is_ok else None for r in run.records],
                    "sim_threshold": sims[m].timeline.threshold_tokens.tolist(),
                    "drop": [run.drop_started_s, run.drop_ended_s], "pinned": run.pinned,
                    "load_average_1min": run.load_average, "run_id": run.run_id,
                    "contention_factor": round(factors[m], 3),
                    "exit_codes": codes[m]} for m, run in runs.items()}  # fmt: skip
    drop = (runs["static"].drop_started_s, runs["static"].drop_ended_s)
    plot = plot_timeline(out_dir / "live_drop_timeline.png", per_mode, drop,
                         f"live link drop: WAN {s.wan_rate} -> {s.drop_rate} for {s.drop_s:g} s, "
                         f"Poisson {s.rate_rps:g} req/s, static t = {t}")  # fmt: skip
    errors = {m: _relative_error(sim[m].goodput_rps, live[m].goodput_rps) for m in live}
    fluid = fluid_figures(profile, max_prompt_tokens=s.prompt_max(), output_tokens=s.max_tokens,
                          threshold_tokens=t)  # fmt: skip
    return {
        "live_dynamic_over_static_goodput": _ratio(live["dynamic"], live["static"]),
        "sim_live_goodput_error": round(max(errors.values()), 4),
        "sim_live_goodput_error_by_mode": errors,
        "sim_dynamic_over_static_goodput": _ratio(sim["dynamic"], sim["static"]),
        "live": {m: o.as_json() for m, o in live.items()},
        "sim": {m: o.as_json() for m, o in sim.items()},
        "slo": f"TT2T <= {SLO_FACTOR:g} x max(unloaded TT2T(L), unloaded TT2T(mean L = "
        f"{mean_len:.0f}) = {floor:.3f} s) (TT2T: time to the second token, the decode "
        f"node's first); goodput = SLO-met requests / {s.span_s:g} s",
        "static_t_tokens": t,
        "fluid": {k: round(v, 4) for k, v in fluid.items()},
        "settings": dataclasses.asdict(s),
        "drop_rate": s.drop_rate,
        "profile": profile_detail,
        "invariants": invariants(s, runs, specs, t),
        "plots": [str(plot)],
        "load_average": list(os.getloadavg()),
        "wall_s": round(time.monotonic() - started, 1),
        "runs": per_mode,
        "trace": {"num_prompt_tokens": lengths, "slo_s": [round(x, 3) for x in slo]},
        "by_phase": by_phase(s, runs, arrivals, slo),
        "gain_bound": gain_bound(runs["static"], slo, lengths, t),
    }


def live_outcome(s: Settings, run: LiveRun, arrivals: list[float], slo: np.ndarray) -> Outcome:
    """A live mode's figures; its offload share from the router's routed counters."""
    ttft = [r.ttft_s if r.is_ok else None for r in run.records]
    tt2t = [r.tt2t_s if r.is_ok else None for r in run.records]
    figures = outcome(arrivals, tt2t, slo, window_s=s.drop_s, span_s=s.span_s, ttft_s=ttft)
    first, last = (run.samples[0], run.samples[-1]) if run.samples else (None, None)
    if first is None or last is None or last.num_routed <= first.num_routed:
        return figures
    share = (last.num_remote - first.num_remote) / (last.num_routed - first.num_routed)
    return dataclasses.replace(figures, offload_share=share)


def simulated(
    s: Settings,
    profile: LiveProfile,
    run: LiveRun,
    t: int,
    arrivals: list[float],
    lengths: list[int],
) -> DesResult:
    """The simulator on the profile, the trace and this run's drop times, in the run's mode."""
    mode = ThresholdMode.STATIC if run.mode == "static" else ThresholdMode.DYNAMIC
    cfg = des_config(profile, max_prompt_tokens=s.prompt_max(), output_tokens=s.max_tokens,
                     threshold_tokens=t, mode=mode, drop_at_s=run.drop_started_s,
                     drop_s=run.drop_ended_s - run.drop_started_s)  # fmt: skip
    return simulate_trace(cfg, arrivals, lengths)


def by_phase(
    s: Settings,
    runs: dict[str, LiveRun],
    arrivals: list[float],
    slo: np.ndarray,
) -> dict[str, dict[str, int]]:
    """SLO-met requests per mode by when they arrived: before, during and after the drop."""
    edges = {"before": (0.0, s.before_s), "drop": (s.before_s, s.before_s + s.drop_s),
             "after": (s.before_s + s.drop_s, math.inf)}  # fmt: skip
    out = {}
    for mode, run in runs.items():
        pairs = list(zip(slo_met(run, slo), arrivals, strict=True))
        out[mode] = {phase: sum(m for m, a in pairs if lo <= a < hi)
                     for phase, (lo, hi) in edges.items()}  # fmt: skip
    out["num_requests"] = {phase: sum(lo <= a < hi for a in arrivals)
                           for phase, (lo, hi) in edges.items()}  # fmt: skip
    return out


def slo_met(run: LiveRun, slo: np.ndarray) -> list[bool]:
    """Per request of ``run``: OK with its time to the second token within its SLO."""
    return [r.is_ok and (r.tt2t_s or math.inf) <= float(bound)
            for r, bound in zip(run.records, slo, strict=True)]  # fmt: skip


def gain_bound(static: LiveRun, slo: np.ndarray, lengths: list[int], t: int) -> dict[str, Any]:
    """What any threshold policy could win over the static run: the requests the static ``t``
    offloaded (``L > t``: no prefix reuse in this trace) and that missed the SLO. Moving all of
    them local, at no cost to anyone else, gives at most ``(met + missed offloaded) / met``; a
    request that stayed local and missed was not the link's doing (the dynamic router could only
    add local load). The bound the drop's offload share sets on the headline ratio."""
    met = slo_met(static, slo)
    offloaded = [n > t for n in lengths]
    missed = sum(o and not m for o, m in zip(offloaded, met, strict=True))
    num_met = sum(met)
    return {
        "static_offloaded": sum(offloaded),
        "static_offloaded_missed": missed,
        "static_local_missed": sum(not o and not m for o, m in zip(offloaded, met, strict=True)),
        "max_dynamic_over_static_goodput": round((num_met + missed) / num_met, 4)
        if num_met
        else None,
    }


def contention(profile: LiveProfile, run: LiveRun) -> float:
    """The run's calibration TTFT over the profile's at that length (1.0 without one)."""
    probe = run.calibration
    if probe is None:
        return 1.0
    same = [p.ttft_s for p in profile.probes if p.num_tokens == probe.num_tokens]
    return probe.ttft_s / same[0] if same else 1.0


def _ratio(a: Outcome, b: Outcome) -> float | None:
    return round(a.goodput_rps / b.goodput_rps, 4) if b.goodput_rps > 0 else None


def _relative_error(predicted: float, measured: float) -> float:
    return round(abs(predicted - measured) / measured, 4) if measured > 0 else math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--quick", action="store_true", help="tiny model, short phases")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG and JSON directory")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals, req/s")
    parser.add_argument("--wan-rate", default=None, help="tc rate, e.g. 40mbit")
    parser.add_argument("--threshold-tokens", type=int, default=None, help="static t")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    why = missing_requirements()
    if why:
        print(f"bench/live_drop.py: the namespace testbed {why}", file=sys.stderr)
        return 2
    s = Settings.quick() if args.quick else Settings()
    overrides = {"rate_rps": args.rate, "wan_rate": args.wan_rate,
                 "threshold_tokens": args.threshold_tokens, "seed": args.seed}  # fmt: skip
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})

    def log(text: str) -> None:
        print(f"[live_drop {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    result = run_experiment(s, args.out, log)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "live_drop.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
