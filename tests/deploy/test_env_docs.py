"""Every TRTLLM_PRFAAS_* name used in docs, compose and env files is a documented variable."""

from __future__ import annotations

from pathlib import Path

from tests.deploy.conftest import DEPLOYMENT_DOC, DOCKER_DIR, ENGINES_DIR, REPO_DIR
from trtllm_prfaas.deploy.env import (
    ENV_VARS,
    documented_env_names,
    find_env_references,
    undocumented_env_names,
)


def deployment_files() -> list[Path]:
    files = [DEPLOYMENT_DOC, *DOCKER_DIR.iterdir(), *ENGINES_DIR.iterdir()]
    files += [p for p in REPO_DIR.rglob("*") if p.is_file()]
    files.append(REPO_DIR.parent / "README.md")
    return sorted(p for p in files if p.is_file())


def test_every_referenced_variable_is_documented() -> None:
    for path in deployment_files():
        assert undocumented_env_names(path.read_text()) == set(), path


def test_the_deployment_guide_describes_every_variable() -> None:
    guide = DEPLOYMENT_DOC.read_text()
    assert find_env_references(guide) == documented_env_names()
    for var in ENV_VARS:
        if var.default is not None:
            assert var.name in guide


def test_reference_finder() -> None:
    text = "set TRTLLM_PRFAAS_ROLE=decode and ${TRTLLM_PRFAAS_NUM_STREMS:-4}; TRTLLM_OTHER=1"
    assert find_env_references(text) == {"TRTLLM_PRFAAS_ROLE", "TRTLLM_PRFAAS_NUM_STREMS"}
    assert undocumented_env_names(text) == {"TRTLLM_PRFAAS_NUM_STREMS"}
    assert all(name.startswith("TRTLLM_") for name in documented_env_names())
