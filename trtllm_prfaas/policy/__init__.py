"""Pure scheduling policy: the paper's throughput model, threshold solver and controllers.

Plain data in (frozen dataclasses), decisions out, time passed as an argument; no sockets, no
asyncio, no logging. The live router and the simulator call the same functions.

Example::

    from trtllm_prfaas.policy import solve
    from trtllm_prfaas.sim.fluid import case_study_system, case_study_workload

    best = solve(case_study_system(), case_study_workload(), num_prfaas=4, num_local=8)
    best.threshold_tokens, best.deployment, best.lambda_max   # ~19.6K, (4, 3, 5), ~3.20 req/s
"""

from __future__ import annotations

from trtllm_prfaas.policy.model import (
    Deployment,
    ThroughputEstimate,
    TtftStats,
    Workload,
    evaluate,
    ttft_stats,
)
from trtllm_prfaas.policy.profile import (
    ClusterProfile,
    Interpolation,
    KvSize,
    PiecewiseLatency,
    QuadraticLatency,
    SystemProfile,
)
from trtllm_prfaas.policy.solver import (
    SolverOptions,
    naive_heterogeneous,
    solve,
    solve_homogeneous,
)
from trtllm_prfaas.policy.workload import (
    HistogramLengths,
    LengthDistribution,
    TruncatedLogNormal,
)

__all__ = [
    "ClusterProfile",
    "Deployment",
    "HistogramLengths",
    "Interpolation",
    "KvSize",
    "LengthDistribution",
    "PiecewiseLatency",
    "QuadraticLatency",
    "SolverOptions",
    "SystemProfile",
    "ThroughputEstimate",
    "TruncatedLogNormal",
    "TtftStats",
    "Workload",
    "evaluate",
    "naive_heterogeneous",
    "solve",
    "solve_homogeneous",
    "ttft_stats",
]
