"""The GPU check's list: each check, what it needs, the environment probe and the skip logic.

Pure data and functions (tested on CPU): ``CHECKS`` in run order, ``probe_environment`` (imports
torch, never ``tensorrt_llm``), ``skip_reason`` (a missing need, or an earlier check that did not
pass), and ``CheckResult.line`` (the ``PASS|FAIL|SKIP name: detail`` format). The bodies of the
checks are in ``gpu_steps``; the runner and command line in ``gpu_check``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = [
    "CHECKS",
    "CONTRACT_RUNNER",
    "LOG_PROBLEMS",
    "PLAN_MISSING",
    "Check",
    "CheckResult",
    "Environment",
    "Status",
    "probe_environment",
    "skip_reason",
]

CONTRACT_RUNNER = Path("tests/connector/gpu_contract.py")  # runs without pytest (7a)
# Lines that mean failure in either Triton log; PLAN_MISSING only in the prefill's (the check's
# local baseline requests reach the decode without a plan on purpose, and are logged so).
PLAN_MISSING = "prfaas_plan_missing"  # a request found no plan: the relay was inert for it
LOG_PROBLEMS = (
    "There must be at least one uncomputed token",  # kvCacheManager.cpp (audit 1e)
    "prepopulatedPromptLen",  # llmRequest.h setPrepopulatedPromptLen check (audit 1e)
    "relay receiver cannot bind",  # one bind for all TP ranks (audit 1f)
    "duplicate transfer id",  # every prefill rank sent rank 0's id (audit 1f)
    "Traceback (most recent call last)",
)


class Status(Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Check:
    """One check: its name, what it shows (with the audit item), and what it needs first:
    environment needs (``trtllm``, ``cuda``, ``gpus2``, ``triton``, ``contract_tests``,
    ``genai_perf``) or the names of earlier checks that must have passed."""

    name: str
    what: str
    needs: tuple[str, ...] = ()
    cap_s: float = 60.0  # this check's own bound (the total deadline may cut it shorter)


CHECKS: tuple[Check, ...] = (
    Check("versions", "tensorrt_llm is 1.2.x and matches the Triton tag (audit 6a)", ("trtllm",)),
    Check(
        "image_has_this_checkout",
        "the trtllm_prfaas installed in the image (what TensorRT-LLM's spawned MPI workers "
        "import: only TRTLLM*/TLLM* variables reach them, not PYTHONPATH) equals this checkout",
        ("trtllm",),
        cap_s=30.0,
    ),
    Check("cuda", "torch sees CUDA devices", ("cuda",)),
    Check(
        "cross_device_index_put",
        "a CUDA pool indexed with CPU values raises: loads must copy host-to-device (audit 2c)",
        ("cuda",),
    ),
    Check(
        "connector_bases",
        "the connector halves subclass TensorRT-LLM's KvCacheConnector bases (audit 1a)",
        ("trtllm", "cuda"),
    ),
    Check("repositories", "both rendered repositories pass the contract checks (audit 5a-5c)"),
    Check(
        "triton_tp1",
        "prefill and decode tritonserver load the model with the connector, launched as "
        "upstream (mpirun -n 1, --disable-auto-complete-config)",
        ("trtllm", "cuda", "triton", "repositories"),
        cap_s=300.0,
    ),
    Check(
        "decoupled_policy",
        "decode decoupled, prefill not, with auto-complete disabled (audit 5b)",
        ("triton_tp1",),
    ),
    Check(
        "prefill_refuses_streaming",
        "the non-decoupled prefill refuses streaming=True, so workers must call it unary "
        "(audit 4c)",
        ("triton_tp1",),
    ),
    Check(
        "serving_tp1",
        "prfaas workers (--engine triton) and the router start against both servers",
        ("triton_tp1",),
        cap_s=90.0,
    ),
    Check(
        "relayed_equals_local",
        "a relayed request's text equals the decode's local answer and the router counts it "
        "relayed, not recomputed (audit 3a, 1g: the plan carrier works)",
        ("serving_tp1",),
        cap_s=90.0,
    ),
    Check(
        "warm_prefix",
        "with the prompt's prefix already cached on the decode (block reuse), a relayed "
        "request still equals local and the decode stays up (audit 1e)",
        ("relayed_equals_local",),
        cap_s=90.0,
    ),
    Check(
        "genai_perf_front_door",
        "genai-perf --service-kind triton --backend tensorrtllm against the router (audit 4e)",
        ("serving_tp1", "genai_perf"),
        cap_s=60.0,
    ),
    Check(
        "triton_logs_tp1",
        "no plan miss, prepopulatedPromptLen check, bind error, duplicate transfer id or "
        "traceback in the Triton logs",
        ("triton_tp1",),
        cap_s=10.0,
    ),
    Check(
        "tp2_relayed_equals_local",
        "TP=2 on both sides: every rank binds its own relay and plan port, sends its own "
        "transfer id, and a relayed request equals local (audit 1f)",
        ("trtllm", "cuda", "gpus2", "triton", "repositories"),
        cap_s=300.0,
    ),
    # last: the servers are down by then, and it needs no Triton (also: scripts/gpu_contract.sh)
    Check(
        "connector_contract_cuda",
        "the connector contract with the fake executor's pools on cuda: staging, streams, "
        "events real (python -m tests.connector.gpu_contract, no pytest; issue 12, 7a)",
        ("cuda", "contract_tests"),
        cap_s=240.0,
    ),
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str

    def line(self) -> str:
        """``STATUS name: detail`` on one line (newlines folded, at most 400 characters)."""
        detail = " | ".join(part.strip() for part in self.detail.splitlines() if part.strip())
        if len(detail) > 400:
            detail = detail[:397] + "..."
        return f"{self.status.value} {self.name}: {detail}"


@dataclass(frozen=True)
class Environment:
    """What this machine has, probed once without importing ``tensorrt_llm``."""

    trtllm_version: str | None
    triton_tag: str | None  # NVIDIA_TRITON_SERVER_VERSION, set in Triton's containers
    num_gpus: int
    has_triton: bool  # tritonserver and mpirun on PATH
    has_contract_tests: bool  # tests/connector/gpu_contract.py in this checkout
    has_genai_perf: bool


def probe_environment(repo_root: Path) -> Environment:
    """The environment of this process (imports torch, never tensorrt_llm)."""
    try:
        trtllm: str | None = importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        trtllm = None
    return Environment(
        trtllm_version=trtllm,
        triton_tag=os.environ.get("NVIDIA_TRITON_SERVER_VERSION"),
        num_gpus=_num_gpus(),
        has_triton=bool(shutil.which("tritonserver") and shutil.which("mpirun")),
        has_contract_tests=(repo_root / CONTRACT_RUNNER).is_file(),
        has_genai_perf=shutil.which("genai-perf") is not None,
    )


def _num_gpus() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _environment_gap(need: str, env: Environment) -> str | None:
    gaps: dict[str, tuple[bool, str]] = {
        "trtllm": (
            env.trtllm_version is not None,
            "tensorrt_llm is not installed (run in the Triton image, docker/triton.Dockerfile)",
        ),
        "cuda": (env.num_gpus > 0, "no CUDA device visible to torch"),
        "gpus2": (env.num_gpus >= 2, f"TP=2 needs 2 GPUs, found {env.num_gpus}"),
        "triton": (env.has_triton, "tritonserver or mpirun is not on PATH"),
        "contract_tests": (
            env.has_contract_tests,
            f"this checkout has no {CONTRACT_RUNNER} (issue 12, 7a)",
        ),
        "genai_perf": (env.has_genai_perf, "genai-perf is not installed"),
    }
    ok, reason = gaps[need]
    return None if ok else reason


def skip_reason(check: Check, env: Environment, results: dict[str, CheckResult]) -> str | None:
    """Why ``check`` cannot run here (a missing need or an earlier check that did not pass)."""
    for need in check.needs:
        if need in results:
            if results[need].status is not Status.PASS:
                return f"needs {need} ({results[need].status.value})"
        elif (gap := _environment_gap(need, env)) is not None:
            return gap
    return None
