"""The paper's case study (section 3.4, Table 6) as a fluid model over ``policy/``.

Inputs are PAPER.md's: the 1T hybrid model's prefill on 8xH200 (Table 5), the inferred 8xH20
prefill curve, a truncated log-normal workload, 4 PrfaaS + 8 local instances against a 12-instance
homogeneous baseline, a 100 Gbps link. Every output comes from the same pure functions the live
router uses (``policy.solver``, ``policy.model``); nothing here is fitted to Table 6.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trtllm_prfaas.policy.model import (
    ThroughputEstimate,
    Workload,
    kv_throughput_gbps,
    ttft_stats,
)
from trtllm_prfaas.policy.profile import (
    BYTES_PER_MIB,
    TOKENS_PER_K,
    ClusterProfile,
    Interpolation,
    KvSize,
    PiecewiseLatency,
    QuadraticLatency,
    SystemProfile,
)
from trtllm_prfaas.policy.solver import naive_heterogeneous, solve, solve_homogeneous
from trtllm_prfaas.policy.workload import TruncatedLogNormal

__all__ = [
    "COLUMNS",
    "PAPER_HEADLINES",
    "PAPER_TABLE6",
    "CaseStudyColumn",
    "case_study",
    "case_study_system",
    "case_study_workload",
    "headlines",
]

# Table 5: (length in K tokens, KV size in MiB, prefill latency in s) on 8xH200.
H200_TABLE5: tuple[tuple[int, float, float], ...] = (
    (1, 190.8, 0.44),
    (8, 308.9, 0.72),
    (32, 701.3, 1.84),
    (128, 2316.3, 7.40),
)
# Backed out of Table 6 in PAPER.md (an inference, not a paper number).
H20_PREFILL = QuadraticLatency(c0_s=0.469, c1_s_per_token=1.30e-4, c2_s_per_token2=2.94e-10)
LINK_GBPS = 100.0
DECODE_SLOTS = 20  # BS_max per 8xH20 decode instance
DECODE_STEP_S = 1 / 40  # decode SLO of 40 tokens/s
OUTPUT_TOKENS = 1024
NUM_PRFAAS, NUM_LOCAL, NUM_HOMOGENEOUS = 4, 8, 12

COLUMNS = ("prfaas_pd", "homogeneous", "naive")

PAPER_TABLE6: dict[str, dict[str, float | None]] = {
    "prfaas_pd": {
        "t": 19.4 * 1000,
        "n_prfaas": 4,
        "n_p": 3,
        "n_d": 5,
        "theta_prfaas": 1.61,
        "theta_pd_p": 1.64,
        "theta_pd_d": 3.91,
        "lambda_max": 3.24,
        "mean_ttft_s": 2.22,
        "p90_ttft_s": 3.51,
    },
    "homogeneous": {
        "t": None,
        "n_prfaas": None,
        "n_p": 9,
        "n_d": 3,
        "theta_prfaas": None,
        "theta_pd_p": 2.11,
        "theta_pd_d": 2.35,
        "lambda_max": 2.11,
        "mean_ttft_s": 4.44,
        "p90_ttft_s": 9.73,
    },
    "naive": {
        "t": None,
        "n_prfaas": 4,
        "n_p": None,
        "n_d": 8,
        "theta_prfaas": 2.45,
        "theta_pd_p": None,
        "theta_pd_d": 6.25,
        "lambda_max": 2.45,
        "mean_ttft_s": 1.74,
        "p90_ttft_s": 3.51,
    },
}

PAPER_HEADLINES: dict[str, float] = {
    "speedup_over_homogeneous": 1.54,
    "speedup_over_naive": 1.32,
    "mean_ttft_reduction": 0.50,
    "p90_ttft_reduction": 0.64,
    "offload_share": 0.496,
    "long_mean_k_tokens": 44.0,
    "egress_gbps": 13.0,
    "egress_link_share": 0.13,
}


@dataclass(frozen=True)
class CaseStudyColumn:
    """One column of Table 6; ``None`` where the column has no such stage."""

    t: float | None
    n_prfaas: int | None
    n_p: int | None
    n_d: int
    theta_prfaas: float | None
    theta_pd_p: float | None
    theta_pd_d: float
    lambda_max: float
    mean_ttft_s: float
    p90_ttft_s: float
    offload_share: float
    egress_gbps: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        """The column as plain JSON-ready values."""
        return asdict(self)


def case_study_system(interpolation: Interpolation = Interpolation.LOGLOG) -> SystemProfile:
    """PrfaaS = 8xH200 instances (Table 5), PD = 8xH20 instances (inferred curve)."""
    tokens = tuple(float(k * TOKENS_PER_K) for k, _, _ in H200_TABLE5)
    kv = KvSize.fit(tokens, tuple(mib * BYTES_PER_MIB for _, mib, _ in H200_TABLE5))
    h200 = PiecewiseLatency(tokens, tuple(s for _, _, s in H200_TABLE5), interpolation)
    prfaas = ClusterProfile("8xH200", prefill=h200, kv=kv)
    pd = ClusterProfile(
        "8xH20", prefill=H20_PREFILL, kv=kv, decode_slots=DECODE_SLOTS, decode_step_s=DECODE_STEP_S
    )
    return SystemProfile(prfaas=prfaas, pd=pd, link_gbps=LINK_GBPS)


def case_study_workload() -> Workload:
    """Truncated log-normal input (mu 9.90, sigma 1.00, [128, 131072]); 1024 output tokens."""
    lengths = TruncatedLogNormal(mu=9.90, sigma=1.00, lo=128, hi=128 * TOKENS_PER_K)
    return Workload(lengths=lengths, output_tokens=OUTPUT_TOKENS)


def _column(
    system: SystemProfile, workload: Workload, e: ThroughputEstimate, kind: str
) -> CaseStudyColumn:
    ttft = ttft_stats(system, workload, e.threshold_tokens)
    dep, has_prfaas, has_p = e.deployment, kind != "homogeneous", kind != "naive"
    return CaseStudyColumn(
        t=e.threshold_tokens if kind == "prfaas_pd" else None,
        n_prfaas=dep.num_prfaas if has_prfaas else None,
        n_p=dep.num_p if has_p else None,
        n_d=dep.num_d,
        theta_prfaas=e.theta_prfaas if has_prfaas else None,
        theta_pd_p=e.theta_pd_p if has_p else None,
        theta_pd_d=e.theta_pd_d,
        lambda_max=e.lambda_max,
        mean_ttft_s=ttft.mean_s,
        p90_ttft_s=ttft.quantile_s,
        offload_share=e.offload_share,
        egress_gbps=e.egress_gbps if has_prfaas else None,
    )


def case_study(interpolation: Interpolation = Interpolation.LOGLOG) -> dict[str, CaseStudyColumn]:
    """The three columns of Table 6, keyed by :data:`COLUMNS`."""
    system, workload = case_study_system(interpolation), case_study_workload()
    estimates = {
        "prfaas_pd": solve(system, workload, NUM_PRFAAS, NUM_LOCAL),
        "homogeneous": solve_homogeneous(system, workload, NUM_HOMOGENEOUS),
        "naive": naive_heterogeneous(system, workload, NUM_PRFAAS, NUM_LOCAL),
    }
    return {k: _column(system, workload, e, k) for k, e in estimates.items()}


def headlines(
    columns: dict[str, CaseStudyColumn], interpolation: Interpolation = Interpolation.LOGLOG
) -> dict[str, float]:
    """The paper's headline figures recomputed from the columns (keys of PAPER_HEADLINES),
    plus ``egress_rule_of_thumb_gbps``: the paper's ``N * Phi_kv(L_avg)`` estimate."""
    pd, homog, naive = columns["prfaas_pd"], columns["homogeneous"], columns["naive"]
    system, workload = case_study_system(interpolation), case_study_workload()
    solved = solve(system, workload, NUM_PRFAAS, NUM_LOCAL)
    egress = pd.egress_gbps or 0.0
    mean_len = workload.lengths.mean
    return {
        "speedup_over_homogeneous": pd.lambda_max / homog.lambda_max,
        "speedup_over_naive": pd.lambda_max / naive.lambda_max,
        "mean_ttft_reduction": 1 - pd.mean_ttft_s / homog.mean_ttft_s,
        "p90_ttft_reduction": 1 - pd.p90_ttft_s / homog.p90_ttft_s,
        "offload_share": pd.offload_share,
        "long_mean_k_tokens": solved.long_tokens / TOKENS_PER_K,
        "egress_gbps": egress,
        "egress_link_share": egress / LINK_GBPS,
        "egress_rule_of_thumb_gbps": NUM_PRFAAS * kv_throughput_gbps(system.prfaas, mean_len),
    }
