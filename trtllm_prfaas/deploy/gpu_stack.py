"""The processes the GPU check starts: two Triton servers with the connector, workers, a router.

Pure part (tested on CPU): ``StackLayout`` fixes ports, GPUs and tensor-parallel size; ``render``
writes both model repositories, their ``prfaas.env`` files and Curve keys into a work directory
and returns the exact commands and environments it would start (``StackPlan``).

Runtime part (GPU only): ``Stack`` starts them (Triton as upstream launches ``llmapi``:
``mpirun --allow-run-as-root -n 1 tritonserver ... --disable-auto-complete-config``; see
TensorRT-LLM ``triton_backend/scripts/launch_triton_server.py`` @ 0a2e2c1), waits for each with a
deadline, sends requests, and stops every child by PID on ``close()`` (a context manager).
Nothing here imports ``tensorrt_llm``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from trtllm_prfaas.deploy.env import DeployRole
from trtllm_prfaas.deploy.triton_repo import (
    RelayEnvConfig,
    TritonRepoConfig,
    triton_repo_config,
    write_repository,
)
from trtllm_prfaas.errors import DeadlineExceeded, PrfaasError

__all__ = ["Stack", "StackLayout", "StackPlan", "TritonPlan", "render"]

MODEL_NAME = "tensorrt_llm"
_ROLES = (DeployRole.PREFILL, DeployRole.DECODE)


@dataclass(frozen=True)
class StackLayout:
    """Where everything listens and runs, for one tensor-parallel size (both sides equal)."""

    model: Path
    workdir: Path
    tensor_parallel_size: int = 1
    num_gpus: int = 1
    base_port: int = 18000
    llmapi_dir: Path = Path("/opt/prfaas/llmapi")  # NVIDIA's model.py/helpers.py in the image

    def gpus(self, role: DeployRole) -> str:
        """CUDA_VISIBLE_DEVICES of ``role``: disjoint GPUs when there are enough, else shared."""
        tp = self.tensor_parallel_size
        first = tp if role is DeployRole.DECODE and self.num_gpus >= 2 * tp else 0
        return ",".join(str(first + i) for i in range(tp))

    @property
    def shares_gpus(self) -> bool:
        return self.num_gpus < 2 * self.tensor_parallel_size

    def port(self, role: DeployRole, offset: int) -> int:
        """Triton ports: prefill base+0..2, decode base+10..12 (HTTP, gRPC, metrics)."""
        return self.base_port + (10 if role is DeployRole.DECODE else 0) + offset

    @property
    def relay_bind(self) -> str:
        return f"tcp://127.0.0.1:{self.base_port + 100}"  # decode rank r binds port + r

    def plan_bind(self, role: DeployRole) -> str:
        offset = 300 if role is DeployRole.DECODE else 200  # rank r binds port + r
        return f"tcp://127.0.0.1:{self.base_port + offset}"

    def plan_endpoints(self, role: DeployRole) -> list[str]:
        """The plan servers of ``role``'s ranks, in rank order (port + rank)."""
        host, port = self.plan_bind(role).rsplit(":", 1)
        return [f"{host}:{int(port) + rank}" for rank in range(self.tensor_parallel_size)]

    def control(self, role: DeployRole) -> str:
        return f"tcp://127.0.0.1:{self.base_port + (21 if role is DeployRole.DECODE else 20)}"

    @property
    def router_port(self) -> int:
        return self.base_port + 30

    @property
    def tag(self) -> str:
        return f"tp{self.tensor_parallel_size}"

    def repo_dir(self, role: DeployRole) -> Path:
        return self.workdir / self.tag / role.value

    @property
    def key_dir(self) -> Path:
        return self.workdir / "keys"


@dataclass(frozen=True)
class TritonPlan:
    """One Triton server: its command, the variables it adds to the environment, its gRPC URL."""

    role: DeployRole
    command: list[str]
    env: dict[str, str]
    grpc_url: str
    repo_dir: Path
    log_path: Path


@dataclass(frozen=True)
class StackPlan:
    layout: StackLayout
    tritons: dict[DeployRole, TritonPlan]
    repo_configs: dict[DeployRole, TritonRepoConfig]
    files: list[Path] = field(default_factory=list)

    def describe(self) -> list[str]:
        """Human-readable lines: what would be started, with which environment."""
        lines = []
        for role, triton in self.tritons.items():
            env = " ".join(f"{k}={v}" for k, v in sorted(triton.env.items()))
            lines.append(f"{self.layout.tag} {role.value} triton: {' '.join(triton.command)}")
            lines.append(f"{self.layout.tag} {role.value} env: {env}")
        return lines


