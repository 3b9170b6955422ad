"""Feed a live testbed's measured profile to the discrete-event simulator (``sim/des.py``).

``bench/live_drop.py`` measures the namespace testbed before its runs: unloaded TTFT by prompt
length through the router (local and offloaded probes), the relayed KV bytes of each offloaded
probe, the decode time per output token and the WAN's TCP goodput at its full and its dropped
rate. :class:`LiveProfile` holds those figures as plain numbers; :func:`des_config` turns them
into the simulator's inputs and :func:`simulate_trace` replays the live run's exact trace
(arrival times and prompt lengths) through the simulator.

How the measurements map onto the model (why each choice):

- **Prefill curve.** The testbed's prefill workers are the same engine on one core each, so one
  curve serves both clusters. A local probe's TTFT is a point on it as measured (it includes the
  decode worker's first token and the unshaped local relay, which the simulator has no stage
  for). An offloaded probe's point would be its TTFT minus ``S_kv(L) / B`` (the simulator sends
  the KV store-and-forward after prefill), but the live relay streams layer by layer and tbf
  lets its first burst through at once, so that difference is noise or negative at light load:
  the bench probes locally only (its profile router's ``t`` is the max length). The curve is
  log-log piecewise through the points (``PiecewiseLatency``); points that would break
  monotonicity (noise) are dropped. Store-and-forward makes the simulated remote TTFT a little
  pessimistic while the link keeps up, and right once it binds (the drop).
- **KV size.** A least-squares line through (prompt tokens, relayed bytes) of the probes: the
  relay's real bytes, Curve framing included (``KvSize.fit``).
- **Link.** The measured TCP goodput across the WAN, before and during a drop, as a
  ``LinkSchedule`` with the live run's drop times.
- **Decode.** ``max_num_seqs`` slots per decode worker, each held ``output_tokens x`` the
  measured time per output token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.loadgen.lengths import PAPER_LENGTHS
from trtllm_prfaas.policy.model import Deployment, Workload, evaluate
from trtllm_prfaas.policy.profile import ClusterProfile, KvSize, PiecewiseLatency, SystemProfile
from trtllm_prfaas.policy.solver import solve_fixed_split
from trtllm_prfaas.policy.workload import TruncatedLogNormal
from trtllm_prfaas.sim.des import DesConfig, DesResult, ThresholdMode, simulate
from trtllm_prfaas.sim.link import LinkSchedule
from trtllm_prfaas.sim.traffic import NO_HOLDER, Trace

__all__ = [
    "LiveProfile",
    "Probe",
    "des_config",
    "fit_kv",
    "fluid_figures",
    "prefill_points",
    "scaled_lengths",
    "simulate_trace",
]


@dataclass(frozen=True, kw_only=True)
class Probe:
    """One unloaded request: its length, TTFT, whether it was offloaded, the KV bytes relayed
    for it (to the decode worker, locally or across the WAN), its time per output token
    (None: one token) and its time to the second token (the decode node's first, once the KV
    arrived; None: not measured)."""

    num_tokens: int
    ttft_s: float
    is_remote: bool
    relay_bytes: float = 0.0
    tpot_s: float | None = None
    tt2t_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class LiveProfile:
    """A testbed's measured profile (see the module doc for how each figure is used)."""

    probes: tuple[Probe, ...]
    link_gbps: float  # WAN TCP goodput at the provisioned rate
    drop_link_gbps: float  # the same during the drop
    decode_step_s: float
    max_num_seqs: int = 16
    num_prfaas: int = 1
    num_p: int = 1
    num_d: int = 1

    def __post_init__(self) -> None:
        if min(self.link_gbps, self.drop_link_gbps, self.decode_step_s) <= 0:
            raise ConfigError("LiveProfile needs positive link rates and decode step")

    @property
    def kv(self) -> KvSize:
        return fit_kv(self.probes)

    @property
    def curve(self) -> PiecewiseLatency:
        tokens, seconds = prefill_points(self.probes, self.kv, self.link_gbps)
        return PiecewiseLatency(tokens, seconds)

    def unloaded_ttft_s(self, num_tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """The local (no WAN) unloaded TTFT the curve gives for each length."""
        return self.curve.seconds(np.asarray(num_tokens, dtype=np.float64))

    def unloaded_tt2t_s(self, num_tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """The unloaded time to the second token for each length: log-log piecewise through
        the probes that measured it (increasing points, as the prefill curve); without two
        such probes, the unloaded TTFT plus one decode step."""
        tokens, seconds = _increasing(
            (p.num_tokens, p.tt2t_s) for p in self.probes if p.tt2t_s is not None
        )
        lengths = np.asarray(num_tokens, dtype=np.float64)
        if len(tokens) < 2:
            return self.unloaded_ttft_s(lengths) + self.decode_step_s
        return PiecewiseLatency(tuple(tokens), tuple(seconds)).seconds(lengths)

    def scaled(self, factor: float) -> LiveProfile:
        """The same profile with every probe's times x ``factor``: the machine ran ``factor``
        times slower (or faster) when a run was measured than when the profile was (shared
        cores), as a calibration probe just before the run says."""
        if factor <= 0:
            raise ConfigError(f"LiveProfile.scaled: factor must be > 0, got {factor}")
        probes = tuple(
            replace(p, ttft_s=p.ttft_s * factor,
                    tpot_s=None if p.tpot_s is None else p.tpot_s * factor,
                    tt2t_s=None if p.tt2t_s is None else p.tt2t_s * factor)
            for p in self.probes
        )  # fmt: skip
        return replace(self, probes=probes, decode_step_s=self.decode_step_s * factor)

    def system(self) -> SystemProfile:
        kv, curve = self.kv, self.curve
        prfaas = ClusterProfile("testbed-prfaas", curve, kv)
        pd = ClusterProfile("testbed-pd", curve, kv, self.max_num_seqs, self.decode_step_s)
        return SystemProfile(prfaas, pd, self.link_gbps)


def fit_kv(probes: Sequence[Probe]) -> KvSize:
    """``S_kv`` from the probes' relayed bytes (needs two distinct lengths)."""
    remote = [p for p in probes if p.relay_bytes > 0]
    if len({p.num_tokens for p in remote}) < 2:
        raise ConfigError("the profile needs probes of two lengths with relayed bytes")
    kv = KvSize.fit(tuple(float(p.num_tokens) for p in remote),
                    tuple(p.relay_bytes for p in remote))  # fmt: skip
    per_token = max(kv.per_token_bytes, 1.0)
    return KvSize(max(kv.fixed_bytes, 0.0), per_token)


def prefill_points(
    probes: Sequence[Probe], kv: KvSize, link_gbps: float
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(tokens, seconds)`` of the prefill curve, strictly increasing in both (module doc)."""
    points = [
        (p.num_tokens, p.ttft_s - (kv.gigabits(p.num_tokens) / link_gbps if p.is_remote else 0))
        for p in probes
    ]
    tokens, seconds = _increasing(points)
    if len(tokens) < 2:
        raise ConfigError(f"the probes give fewer than 2 increasing prefill points: {points}")
    return tokens, seconds


def _increasing(
    points: Iterable[tuple[int, float]],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The sorted points that keep both coordinates strictly increasing (positive times only):
    a point that would break monotonicity is noise, dropped."""
    tokens: list[float] = []
    seconds: list[float] = []
    for n, s in sorted(points):
        if s > 0 and (not tokens or (n > tokens[-1] and s > seconds[-1])):
            tokens.append(float(n))
            seconds.append(float(s))
    return tuple(tokens), tuple(seconds)


def scaled_lengths(max_prompt_tokens: int) -> TruncatedLogNormal:
    """The paper's length law scaled so its ``hi`` is ``max_prompt_tokens`` (as the loadgen's
    ``LengthSampler``): the solver's view of the trace's distribution."""
    scale = max_prompt_tokens / PAPER_LENGTHS.hi
    lo = max(PAPER_LENGTHS.lo * scale, 1.0)
    return TruncatedLogNormal(PAPER_LENGTHS.mu + math.log(scale), PAPER_LENGTHS.sigma, lo,
                              float(max_prompt_tokens))  # fmt: skip


def fluid_figures(
    profile: LiveProfile, *, max_prompt_tokens: int, output_tokens: int, threshold_tokens: float
) -> dict[str, float]:
    """The fluid model on the profile (no queueing): capacity at ``threshold_tokens`` and the
    provisioned link, with local prefill only, and during the drop with that ``t`` kept and
    with ``t`` re-solved for the dropped link; ``drop_bound`` is the last over the one before,
    the most any threshold policy can gain while the link is down (``sim/beyond.py``)."""
    workload = Workload(scaled_lengths(max_prompt_tokens), output_tokens)
    dep = Deployment(profile.num_prfaas, profile.num_p, profile.num_d)
    system = profile.system()
    down = SystemProfile(system.prfaas, system.pd, profile.drop_link_gbps)
    static = evaluate(system, workload, dep, threshold_tokens)
    kept = evaluate(down, workload, dep, threshold_tokens).lambda_max
    best = solve_fixed_split(down, workload, dep)
    local = evaluate(system, workload, dep, float(max_prompt_tokens)).lambda_max
    return {
        "capacity_rps": static.lambda_max,
        "offload_share": static.offload_share,
        "local_only_capacity_rps": local,
        "drop_capacity_static_t_rps": kept,
        "drop_capacity_best_t_rps": best.lambda_max,
        "drop_best_t_tokens": best.threshold_tokens,
        "drop_bound": best.lambda_max / kept if kept > 0 else math.inf,
    }


def des_config(
    profile: LiveProfile,
    *,
    max_prompt_tokens: int,
    output_tokens: int,
    threshold_tokens: float,
    mode: ThresholdMode,
    drop_at_s: float,
    drop_s: float,
) -> DesConfig:
    """The simulator's deployment for the live scenario (one PrfaaS, one PD-P, one PD-D)."""
    link = LinkSchedule(
        (0.0, drop_at_s, drop_at_s + drop_s),
        (profile.link_gbps, profile.drop_link_gbps, profile.link_gbps),
    )
    workload = Workload(scaled_lengths(max_prompt_tokens), output_tokens)
    deployment = Deployment(profile.num_prfaas, profile.num_p, profile.num_d)
    return DesConfig(system=profile.system(), workload=workload, deployment=deployment,
                     link=link, threshold_tokens=threshold_tokens, mode=mode)  # fmt: skip


def simulate_trace(
    config: DesConfig, arrivals_s: Sequence[float], prompt_tokens: Sequence[int]
) -> DesResult:
    """Run the live trace (same arrival times, same lengths, no prefix hits) through the DES."""
    n = len(arrivals_s)
    if n != len(prompt_tokens) or n == 0:
        raise ConfigError("simulate_trace needs equal, non-empty arrivals and lengths")
    zeros = np.zeros(n, dtype=np.int64)
    trace = Trace(np.asarray(arrivals_s, dtype=np.float64),
                  np.asarray(prompt_tokens, dtype=np.int64), zeros,
                  np.zeros(n, dtype=np.bool_), zeros + NO_HOLDER)  # fmt: skip
    return simulate(config, trace)
