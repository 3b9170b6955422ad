"""Deployment artifacts for the GPU path: Triton model repositories and their contract checks.

``triton_repo`` renders the ``llmapi`` model repository of a PrfaaS prefill or decode
deployment from frozen dataclasses; ``env`` documents the ``TRTLLM_PRFAAS_*`` variables that
configure the relay inside TensorRT-LLM's workers; ``contract`` checks the artifacts (Triton's
protobuf text format, TensorRT-LLM's LLM-API field names, the connector API's requirements);
``versions`` is the one source of the supported Triton / TensorRT-LLM pairs; ``gpu_check``
(with ``gpu_checklist``, ``gpu_steps``, ``gpu_stack``, ``gpu_serving``) is the one-command GPU
check behind ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

from trtllm_prfaas.deploy.env import ENV_VARS, DeployRole, EnvVar
from trtllm_prfaas.deploy.triton_repo import (
    LlmApiConfig,
    RelayEnvConfig,
    TritonRepoConfig,
    triton_repo_config,
    write_repository,
)

__all__ = [
    "ENV_VARS",
    "DeployRole",
    "EnvVar",
    "LlmApiConfig",
    "RelayEnvConfig",
    "TritonRepoConfig",
    "triton_repo_config",
    "write_repository",
]
