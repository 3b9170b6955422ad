"""Small builders with keyword defaults shared by the policy tests."""

from __future__ import annotations

from trtllm_prfaas.policy.model import Workload
from trtllm_prfaas.policy.profile import ClusterProfile, KvSize, QuadraticLatency, SystemProfile
from trtllm_prfaas.policy.workload import HistogramLengths


def toy_system(
    *,
    link_gbps: float = 100.0,
    kv_per_token_bytes: float = 1e6,
    decode_slots: int = 10,
    decode_step_s: float = 0.05,
) -> SystemProfile:
    """PrfaaS T(l) = 0.1 + 1e-4 l; PD T(l) = 0.5 + 5e-4 l; KV 1 MB per token, no fixed part."""
    kv = KvSize(fixed_bytes=0.0, per_token_bytes=kv_per_token_bytes)
    prfaas = ClusterProfile("fast", QuadraticLatency(0.1, 1e-4, 0.0), kv)
    pd = ClusterProfile("slow", QuadraticLatency(0.5, 5e-4, 0.0), kv, decode_slots, decode_step_s)
    return SystemProfile(prfaas=prfaas, pd=pd, link_gbps=link_gbps)


def two_bin_workload(*, output_tokens: int = 100) -> Workload:
    """Lengths uniform on (0, 4000]: half in each of two 2000-token bins."""
    return Workload(HistogramLengths((0.0, 2000.0, 4000.0), (1.0, 1.0)), output_tokens)
