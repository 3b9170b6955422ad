"""Render the Triton ``llmapi`` model repository of a PrfaaS prefill or decode deployment.

A deployment is one Triton server running TensorRT-LLM's Python-backend ``llmapi`` model. Its
model directory holds (``write_repository`` writes all three)::

    <out>/<model_name>/config.pbtxt     Triton model config (Python backend, llmapi inputs/outputs)
    <out>/<model_name>/1/model.yaml     LLM-API arguments; the llmapi model passes every key but
                                        ``triton_config`` to ``LLM(...)``, so kv_connector_config
                                        goes here
    <out>/<model_name>/prfaas.env       the relay's TRTLLM_PRFAAS_* variables (docker --env-file)

``1/model.py`` (and its ``helpers.py``) is NVIDIA's and is not rendered here: it comes from the
TensorRT-LLM tag that matches the container (``triton_backend/all_models/llmapi``);
``docker/triton.Dockerfile`` copies it in.

Everything is rendered from frozen dataclasses validated without side effects; nothing here
reads the environment or the disk. ``triton_repo_config(role, model)`` gives the presets of
``engines/`` (H200 prefill, H20 decode).

Dense (attention-only) models only: on TensorRT-LLM the connector refuses a hybrid
(Mamba / linear-attention) model when it starts (upstream refuses connectors on Mamba cache
managers; on 1.2 hybrids also force block reuse off, so the decode's connector is never asked).
Serve hybrids with the reference engine, or with local prefill+decode (see docs/deployment.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trtllm_prfaas.deploy.contract import LLMAPI_INPUTS, LLMAPI_OUTPUTS, pbtxt_entries
from trtllm_prfaas.deploy.env import ENV_VARS, DeployRole
from trtllm_prfaas.errors import ConfigError

__all__ = [
    "CONNECTOR_MODULE",
    "CONNECTOR_SCHEDULER_CLASS",
    "CONNECTOR_WORKER_CLASS",
    "DEFAULT_KEY_DIR",
    "DEFAULT_PLAN_BIND",
    "TRITON_MAX_BATCH_SIZE",
    "LlmApiConfig",
    "RelayEnvConfig",
    "TritonRepoConfig",
    "model_yaml_dict",
    "render_config_pbtxt",
    "render_env_file",
    "render_model_yaml",
    "triton_repo_config",
    "write_repository",
]

CONNECTOR_MODULE = "trtllm_prfaas.connector.prfaas"
CONNECTOR_SCHEDULER_CLASS = "PrfaasConnectorScheduler"
CONNECTOR_WORKER_CLASS = "PrfaasConnectorWorker"
DEFAULT_KEY_DIR = "/etc/prfaas/curve"  # where the compose files mount the Curve key files
DEFAULT_PLAN_BIND = "tcp://0.0.0.0:7200"  # the connector's plan server, rank r on port + r
TRITON_MAX_BATCH_SIZE = 0  # the llmapi model batches inside TensorRT-LLM, not in Triton


@dataclass(frozen=True)
class RelayEnvConfig:
    """The relay half of a deployment, as the ``TRTLLM_PRFAAS_*`` variables carry it.

    Curve is mandatory on this path (a cross-datacenter link): both sides name their own key pair;
    the prefill side also names the decode relay's public key. The plan server (one per
    tensor-parallel rank, rank r on ``plan_bind``'s port + r) accepts plans only from the worker
    keys in ``plan_client_key_file``. Paths are as seen inside the container.
    """

    role: DeployRole
    curve_secret_key_file: str
    curve_public_key_file: str
    plan_client_key_file: str  # the worker public key(s) allowed to post plans
    curve_server_key_file: str | None = None
    curve_client_key_file: str | None = None  # decode: the prefill public key(s) it accepts
    relay_bind: str | None = None  # decode: rank r binds port + r
    relay_advertise: str | None = None  # decode: what prefill ranks reach (unset: relay_bind)
    plan_bind: str = DEFAULT_PLAN_BIND
    recv_buffer_bytes: int | None = None  # decode: per-rank receiver budget (None: the default)
    num_streams: int = 4
    link_gbps: float | None = None
    transfer_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.role is DeployRole.DECODE and not self.relay_bind:
            raise ConfigError("relay_bind: required on the decode side, e.g. tcp://0.0.0.0:7100")
        if self.role is DeployRole.PREFILL and self.relay_bind is not None:
            raise ConfigError("relay_bind: only the decode side binds a relay receiver")
        for name in ("relay_bind", "relay_advertise", "plan_bind"):
            value = getattr(self, name)
            if value is not None and not value.startswith("tcp://"):
                raise ConfigError(f"{name}: expected tcp://HOST:PORT, got {value!r}")
        if self.role is DeployRole.PREFILL and self.relay_advertise is not None:
            raise ConfigError("relay_advertise: only the decode side has a relay receiver")
        if self.recv_buffer_bytes is not None and (
            self.role is DeployRole.PREFILL or self.recv_buffer_bytes <= 0
        ):
            raise ConfigError("recv_buffer_bytes: a positive byte count, decode side only")
        if not self.plan_client_key_file:
            raise ConfigError("plan_client_key_file: name the worker keys allowed to post plans")
        if self.role is DeployRole.PREFILL and not self.curve_server_key_file:
            raise ConfigError("curve_server_key_file: the prefill side must authenticate decode")
        if self.role is DeployRole.DECODE and not self.curve_client_key_file:
            raise ConfigError("curve_client_key_file: the decode side must name the prefill keys")
        if self.role is DeployRole.PREFILL and self.curve_client_key_file is not None:
            raise ConfigError("curve_client_key_file: only the decode side accepts clients")
        if not 1 <= self.num_streams <= 64:
            raise ConfigError(f"num_streams: must be in [1, 64], got {self.num_streams}")
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise ConfigError("link_gbps: must be > 0 or None (no pacing)")
        if not self.transfer_timeout_s > 0:
            raise ConfigError("transfer_timeout_s: must be > 0")

    @classmethod
    def with_key_dir(
        cls, role: DeployRole, key_dir: str = DEFAULT_KEY_DIR, **fields: Any
    ) -> RelayEnvConfig:
        """Key files named ``<key_dir>/<role>.secret|.public`` (and the peer's ``.public``); the
        worker allowed to post plans is ``<key_dir>/worker.public``."""
        server = f"{key_dir}/decode.public" if role is DeployRole.PREFILL else None
        client = f"{key_dir}/prefill.public" if role is DeployRole.DECODE else None
        return cls(
            role=role,
            curve_secret_key_file=f"{key_dir}/{role.value}.secret",
            curve_public_key_file=f"{key_dir}/{role.value}.public",
            plan_client_key_file=f"{key_dir}/worker.public",
            curve_server_key_file=server,
            curve_client_key_file=client,
            **fields,
        )

    def env(self) -> dict[str, str]:
        """The variables to set on ``tritonserver``, in ``deploy.env.ENV_VARS`` order (the
        contract); unset ones left out. ConfigError if a value has no documented variable."""
        values: dict[str, str | None] = {
            "TRTLLM_PRFAAS_ROLE": self.role.value,
            "TRTLLM_PRFAAS_RELAY_BIND": self.relay_bind,
            "TRTLLM_PRFAAS_RELAY_ADVERTISE": self.relay_advertise,
            "TRTLLM_PRFAAS_NUM_STREAMS": str(self.num_streams),
            "TRTLLM_PRFAAS_CURVE_SECRET_KEY_FILE": self.curve_secret_key_file,
            "TRTLLM_PRFAAS_CURVE_PUBLIC_KEY_FILE": self.curve_public_key_file,
            "TRTLLM_PRFAAS_CURVE_SERVER_KEY_FILE": self.curve_server_key_file,
            "TRTLLM_PRFAAS_CURVE_CLIENT_KEY_FILE": self.curve_client_key_file,
            "TRTLLM_PRFAAS_PLAN_BIND": self.plan_bind,
            "TRTLLM_PRFAAS_PLAN_CLIENT_KEY_FILE": self.plan_client_key_file,
            "TRTLLM_PRFAAS_LINK_GBPS": None if self.link_gbps is None else f"{self.link_gbps:g}",
            "TRTLLM_PRFAAS_RECV_BUFFER_BYTES": (
                None if self.recv_buffer_bytes is None else str(self.recv_buffer_bytes)
            ),
            "TRTLLM_PRFAAS_TRANSFER_TIMEOUT_S": f"{self.transfer_timeout_s:g}",
        }
        undocumented = set(values) - {var.name for var in ENV_VARS}
        if undocumented:
            raise ConfigError(f"not in deploy/env.py's ENV_VARS: {sorted(undocumented)}")
        return {var.name: value for var in ENV_VARS if (value := values.get(var.name)) is not None}


@dataclass(frozen=True)
class LlmApiConfig:
    """The LLM-API knobs of ``model.yaml`` this project sets (TensorRT-LLM's field names)."""

    model: str
    tensor_parallel_size: int
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    max_input_len: int
    enable_chunked_prefill: bool = True
    tokens_per_block: int = 32
    free_gpu_memory_fraction: float = 0.9
    kv_cache_dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: a Hugging Face id or a path inside the container")
        for name in ("tensor_parallel_size", "max_batch_size", "max_num_tokens", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive int, got {value!r}")
        if not 0 < self.max_input_len < self.max_seq_len:
            raise ConfigError("max_input_len: must be in (0, max_seq_len) to leave output room")
        if self.tokens_per_block not in (8, 16, 32, 64, 128):
            raise ConfigError("tokens_per_block: expected a power of two in [8, 128]")
        if not 0 < self.free_gpu_memory_fraction <= 1:
            raise ConfigError("free_gpu_memory_fraction: must be in (0, 1]")
        if not self.enable_chunked_prefill and self.max_num_tokens < self.max_input_len:
            raise ConfigError("max_num_tokens: below max_input_len needs enable_chunked_prefill")


@dataclass(frozen=True)
class TritonRepoConfig:
    """One deployment's model repository: LLM-API args, relay env and Triton settings."""

    llm: LlmApiConfig
    relay: RelayEnvConfig
    model_name: str = "tensorrt_llm"
    decoupled: bool = False
    cancellation_check_period_ms: int = 100
    connector: tuple[str, str, str] = field(
        default=(CONNECTOR_MODULE, CONNECTOR_SCHEDULER_CLASS, CONNECTOR_WORKER_CLASS)
    )

    def __post_init__(self) -> None:
        if not self.model_name or "/" in self.model_name:
            raise ConfigError(f"model_name: not a valid Triton model name: {self.model_name!r}")
        if self.cancellation_check_period_ms <= 0:
            raise ConfigError("cancellation_check_period_ms: must be > 0")

    @property
    def role(self) -> DeployRole:
        return self.relay.role


# Presets; engines/h200_prefill.yaml and engines/h20_decode.yaml carry the same values with
# their reasons, and tests/deploy checks that they agree.
_PRESETS: dict[DeployRole, dict[str, Any]] = {
    DeployRole.PREFILL: dict(
        tensor_parallel_size=8,
        max_batch_size=8,
        max_num_tokens=16384,
        max_seq_len=132096,
        max_input_len=131072,
        free_gpu_memory_fraction=0.9,
    ),
    DeployRole.DECODE: dict(
        tensor_parallel_size=8,
        max_batch_size=20,
        max_num_tokens=1024,
        max_seq_len=132096,
        max_input_len=131072,
        free_gpu_memory_fraction=0.9,
    ),
}


def triton_repo_config(
    role: DeployRole,
    model: str,
    *,
    relay: RelayEnvConfig | None = None,
    model_name: str = "tensorrt_llm",
    **llm_overrides: Any,
) -> TritonRepoConfig:
    """The preset deployment for ``role`` (H200 prefill, H20 decode), with overrides.

    Without ``relay``, the decode side binds ``tcp://0.0.0.0:7100`` and keys live in
    ``DEFAULT_KEY_DIR``. Decode is decoupled (tokens stream back); prefill answers once.
    """
    if relay is None:
        bind = "tcp://0.0.0.0:7100" if role is DeployRole.DECODE else None
        relay = RelayEnvConfig.with_key_dir(role, relay_bind=bind)
    if relay.role is not role:
        raise ConfigError(f"relay.role: {relay.role.value} does not match role {role.value}")
    llm = LlmApiConfig(model=model, **{**_PRESETS[role], **llm_overrides})
    return TritonRepoConfig(
        llm=llm, relay=relay, model_name=model_name, decoupled=role is DeployRole.DECODE
    )


def model_yaml_dict(config: TritonRepoConfig) -> dict[str, Any]:
    """``model.yaml`` as a mapping (what ``render_model_yaml`` dumps)."""
    llm = config.llm
    module, scheduler_class, worker_class = config.connector
    return {
        "model": llm.model,
        "backend": "pytorch",  # the KV cache connector API exists only in the PyTorch backend
        "tensor_parallel_size": llm.tensor_parallel_size,
        "pipeline_parallel_size": 1,  # the connector API does not support pipeline parallelism
        "trust_remote_code": llm.trust_remote_code,
        "max_batch_size": llm.max_batch_size,
        "max_num_tokens": llm.max_num_tokens,
        "max_seq_len": llm.max_seq_len,
        "max_input_len": llm.max_input_len,
        "max_beam_width": 1,  # connectors support beam width 1 only
        "enable_chunked_prefill": llm.enable_chunked_prefill,
        "cuda_graph_config": None,  # CUDA graphs off: connector hooks run eagerly per layer
        "kv_cache_config": {
            "enable_block_reuse": True,  # the connector API requires block reuse
            "tokens_per_block": llm.tokens_per_block,
            "free_gpu_memory_fraction": llm.free_gpu_memory_fraction,
            "dtype": llm.kv_cache_dtype,
        },
        "scheduler_config": {
            "capacity_scheduler_policy": "GUARANTEED_NO_EVICT",
            "context_chunking_policy": "FIRST_COME_FIRST_SERVED",
        },
        "kv_connector_config": {
            "connector_module": module,
            "connector_scheduler_class": scheduler_class,
            "connector_worker_class": worker_class,
        },
        "triton_config": {
            "max_batch_size": TRITON_MAX_BATCH_SIZE,
            "decoupled": config.decoupled,
            "cancellation_check_period_ms": config.cancellation_check_period_ms,
        },
    }


def render_model_yaml(config: TritonRepoConfig) -> str:
    """``1/model.yaml``: a commented header, then the LLM-API arguments and ``triton_config``."""
    role = config.role.value
    header = (
        f"# PrfaaS {role} deployment: LLM-API arguments for Triton's llmapi model.\n"
        f"# Rendered by `prfaas triton-repo --role {role}`; edit the flags, not this file.\n"
        "# Everything except triton_config is passed to tensorrt_llm.LLM(...).\n"
        "# backend pytorch + kv_connector_config: the PrfaaS connector is loaded in every worker.\n"
        "# Dense models only: the connector refuses hybrid models on TensorRT-LLM.\n"
        "# The relay itself is configured by the TRTLLM_PRFAAS_* variables in ../prfaas.env,\n"
        "# since only TRTLLM/TLLM-prefixed variables reach TensorRT-LLM's MPI workers.\n"
    )
    body = yaml.safe_dump(model_yaml_dict(config), sort_keys=False, default_flow_style=False)
    return header + body


def render_config_pbtxt(config: TritonRepoConfig) -> str:
    """``config.pbtxt`` in protobuf text format (parses as ``model_config_pb2.ModelConfig``).

    ``max_batch_size`` and the decoupled policy are stated here AND in model.yaml's
    ``triton_config``, with the same values. Upstream's ``config.pbtxt`` leaves them to
    ``auto_complete_config`` (llmapi ``model.py``), but upstream's own launcher passes
    ``--disable-auto-complete-config`` (``triton_backend/scripts/launch_triton_server.py`` @
    0a2e2c1), which would leave the decode model non-decoupled. Stating them is safe with
    auto-complete on: the Python backend's ``ModelConfig.set_model_transaction_policy`` refuses
    only a *different* ``decoupled`` and ``set_max_batch_size`` only a larger configured value
    (triton-inference-server/python_backend ``src/resources/triton_python_backend_utils.py``).
    ``parameters`` carry the PrfaaS role so the router can check, through the ModelConfig RPC,
    that it talks to the right side. Inputs and outputs are upstream ``llmapi``'s, every one
    (``contract.LLMAPI_INPUTS`` / ``LLMAPI_OUTPUTS``: the tables the front door serves too).
    """
    decoupled = "true" if config.decoupled else "false"
    lines = [
        f"# PrfaaS {config.role.value} deployment (rendered by `prfaas triton-repo`).",
        f'name: "{config.model_name}"',
        'backend: "python"',
        "",
        "# The same values as triton_config in 1/model.yaml (TensorRT-LLM batches, not Triton);",
        "# stated here so the model loads alike with --disable-auto-complete-config.",
        f"max_batch_size: {TRITON_MAX_BATCH_SIZE}",
        f"model_transaction_policy {{ decoupled: {decoupled} }}",
        "",
        "# One Python-backend instance; TensorRT-LLM spawns one MPI worker per GPU itself.",
        "instance_group [ { count: 1, kind: KIND_CPU } ]",
        "",
        "input [",
    ]
    lines.append(pbtxt_entries(LLMAPI_INPUTS))
    lines += ["]", "", "output ["]
    lines.append(pbtxt_entries(LLMAPI_OUTPUTS))
    lines += ["]", ""]
    params = {"prfaas_role": config.role.value, "prfaas_connector_module": config.connector[0]}
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}", value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def render_env_file(config: TritonRepoConfig) -> str:
    """``prfaas.env``: ``KEY=VALUE`` lines for ``docker run --env-file`` / compose ``env_file``."""
    head = f"# PrfaaS {config.role.value} relay; see docs/deployment.md for each variable.\n"
    return head + "".join(f"{k}={v}\n" for k, v in config.relay.env().items())


def write_repository(config: TritonRepoConfig, out_dir: Path) -> list[Path]:
    """Write the model directory under ``out_dir`` (created if needed); returns the files written.

    Existing files of the same names are overwritten; nothing else in ``out_dir`` is touched.
    """
    model_dir = out_dir / config.model_name
    files = {
        model_dir / "config.pbtxt": render_config_pbtxt(config),
        model_dir / "1" / "model.yaml": render_model_yaml(config),
        model_dir / "prfaas.env": render_env_file(config),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return list(files)
