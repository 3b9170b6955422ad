"""The body of each GPU check (``gpu_check.CHECKS``): ``STEPS[name](session, deadline) -> detail``.

A step returns its PASS detail or raises (``CheckFailed`` for a claim that did not hold; any
other exception is reported the same way by the runner). Every wait is bounded by ``deadline``
(``time.monotonic()`` seconds). GPU-only imports (torch CUDA, ``tensorrt_llm`` through the
connector, tritonclient calls) happen inside the steps, never at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trtllm_prfaas.deploy import versions
from trtllm_prfaas.deploy.env import DeployRole
from trtllm_prfaas.deploy.gpu_check import CheckFailed, Session, repository_problems
from trtllm_prfaas.deploy.gpu_checklist import CONTRACT_RUNNER, LOG_PROBLEMS, PLAN_MISSING
from trtllm_prfaas.deploy.gpu_serving import (
    Serving,
    generate_local,
    generate_relayed,
    stream_text,
    warm_prefix_prompts,
)
from trtllm_prfaas.deploy.gpu_stack import MODEL_NAME, Stack, StackPlan

__all__ = ["STEPS"]


def _left(deadline: float) -> float:
    """Seconds left before ``deadline``; CheckFailed when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise CheckFailed("out of time")
    return left


def versions_step(session: Session, deadline: float) -> str:
    installed = session.env.trtllm_version or ""
    version = installed.split("+")[0]
    tag = session.env.triton_tag
    versions.check_installed(versions.trtllm_ref(version), installed, tag)
    where = f"in Triton {tag}" if tag else "not in a Triton container (no tag to match)"
    return f"tensorrt_llm {version} {where}"


