"""engines/: the per-hardware LLM-API configs agree with the renderer and TensorRT-LLM's fields."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.conftest import ENGINES_DIR
from tests.deploy.llm_api_fields import LLM_API_FIELDS
from trtllm_prfaas.deploy.contract import connector_contract_problems, unknown_llm_api_fields
from trtllm_prfaas.deploy.env import DeployRole
from trtllm_prfaas.deploy.triton_repo import model_yaml_dict, triton_repo_config

ENGINE_FILES = {DeployRole.PREFILL: "h200_prefill.yaml", DeployRole.DECODE: "h20_decode.yaml"}


@pytest.mark.parametrize("role", list(DeployRole), ids=lambda r: r.value)
def test_engine_config_is_valid_and_equals_the_rendered_model_yaml(role: DeployRole) -> None:
    doc = yaml.safe_load((ENGINES_DIR / ENGINE_FILES[role]).read_text())
    assert unknown_llm_api_fields(doc, LLM_API_FIELDS) == []
    assert connector_contract_problems(doc) == []
    rendered = model_yaml_dict(triton_repo_config(role, doc["model"]))
    rendered.pop("triton_config")
    assert doc == rendered


def test_decode_batch_is_the_papers_bs_max_and_sides_share_the_block_layout() -> None:
    prefill, decode = (yaml.safe_load((ENGINES_DIR / f).read_text()) for f in ENGINE_FILES.values())
    assert decode["max_batch_size"] == 20  # BS_max per 8xH20 at 40 tok/s (PAPER.md)
    for key in ("tokens_per_block", "dtype"):
        assert prefill["kv_cache_config"][key] == decode["kv_cache_config"][key]
    assert prefill["max_num_tokens"] % prefill["kv_cache_config"]["tokens_per_block"] == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_build_script_parses() -> None:
    script = ENGINES_DIR / "build_trt_engine.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=10)
    assert usage.returncode != 0 and "usage" in usage.stderr
