"""The documented ``TRTLLM_PRFAAS_*`` environment variables: the relay's configuration on GPUs.

On a GPU, TensorRT-LLM imports the PrfaaS connector (``trtllm_prfaas.connector.prfaas``) inside
every MPI worker it spawns, and only environment variables prefixed ``TRTLLM``/``TLLM`` reach those
workers. So the relay of a Triton deployment is configured through the variables below, set on the
``tritonserver`` process (docker-compose ``environment:`` or ``--env-file``). The connector is the
one reader of them on the GPU path; on the CPU path the ``prfaas worker`` command takes flags.

This module is the contract: ``ENV_VARS`` lists every variable with the roles that read it, and
tests check that every ``TRTLLM_PRFAAS_*`` name in the docs and compose files is one of them.
It reads no environment itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trtllm_prfaas.vocabulary import Role

__all__ = [
    "ENV_PREFIX",
    "ENV_VARS",
    "DeployRole",
    "EnvVar",
    "documented_env_names",
    "find_env_references",
    "undocumented_env_names",
]

ENV_PREFIX = "TRTLLM_PRFAAS_"
_REFERENCE = re.compile(r"\bTRTLLM_PRFAAS_[A-Z0-9_]*[A-Z0-9]\b")


DeployRole = Role  # which side of the relay a Triton deployment is (``vocabulary.Role``):
# prefill in the PrfaaS cluster (max_tokens=1, KV sent layer by layer), decode in the local PD
# cluster (receives the relayed KV, claims it, decodes)


_BOTH = frozenset(DeployRole)


@dataclass(frozen=True)
class EnvVar:
    """One documented variable: who reads it, whether it must be set, its default (as text)."""

    name: str
    roles: frozenset[DeployRole]
    is_required: bool
    default: str | None
    description: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("TRTLLM_PRFAAS_ROLE", _BOTH, True, None, "prefill | decode: which relay half to run"),
    EnvVar(
        "TRTLLM_PRFAAS_RELAY_BIND",
        frozenset({DeployRole.DECODE}),
        True,
        None,
        "decode: where rank 0's relay receiver binds (rank r: port + r), e.g. tcp://0.0.0.0:7100",
    ),
    EnvVar("TRTLLM_PRFAAS_NUM_STREAMS", _BOTH, False, "4", "parallel TCP streams per relay link"),
    EnvVar(
        "TRTLLM_PRFAAS_CURVE_SECRET_KEY_FILE",
        _BOTH,
        True,
        None,
        "this side's Curve secret key (Z85 text file)",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_CURVE_PUBLIC_KEY_FILE",
        _BOTH,
        True,
        None,
        "this side's Curve public key (Z85 text file)",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_CURVE_SERVER_KEY_FILE",
        frozenset({DeployRole.PREFILL}),
        True,
        None,
        "prefill: the decode relay's public key, to authenticate the server",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_CURVE_CLIENT_KEY_FILE",
        frozenset({DeployRole.DECODE}),
        True,
        None,
        "decode: the Curve public key(s) of the prefill side it accepts (comma-separated files)",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_LINK_GBPS",
        frozenset({DeployRole.PREFILL}),
        False,
        None,
        "prefill: optional sender pacing in Gbit/s (unset: no pacing)",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_PLAN_BIND",
        _BOTH,
        True,
        None,
        "where the connector's plan server binds (tensor-parallel rank r: port + r), e.g. "
        "tcp://127.0.0.1:7200; the worker fronting this server posts each request's plan there",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_PLAN_CLIENT_KEY_FILE",
        _BOTH,
        True,
        None,
        "Curve public key file(s) of the workers allowed to post plans (comma-separated); the "
        "literal 'plaintext' runs the plan server without Curve (loopback tests only)",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_RELAY_ADVERTISE",
        frozenset({DeployRole.DECODE}),
        False,
        None,
        "decode: the relay address prefill ranks reach (rank r: port + r); unset: the bound one",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_RECV_BUFFER_BYTES",
        frozenset({DeployRole.DECODE}),
        False,
        str(256 << 20),
        "decode: host bytes each rank's relay receiver may hold; a decode is submitted only once "
        "its whole transfer arrived, so this must exceed one rank's KV shard of the longest "
        "relayed prompt times the decodes waiting at once",
    ),
    EnvVar(
        "TRTLLM_PRFAAS_TRANSFER_TIMEOUT_S",
        _BOTH,
        False,
        "30",
        "deadline of one request's KV transfer, seconds",
    ),
)


def documented_env_names() -> frozenset[str]:
    """Names of every documented ``TRTLLM_PRFAAS_*`` variable."""
    return frozenset(var.name for var in ENV_VARS)


def find_env_references(text: str) -> set[str]:
    """Every ``TRTLLM_PRFAAS_*`` name mentioned in ``text`` (a doc, compose or env file)."""
    return set(_REFERENCE.findall(text))


def undocumented_env_names(text: str) -> set[str]:
    """The ``TRTLLM_PRFAAS_*`` names in ``text`` that ``ENV_VARS`` does not document."""
    return find_env_references(text) - documented_env_names()