def _package_digest(package_dir: Path) -> str:
    """sha256 over the package's ``.py`` files (relative path and content), in path order."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(str(path.relative_to(package_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def installed_project_step(session: Session, deadline: float) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import os, trtllm_prfaas; print(os.path.dirname(trtllm_prfaas.__file__))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
        timeout=_left(deadline), check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise CheckFailed("trtllm_prfaas is not installed outside this checkout")
    installed = Path(done.stdout.strip())
    checkout = session.config.repo_root / "trtllm_prfaas"
    if _package_digest(installed) != _package_digest(checkout):
        raise CheckFailed(
            f"{installed} differs from {checkout}: rebuild the image from this checkout "
            "(docker build -f docker/triton.Dockerfile ...)"
        )
    return f"{installed} equals {checkout}"


def cuda_step(session: Session, deadline: float) -> str:
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} device(s): {', '.join(names)}; torch {torch.__version__}"


_INDEX_PUT_PROBE = (
    "import torch; pool = torch.zeros(4, 3, device='cuda')\n"
    "try:\n"
    "    pool[torch.tensor([0, 1])] = torch.ones(2, 3); torch.cuda.synchronize()\n"
    "    print('WROTE')\n"
    "except RuntimeError as exc:\n"
    "    print('RAISED', str(exc).splitlines()[0])\n"
)


def cross_device_step(session: Session, deadline: float) -> str:
    """In a child process, so this one never holds a CUDA context beside the servers."""
    done = subprocess.run(
        [sys.executable, "-c", _INDEX_PUT_PROBE], capture_output=True, text=True,
        timeout=_left(deadline), check=False,
    )  # fmt: skip
    answer = done.stdout.strip()
    if answer.startswith("RAISED"):
        return f"raises as read from source: {answer.removeprefix('RAISED ')}"
    if answer == "WROTE":
        raise CheckFailed(
            "the write succeeded: the audit's 2c reading is wrong (loads copy anyway)"
        )
    raise CheckFailed(f"the probe failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


_BASES_PROBE = (
    "import json; from trtllm_prfaas.connector import prfaas; "
    "halves = (prfaas.PrfaasConnectorScheduler, prfaas.PrfaasConnectorWorker); "
    "print(json.dumps(sorted({c.__module__ for h in halves for c in h.__mro__})))"
)


def connector_bases_step(session: Session, deadline: float) -> str:
    """In a child process: importing tensorrt_llm initialises MPI (mpi4py), and a process that
    did must not launch ``mpirun`` itself (its OMPI/PMIx variables would leak into the job)."""
    done = subprocess.run(
        [sys.executable, "-c", _BASES_PROBE], cwd=session.config.repo_root, capture_output=True,
        text=True, timeout=_left(deadline), check=False,
    )  # fmt: skip
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise CheckFailed(f"importing the connector failed: {tail[0]}")
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    upstream = sorted(m for m in modules if m.startswith("tensorrt_llm."))
    if not upstream:
        raise CheckFailed(f"no TensorRT-LLM base class in the connector's MRO: {sorted(modules)}")
    return "bases from " + ", ".join(upstream)


def contract_step(session: Session, deadline: float) -> str:
    """The 7a runner (one line per check, ``DONE  N failed`` last); its FAIL lines are named."""
    module = ".".join(CONTRACT_RUNNER.with_suffix("").parts)
    done = subprocess.run(
        [sys.executable, "-m", module], cwd=session.config.repo_root, capture_output=True,
        text=True, timeout=_left(deadline), check=False,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    failed = [line.split()[1] for line in lines if line.startswith("FAIL")]
    summary = lines[-1] if lines else "(no output)"
    if done.returncode != 0:
        raise CheckFailed(f"python -m {module} exited {done.returncode}: {summary}; {failed[:5]}")
    return f"{summary} ({sum(ln.startswith('PASS') for ln in lines)} passed)"


def repositories_step(session: Session, deadline: float) -> str:
    plan = session.plan(1)
    problems = repository_problems(plan)
    if problems:
        raise CheckFailed("; ".join(problems))
    layout = plan.layout
    gpus = {role.value: layout.gpus(role) for role in plan.tritons}
    return f"{layout.workdir / layout.tag}: TP 1, GPUs {gpus}"


def _start_stack(session: Session, plan: StackPlan, deadline: float) -> str:
    session.stop()  # one stack at a time: the previous one's GPUs and ports are freed first
    started = time.monotonic()
    session.stack = Stack(plan)
    session.stack.start_tritons()
    session.stack.wait_ready(deadline)
    logs = ", ".join(str(t.log_path) for t in plan.tritons.values())
    return f"both ready in {time.monotonic() - started:.0f} s (logs {logs})"


def triton_tp1_step(session: Session, deadline: float) -> str:
    return _start_stack(session, session.plan(1), deadline)


def _model_config(url: str) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        config: dict[str, Any] = client.get_model_config(MODEL_NAME, as_json=True)["config"]
        return config
    finally:
        client.close()


def decoupled_step(session: Session, deadline: float) -> str:
    found = {}
    for role, triton in session.plan(1).tritons.items():
        policy = _model_config(triton.grpc_url).get("model_transaction_policy", {})
        found[role] = bool(policy.get("decoupled", False))
    if found != {DeployRole.PREFILL: False, DeployRole.DECODE: True}:
        raise CheckFailed(f"decoupled: { ({r.value: v for r, v in found.items()}) }")
    return "decode decoupled, prefill not (auto-complete disabled)"


def prefill_streaming_step(session: Session, deadline: float) -> str:
    url = session.plan(1).tritons[DeployRole.PREFILL].grpc_url
    try:
        text = stream_text(url, "Hello", 2, streaming=True, timeout_s=_left(deadline))
    except Exception as exc:
        if "decoupled" in str(exc):
            return f"refused: {str(exc).splitlines()[0][:160]}"
        raise
    raise CheckFailed(f"the prefill streamed ({text!r}): upstream's refusal is gone")


def serving_step(session: Session, deadline: float) -> str:
    session.serving = Serving(session.plan(1), timeout_s=_left(deadline))
    controls = {n: w.control for n, w in session.serving.workers.items()}
    return f"router {session.serving.url}, workers {controls}"


def _tokenizer(model: Path) -> Any:
    from tokenizers import Tokenizer

    path = model / "tokenizer.json"
    if not path.is_file():
        raise CheckFailed(f"{path} is missing: the check needs the model's fast tokenizer")
    return Tokenizer.from_file(str(path))


def _relayed_vs_local(session: Session, plan: StackPlan, prompt: str, deadline: float) -> str:
    """Relayed (router) then local (decode Triton) answers of ``prompt``; equal, and counted
    relayed by the router. Returns the detail."""
    tokenizer = _tokenizer(session.config.model)
    serving, max_tokens = session.serving, session.config.max_tokens
    prompt_ids = tokenizer.encode(prompt).ids
    before = serving.relay_counts()
    ids = generate_relayed(serving.url, prompt_ids, max_tokens, _left(deadline))
    after = serving.relay_counts()
    relayed = tokenizer.decode(ids, skip_special_tokens=True)
    local = generate_local(plan, prompt, max_tokens, _left(deadline))
    if relayed != local:
        raise CheckFailed(f"relayed {relayed!r} != local {local!r}")
    if after.relayed - before.relayed != 1 or after.recomputed != before.recomputed:
        raise CheckFailed(
            f"equal text, but the router counted relayed +{after.relayed - before.relayed}, "
            f"recomputed +{after.recomputed - before.recomputed}: the decode did not use the relay"
        )
    return f"{len(prompt_ids)}-token prompt, {len(ids)} tokens equal, counted relayed"


def relayed_step(session: Session, deadline: float) -> str:
    cubes = " ".join(f"Fact {i}: {i} cubed is {i**3}." for i in range(12))
    return _relayed_vs_local(session, session.plan(1), f"{cubes}\nSo 5 cubed is", deadline)


def warm_prefix_step(session: Session, deadline: float) -> str:
    plan = session.plan(1)
    first, second = warm_prefix_prompts()
    generate_local(plan, first, 2, _left(deadline))  # caches the shared prefix on the decode
    detail = _relayed_vs_local(session, plan, second, deadline)
    assert session.stack is not None
    process = session.stack.processes["triton-decode"]
    if process.poll() is not None:
        raise CheckFailed(f"the decode Triton exited with {process.returncode}")
    return f"shared prefix cached on the decode; {detail}"


def genai_perf_step(session: Session, deadline: float) -> str:
    artifacts = session.config.workdir / "genai-perf"
    command = [
        "genai-perf", "profile", "-m", MODEL_NAME, "--service-kind", "triton",
        "--backend", "tensorrtllm", "-u", session.serving.url, "--tokenizer",
        str(session.config.model), "--num-prompts", "4", "--concurrency", "1",
        "--synthetic-input-tokens-mean", "64", "--output-tokens-mean", "8",
        "--artifact-dir", str(artifacts),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=_left(deadline), check=False
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["(no output)"]
        raise CheckFailed(f"genai-perf exited {done.returncode}: {tail[0]}")
    return f"genai-perf completed (artifacts {artifacts})"


def _log_problems(stack: Stack) -> list[str]:
    """Up to five log lines that show a known failure (see ``gpu_check.LOG_PROBLEMS``)."""
    found: list[str] = []
    for role in stack.plan.tritons:
        patterns = (*LOG_PROBLEMS, PLAN_MISSING) if role is DeployRole.PREFILL else LOG_PROBLEMS
        lines = stack.log_text(role).splitlines()
        found += [
            f"{role.value}: {ln.strip()[:150]}" for ln in lines if any(p in ln for p in patterns)
        ]
    return found[:5]


def logs_step(session: Session, deadline: float) -> str:
    assert session.stack is not None
    problems = _log_problems(session.stack)
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"none of {len(LOG_PROBLEMS) + 1} known failure patterns in the Triton logs"


def tp2_step(session: Session, deadline: float) -> str:
    plan = session.plan(2)
    problems = repository_problems(plan)
    if problems:
        raise CheckFailed("; ".join(problems))
    _start_stack(session, plan, deadline)
    session.serving = Serving(plan, timeout_s=_left(deadline))
    cubes = " ".join(f"Fact {i}: {i} cubed is {i**3}." for i in range(12))
    detail = _relayed_vs_local(session, plan, f"{cubes}\nSo 6 cubed is", deadline)
    assert session.stack is not None
    log_problems = _log_problems(session.stack)
    if log_problems:
        raise CheckFailed(f"{detail}, but the logs show: {'; '.join(log_problems)}")
    return (
        f"TP 2 both sides (GPUs {plan.layout.gpus(DeployRole.PREFILL)} / "
        f"{plan.layout.gpus(DeployRole.DECODE)}); {detail}"
    )


STEPS: dict[str, Callable[[Session, float], str]] = {
    "versions": versions_step,
    "image_has_this_checkout": installed_project_step,
    "cuda": cuda_step,
    "cross_device_index_put": cross_device_step,
    "connector_bases": connector_bases_step,
    "connector_contract_cuda": contract_step,
    "repositories": repositories_step,
    "triton_tp1": triton_tp1_step,
    "decoupled_policy": decoupled_step,
    "prefill_refuses_streaming": prefill_streaming_step,
    "serving_tp1": serving_step,
    "relayed_equals_local": relayed_step,
    "warm_prefix": warm_prefix_step,
    "genai_perf_front_door": genai_perf_step,
    "triton_logs_tp1": logs_step,
    "tp2_relayed_equals_local": tp2_step,
}
