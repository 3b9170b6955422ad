"""The full GPU check of the TensorRT-LLM path, in one command (``scripts/gpu_check.sh``).

Run inside the project's Triton image (``docker/triton.Dockerfile``) with this checkout mounted
and a small dense Hugging Face checkpoint, e.g. Qwen/Qwen2.5-0.5B-Instruct or
TinyLlama/TinyLlama-1.1B-Chat-v1.0 (any dense model whose KV heads divide by 2, with a
``tokenizer.json``)::

    scripts/gpu_check.sh --model /models/qwen2.5-0.5b-instruct [--workdir DIR] [--dry-run]

It prints one line per check, ``PASS|FAIL|SKIP name: detail``, then a summary; every wait has a
deadline and the whole run one (``--deadline-s``, default 570 s; the shell wrapper adds a hard
600 s ``timeout``). Exit status: 0 every check that could run passed and a GPU and TensorRT-LLM
were present; 1 a check failed; 2 nothing failed but the GPU prerequisites were missing (so
nothing on the GPU path was checked). ``--dry-run`` renders the repositories and prints the
plan (checks, what each would skip, the exact commands and environments) and starts nothing.

The checks cover the audit's "What to check first on a GPU" list (../shared/TRTLLM_AUDIT.md):
versions (6a), the connector's bases, the cross-device write (2c), prefill and decode Triton
servers with the connector, a relayed request equal to a local one (3a; the plan carrier), a
warm prefix on the decode (1e), TP=2 (1f) and genai-perf against the front door (4e); plus the
connector contract tests on ``cuda`` (issue 12 item 7a) and the decoupled policy with
auto-complete disabled (5b). ``tensorrt_llm`` is never imported at module level.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtllm_prfaas.deploy.contract import connector_contract_problems, parse_model_config
from trtllm_prfaas.deploy.env import DeployRole
from trtllm_prfaas.deploy.gpu_checklist import (
    CHECKS,
    Check,
    CheckResult,
    Environment,
    Status,
    probe_environment,
    skip_reason,
)
from trtllm_prfaas.deploy.gpu_serving import worker_args
from trtllm_prfaas.deploy.gpu_stack import MODEL_NAME, Stack, StackLayout, StackPlan, render
from trtllm_prfaas.deploy.triton_repo import model_yaml_dict
from trtllm_prfaas.errors import PrfaasError

__all__ = [
    "CHECKS",
    "CheckFailed",
    "CheckResult",
    "Environment",
    "GpuCheckConfig",
    "Session",
    "Status",
    "main",
    "parse_args",
    "probe_environment",
    "run_checks",
    "skip_reason",
]

DEFAULT_DEADLINE_S = 570.0


@dataclass(frozen=True)
class GpuCheckConfig:
    model: Path
    workdir: Path
    repo_root: Path
    deadline_s: float = DEFAULT_DEADLINE_S
    base_port: int = 18000
    llmapi_dir: Path = Path("/opt/prfaas/llmapi")
    max_tokens: int = 16
    dry_run: bool = False
    skip: frozenset[str] = frozenset()  # check names not to run

    def layout(self, tensor_parallel_size: int, num_gpus: int) -> StackLayout:
        return StackLayout(
            self.model,
            self.workdir,
            tensor_parallel_size,
            num_gpus,
            self.base_port + (1000 if tensor_parallel_size > 1 else 0),
            self.llmapi_dir,
        )


def parse_args(argv: Sequence[str]) -> GpuCheckConfig:
    """The command line (``scripts/gpu_check.sh`` passes ``--repo-root``)."""
    parser = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="small dense HF checkpoint dir")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--repo-root", type=Path, default=Path.cwd(), help="this checkout")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S)
    parser.add_argument("--base-port", type=int, default=18000)
    parser.add_argument("--llmapi-dir", type=Path, default=Path("/opt/prfaas/llmapi"))
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    parser.add_argument(
        "--skip", action="append", default=[], choices=[c.name for c in CHECKS], metavar="CHECK",
        help="do not run CHECK (repeatable), e.g. connector_contract_cuda when run apart",
    )  # fmt: skip
    args = parser.parse_args(list(argv))
    if not 0 < args.deadline_s <= 590:
        parser.error("--deadline-s must be in (0, 590]: the whole check stays under ten minutes")
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2 (a relayed request has a decode leg)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prfaas-gpu-check-"))
    return GpuCheckConfig(
        model=args.model,
        workdir=workdir,
        repo_root=args.repo_root,
        deadline_s=args.deadline_s,
        base_port=args.base_port,
        llmapi_dir=args.llmapi_dir,
        max_tokens=args.max_tokens,
        dry_run=args.dry_run,
        skip=frozenset(args.skip),
    )


class CheckFailed(PrfaasError):
    """A check's assertion did not hold; its message is the FAIL line's detail."""


@dataclass
class Session:
    """One run: the checks' shared state (stacks, serving, tokenizer); ``close`` stops it all."""

    config: GpuCheckConfig
    env: Environment
    plans: dict[int, StackPlan] = field(default_factory=dict)
    stack: Stack | None = None
    serving: Any = None

    def plan(self, tensor_parallel_size: int) -> StackPlan:
        if tensor_parallel_size not in self.plans:
            layout = self.config.layout(tensor_parallel_size, self.env.num_gpus)
            self.plans[tensor_parallel_size] = render(layout)
        return self.plans[tensor_parallel_size]

    def stop(self) -> None:
        """Stop the serving side, then the Triton servers (children by process group)."""
        try:
            if self.serving is not None:
                self.serving.close()
        finally:
            self.serving = None
            if self.stack is not None:
                self.stack.close()
            self.stack = None


