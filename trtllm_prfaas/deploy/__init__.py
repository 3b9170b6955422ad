"""Deployment artifacts for the GPU path: Triton model repositories and their contract checks.

``triton_repo`` renders the ``llmapi`` model repository of a PrfaaS prefill or decode
deployment from frozen dataclasses; ``env`` documents the ``TRTLLM_PRFAAS_*`` variables that
configure the relay inside TensorRT-LLM's workers; ``contract`` checks the artifacts (Triton's
protobuf text format, TensorRT-LLM's LLM-API field names, the connector API's requirements).
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
