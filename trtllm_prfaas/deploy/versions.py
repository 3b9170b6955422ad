"""Which TensorRT-LLM and Triton versions the GPU path supports: the one source of truth.

Every file that names a version (``docker/triton.Dockerfile``, ``docker/compose.gpu.yml``,
``docs/deployment.md``, the ``trtllm`` extra of ``pyproject.toml``, README,
``scripts/gpu_check.sh``) takes its values from here; ``tests/deploy/test_versions.py`` fails
when one of them disagrees.

The Triton tag -> TensorRT-LLM version map is Triton's own release compatibility matrix
(triton-inference-server/server ``docs/introduction/compatibility.md``, stored copy at commit
``0f963c9a8c6913aa4cd9b57ee04f9c2b76ee8d2a``, container ``trtllm-python-py3``); the newest stable
TensorRT-LLM on PyPI is 1.2.1 (2026-04). The 2026 line (1.3.0rc*, 1.4.0rc*) has no stable release
and no Triton container: it is not supported (the connector only keeps its module-path fallback).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from trtllm_prfaas.errors import ConfigError

__all__ = [
    "DEFAULT_TRITON_TAG",
    "DEFAULT_TRTLLM_REF",
    "SUPPORTED_TRTLLM_VERSIONS",
    "TRITON_TRTLLM_VERSIONS",
    "TRTLLM_EXTRA",
    "check_installed",
    "check_pair",
    "main",
    "supported_triton_tags",
    "trtllm_ref",
]

# Triton NGC tag (nvcr.io/nvidia/tritonserver:<tag>-trtllm-python-py3) -> its tensorrt_llm version.
TRITON_TRTLLM_VERSIONS = MappingProxyType(
    {
        "25.10": "1.0.0",
        "25.11": "1.0.3.2510",
        "25.12": "1.1.0",
        "26.01": "1.1.0",
        "26.02": "1.1.0",
        "26.03": "1.2.0",
        "26.04": "1.2.1",
        "26.05": "1.2.1",
        "26.06": "1.2.1",
        "26.07": "1.2.1",
    }
)

SUPPORTED_TRTLLM_VERSIONS: tuple[str, ...] = ("1.2.0", "1.2.1")  # the 1.2.x line
DEFAULT_TRITON_TAG = "26.07"  # the newest Triton carrying the newest stable TensorRT-LLM (1.2.1)
DEFAULT_TRTLLM_REF = "v1.2.1"  # NVIDIA/TensorRT-LLM git tag of the llmapi model.py in the image
TRTLLM_EXTRA = "tensorrt-llm>=1.2,<1.3"  # pyproject.toml's optional extra ``trtllm``


def trtllm_ref(version: str) -> str:
    """The NVIDIA/TensorRT-LLM git tag of a release: ``"1.2.1"`` -> ``"v1.2.1"``."""
    return f"v{version}"


def supported_triton_tags() -> tuple[str, ...]:
    """Triton tags whose TensorRT-LLM is supported, oldest first."""
    return tuple(
        tag for tag, ver in TRITON_TRTLLM_VERSIONS.items() if ver in SUPPORTED_TRTLLM_VERSIONS
    )


def check_pair(triton_tag: str, ref: str) -> str:
    """The TensorRT-LLM version of ``triton_tag`` when ``ref`` is its tag and it is supported.

    Raises ConfigError naming both values otherwise: an unknown tag, a tag whose TensorRT-LLM is
    not 1.2.x (25.12-26.02 carry 1.1.0), or a ``ref`` that is not that version's git tag (the
    ``llmapi`` ``model.py`` must come from the same release as the ``tensorrt_llm`` it imports).
    """
    version = TRITON_TRTLLM_VERSIONS.get(triton_tag)
    if version is None:
        raise ConfigError(f"Triton tag {triton_tag}: not in the compatibility table")
    if version not in SUPPORTED_TRTLLM_VERSIONS:
        raise ConfigError(
            f"Triton tag {triton_tag} carries TensorRT-LLM {version}; supported: "
            f"{', '.join(SUPPORTED_TRTLLM_VERSIONS)} (tags {', '.join(supported_triton_tags())})"
        )
    if ref != trtllm_ref(version):
        raise ConfigError(
            f"TRTLLM_REF {ref} does not match Triton {triton_tag}'s TensorRT-LLM {version} "
            f"(use {trtllm_ref(version)})"
        )
    return version


def check_installed(ref: str, installed: str, triton_tag: str | None = None) -> str:
    """The supported release ``installed`` is (a ``tensorrt_llm`` package version, local suffix
    ignored), when ``ref`` is its git tag and, if given, ``triton_tag`` carries it.

    Raises ConfigError naming the values otherwise. This is what the image build runs.
    """
    version = installed.split("+")[0]
    if version not in SUPPORTED_TRTLLM_VERSIONS:
        raise ConfigError(
            f"tensorrt_llm {installed} is not supported ({', '.join(SUPPORTED_TRTLLM_VERSIONS)})"
        )
    if ref != trtllm_ref(version):
        raise ConfigError(f"TRTLLM_REF {ref} but tensorrt_llm {version} is installed")
    if triton_tag is not None:
        check_pair(triton_tag, ref)
    return version


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``python -m trtllm_prfaas.deploy.versions TRTLLM_REF``: exit 0 when the installed
    ``tensorrt_llm`` (package metadata; nothing is imported) is supported and matches TRTLLM_REF
    and the container's ``NVIDIA_TRITON_SERVER_VERSION``; else 1 with the reason on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if len(args) != 1:
        print("usage: python -m trtllm_prfaas.deploy.versions TRTLLM_REF", file=sys.stderr)
        return 2
    try:
        installed = importlib.metadata.version("tensorrt_llm")
        version = check_installed(args[0], installed, env.get("NVIDIA_TRITON_SERVER_VERSION"))
    except importlib.metadata.PackageNotFoundError:
        print("tensorrt_llm is not installed", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"unsupported TensorRT-LLM / Triton pair: {exc}", file=sys.stderr)
        return 1
    print(f"tensorrt_llm {version} matches {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