def run_checks(
    session: Session, report: Callable[[CheckResult], None], clock: Callable[[], float]
) -> list[CheckResult]:
    """Every check in order, each bounded by its cap and the total deadline; ``report`` gets
    each result as soon as it is known. Stops everything it started before returning."""
    from trtllm_prfaas.deploy import gpu_steps

    end = clock() + session.config.deadline_s
    results: dict[str, CheckResult] = {}
    try:
        for check in CHECKS:
            reason = _skip_reason(check, session, results)
            if reason is None and clock() >= end:
                reason = "the total deadline was reached"
            if reason is not None:
                result = CheckResult(check.name, Status.SKIP, reason)
            else:
                result = _run_one(
                    check, gpu_steps.STEPS[check.name], session, min(end, clock() + check.cap_s)
                )
            results[check.name] = result
            report(result)
    finally:
        session.stop()
    return list(results.values())


def _run_one(
    check: Check, step: Callable[[Session, float], str], session: Session, deadline: float
) -> CheckResult:
    try:
        return CheckResult(check.name, Status.PASS, step(session, deadline))
    except Exception as exc:  # every failure becomes this check's FAIL line, never a crash
        return CheckResult(check.name, Status.FAIL, f"{type(exc).__name__}: {exc}")


def _skip_reason(check: Check, session: Session, results: dict[str, CheckResult]) -> str | None:
    if check.name in session.config.skip:
        return "--skip"
    return skip_reason(check, session.env, results)


def dry_run(session: Session) -> list[str]:
    """The plan: each check with what it shows and what it would skip, then the commands."""
    lines = [f"workdir: {session.config.workdir}", f"model: {session.config.model}"]
    pending: dict[str, CheckResult] = {}
    for check in CHECKS:
        reason = _skip_reason(check, session, pending)
        note = f" (would SKIP: {reason})" if reason else ""
        lines.append(f"PLAN {check.name}: {check.what}{note}")
        status = Status.SKIP if reason else Status.PASS  # assume what can run passes
        pending[check.name] = CheckResult(check.name, status, "")
    sizes = (1, 2) if session.env.num_gpus >= 2 else (1,)
    for tp in sizes:
        plan = session.plan(tp)
        lines += plan.describe()
        for role in plan.tritons:
            lines.append(
                f"tp{tp} {role.value} worker: prfaas worker {' '.join(worker_args(plan, role))}"
            )
        problems = repository_problems(plan)
        lines.append(f"tp{tp} repositories: {'ok' if not problems else '; '.join(problems)}")
    return lines


def repository_problems(plan: StackPlan) -> list[str]:
    """What is wrong with a rendered stack: contract breaches, a bad config.pbtxt, a missing
    NVIDIA model.py (the image puts it in ``/opt/prfaas/llmapi``)."""
    problems: list[str] = []
    for role, config in plan.repo_configs.items():
        model_dir = plan.layout.repo_dir(role) / MODEL_NAME
        problems += [
            f"{role.value}: {p}" for p in connector_contract_problems(model_yaml_dict(config))
        ]
        parsed = parse_model_config((model_dir / "config.pbtxt").read_text())
        if parsed.model_transaction_policy.decoupled is not (role is DeployRole.DECODE):
            problems.append(f"{role.value}: config.pbtxt decoupled policy is wrong")
        if not (model_dir / "1" / "model.py").is_file():
            problems.append(f"{role.value}: no 1/model.py (NVIDIA's llmapi model, --llmapi-dir)")
    return problems


def summary(results: Sequence[CheckResult]) -> tuple[str, int]:
    """The summary line and the exit status (see the module docstring)."""
    counts = {s: sum(r.status is s for r in results) for s in Status}
    line = ", ".join(f"{counts[s]} {s.value.lower()}" for s in Status)
    by_name = {r.name: r for r in results}
    if counts[Status.FAIL]:
        return f"summary: {line}", 1
    prerequisites = ("versions", "cuda")
    if any(by_name[n].status is Status.SKIP for n in prerequisites if n in by_name):
        return f"summary: {line}; no GPU path was checked (GPU or TensorRT-LLM missing)", 2
    return f"summary: {line}", 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    config.workdir.mkdir(parents=True, exist_ok=True)
    session = Session(config, probe_environment(config.repo_root))
    if config.dry_run:
        for line in dry_run(session):
            print(line, flush=True)
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)  # the wrapper's timeout: clean up, then exit
    print(f"workdir: {config.workdir}", flush=True)
    results = run_checks(session, lambda r: print(r.line(), flush=True), time.monotonic)
    line, code = summary(results)
    print(line, flush=True)
    return code


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    raise SystemExit(main())