def repo_config(layout: StackLayout, role: DeployRole) -> TritonRepoConfig:
    """The rendered repository of ``role``: the presets, sized for a small model on loopback."""
    bind = layout.relay_bind if role is DeployRole.DECODE else None
    relay = RelayEnvConfig.with_key_dir(
        role,
        str(layout.key_dir),
        relay_bind=bind,
        plan_bind=layout.plan_bind(role),
        transfer_timeout_s=30.0,
    )
    return triton_repo_config(
        role,
        str(layout.model),
        relay=relay,
        tensor_parallel_size=layout.tensor_parallel_size,
        max_batch_size=8,
        max_num_tokens=2048,
        max_seq_len=4096,
        max_input_len=3072,
        free_gpu_memory_fraction=0.35 if layout.shares_gpus else 0.8,
    )


def triton_command(
    layout: StackLayout, role: DeployRole, tritonserver: str = "tritonserver"
) -> list[str]:
    """Upstream's llmapi launch (world size 1), with this role's ports and its own shm prefix."""
    return [
        "mpirun",
        "--allow-run-as-root",
        "-n",
        "1",
        tritonserver,
        f"--model-repository={layout.repo_dir(role)}",
        f"--http-port={layout.port(role, 0)}",
        f"--grpc-port={layout.port(role, 1)}",
        f"--metrics-port={layout.port(role, 2)}",
        "--disable-auto-complete-config",
        f"--backend-config=python,shm-region-prefix-name=prfaas_{role.value}_",
    ]


def write_keys(key_dir: Path) -> None:
    """Curve key pairs named as ``RelayEnvConfig.with_key_dir`` expects (secrets mode 0600)."""
    key_dir.mkdir(parents=True, exist_ok=True)
    for name in ("prefill", "decode", "worker"):
        public, secret = zmq.curve_keypair()
        (key_dir / f"{name}.public").write_bytes(public)
        fd = os.open(key_dir / f"{name}.secret", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret)


def render(layout: StackLayout, tritonserver: str = "tritonserver") -> StackPlan:
    """Write keys and both repositories under ``layout.workdir``; NVIDIA's ``model.py`` and
    ``helpers.py`` are copied in when ``layout.llmapi_dir`` has them. Returns the plan."""
    write_keys(layout.key_dir)
    files: list[Path] = []
    tritons: dict[DeployRole, TritonPlan] = {}
    configs: dict[DeployRole, TritonRepoConfig] = {}
    for role in _ROLES:
        config = configs[role] = repo_config(layout, role)
        files += write_repository(config, layout.repo_dir(role))
        model_dir = layout.repo_dir(role) / MODEL_NAME / "1"
        for source in sorted(layout.llmapi_dir.glob("*.py")) if layout.llmapi_dir.is_dir() else []:
            files.append(Path(shutil.copy(source, model_dir / source.name)))
        env = {**config.relay.env(), "CUDA_VISIBLE_DEVICES": layout.gpus(role)}
        tritons[role] = TritonPlan(
            role,
            triton_command(layout, role, tritonserver),
            env,
            f"127.0.0.1:{layout.port(role, 1)}",
            layout.repo_dir(role),
            layout.workdir / f"{layout.tag}-{role.value}-triton.log",
        )
    return StackPlan(layout, tritons, configs, files)


class Stack:
    """The running servers of one ``StackPlan``; ``close()`` stops each child by PID and waits."""

    def __init__(self, plan: StackPlan) -> None:
        self.plan = plan
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    def start_tritons(self) -> None:
        for role, triton in self.plan.tritons.items():
            log = triton.log_path.open("wb")
            self._logs.append(log)
            self.processes[f"triton-{role.value}"] = subprocess.Popen(
                triton.command,
                env={**os.environ, **triton.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # mpirun's children are stopped with it (by group)
            )

    def wait_ready(self, deadline: float) -> None:
        """Both models ready, or DeadlineExceeded / PrfaasError naming the server that is not."""
        import tritonclient.grpc as grpcclient

        for role, triton in self.plan.tritons.items():
            client = grpcclient.InferenceServerClient(triton.grpc_url)
            try:
                while not _is_ready(client):
                    process = self.processes[f"triton-{role.value}"]
                    if process.poll() is not None:
                        raise PrfaasError(
                            f"{role.value} tritonserver exited with {process.returncode} "
                            f"(log: {triton.log_path})"
                        )
                    if time.monotonic() > deadline:
                        raise DeadlineExceeded(f"{role.value} Triton not ready ({triton.log_path})")
                    time.sleep(1.0)
            finally:
                client.close()

    def log_text(self, role: DeployRole) -> str:
        """What ``role``'s tritonserver (and the MPI workers under it) printed so far."""
        path = self.plan.tritons[role].log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self, timeout_s: float = 30.0) -> None:
        """SIGTERM each process group, wait, SIGKILL what is left. Idempotent."""
        for process in self.processes.values():
            _stop_group(process, timeout_s)
        self.processes.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_ready(client: Any) -> bool:
    try:
        return bool(client.is_model_ready(MODEL_NAME))
    except Exception:  # not listening yet: the server is still starting
        return False


def _stop_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait(10)
