"""The Triton model repositories: rendered, committed, parsed as Triton and TensorRT-LLM would."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from tritonclient.grpc import model_config_pb2

from tests.deploy.conftest import REPO_DIR
from tests.deploy.llm_api_fields import MODEL_YAML_FIELDS
from trtllm_prfaas.deploy import command
from trtllm_prfaas.deploy.contract import (
    connector_contract_problems,
    parse_model_config,
    unknown_llm_api_fields,
)
from trtllm_prfaas.deploy.env import ENV_VARS, DeployRole
from trtllm_prfaas.deploy.triton_repo import (
    DEFAULT_KEY_DIR,
    RelayEnvConfig,
    render_config_pbtxt,
    render_env_file,
    render_model_yaml,
    triton_repo_config,
    write_repository,
)
from trtllm_prfaas.errors import ConfigError

ROLES = list(DeployRole)


def run_command(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments("triton-repo", parser)
    return command.run("triton-repo", parser.parse_args(list(argv)))


def read_env_file(path: Path) -> dict[str, str]:
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    return dict(ln.split("=", 1) for ln in lines)


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.value)
def test_committed_repository_is_the_rendered_one(role: DeployRole, tmp_path: Path) -> None:
    assert run_command("--role", role.value, "--model", "/models/hf", "--out", str(tmp_path)) == 0
    committed = REPO_DIR / role.value
    rendered = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert rendered == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    for rel in rendered:
        assert (committed / rel).read_text() == (tmp_path / rel).read_text(), rel


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.value)
def test_config_pbtxt_parses_as_a_triton_model_config(role: DeployRole) -> None:
    config = parse_model_config(
        (REPO_DIR / role.value / "tensorrt_llm" / "config.pbtxt").read_text()
    )
    assert config.name == "tensorrt_llm"
    assert config.backend == "python"
    # Stated explicitly (upstream's launcher disables auto-complete), equal to triton_config so
    # the llmapi auto_complete_config does not refuse them when auto-complete is on.
    model_yaml = REPO_DIR / role.value / "tensorrt_llm" / "1" / "model.yaml"
    triton = yaml.safe_load(model_yaml.read_text())["triton_config"]
    assert config.max_batch_size == triton["max_batch_size"] == 0
    assert config.HasField("model_transaction_policy")
    assert config.model_transaction_policy.decoupled is triton["decoupled"]
    assert config.model_transaction_policy.decoupled is (role is DeployRole.DECODE)
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    inputs = {i.name: i for i in config.input}
    assert inputs["text_input"].data_type == model_config_pb2.TYPE_STRING
    assert not inputs["text_input"].optional
    assert inputs["streaming"].data_type == model_config_pb2.TYPE_BOOL
    assert inputs["sampling_param_max_tokens"].data_type == model_config_pb2.TYPE_INT32
    assert inputs["sampling_param_seed"].data_type == model_config_pb2.TYPE_UINT64
    assert all(i.optional for name, i in inputs.items() if name != "text_input")
    assert {o.name for o in config.output} >= {"text_output"}
    assert config.parameters["prfaas_role"].string_value == role.value
    assert config.parameters["prfaas_connector_module"].string_value == (
        "trtllm_prfaas.connector.prfaas"
    )


def test_parse_model_config_names_the_bad_field() -> None:
    with pytest.raises(ConfigError, match="no_such_field"):
        parse_model_config('name: "x"\nno_such_field: 3\n')


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.value)
def test_model_yaml_uses_llm_api_fields_and_meets_the_connector_contract(role: DeployRole) -> None:
    doc = yaml.safe_load((REPO_DIR / role.value / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert unknown_llm_api_fields(doc, MODEL_YAML_FIELDS) == []
    assert connector_contract_problems(doc) == []
    assert doc["kv_connector_config"] == {
        "connector_module": "trtllm_prfaas.connector.prfaas",
        "connector_scheduler_class": "PrfaasConnectorScheduler",
        "connector_worker_class": "PrfaasConnectorWorker",
    }
    assert doc["triton_config"]["decoupled"] is (role is DeployRole.DECODE)
    assert doc["triton_config"]["max_batch_size"] == 0


def test_unknown_fields_and_contract_breaches_are_reported() -> None:
    doc = yaml.safe_load(render_model_yaml(triton_repo_config(DeployRole.PREFILL, "m")))
    doc["max_num_token"] = 1
    doc["kv_cache_config"]["enable_blockreuse"] = True
    assert sorted(unknown_llm_api_fields(doc, MODEL_YAML_FIELDS)) == [
        "kv_cache_config.enable_blockreuse",
        "max_num_token",
    ]
    doc.update(backend="tensorrt", pipeline_parallel_size=2, cuda_graph_config={})
    doc["kv_cache_config"]["enable_block_reuse"] = False
    del doc["kv_connector_config"]["connector_worker_class"]
    problems = " ".join(connector_contract_problems(doc))
    for word in ("backend", "connector_worker_class", "pipeline_parallel_size",
                 "cuda_graph_config", "enable_block_reuse"):  # fmt: skip
        assert word in problems


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.value)
def test_env_file_sets_what_the_role_requires(role: DeployRole) -> None:
    env = read_env_file(REPO_DIR / role.value / "tensorrt_llm" / "prfaas.env")
    documented = {v.name: v for v in ENV_VARS}
    assert set(env) <= set(documented)
    for var in ENV_VARS:
        if role in var.roles and var.is_required:
            assert env.get(var.name), var.name
        if role not in var.roles:
            assert var.name not in env, var.name
    assert env["TRTLLM_PRFAAS_ROLE"] == role.value


def test_overrides_and_relay_settings_reach_the_files(tmp_path: Path) -> None:
    code = run_command(
        "--role", "prefill", "--model", "org/model", "--out", str(tmp_path),
        "--model-name", "prfaas_prefill", "--tensor-parallel-size", "4",
        "--max-num-tokens", "8192", "--link-gbps", "25", "--num-streams", "8",
        "--key-dir", "/keys", "--kv-cache-dtype", "fp8",
    )  # fmt: skip
    assert code == 0
    model_dir = tmp_path / "prfaas_prefill"
    doc = yaml.safe_load((model_dir / "1" / "model.yaml").read_text())
    assert (doc["model"], doc["tensor_parallel_size"], doc["max_num_tokens"]) == (
        "org/model", 4, 8192,
    )  # fmt: skip
    assert doc["kv_cache_config"]["dtype"] == "fp8"
    env = read_env_file(model_dir / "prfaas.env")
    assert env["TRTLLM_PRFAAS_LINK_GBPS"] == "25"
    assert env["TRTLLM_PRFAAS_NUM_STREAMS"] == "8"
    assert env["TRTLLM_PRFAAS_CURVE_SERVER_KEY_FILE"] == "/keys/decode.public"
    assert parse_model_config((model_dir / "config.pbtxt").read_text()).name == "prfaas_prefill"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RelayEnvConfig.with_key_dir(DeployRole.DECODE), "relay_bind"),
        (lambda: RelayEnvConfig.with_key_dir(DeployRole.PREFILL, relay_bind="tcp://x:1"), "bind"),
        (lambda: RelayEnvConfig.with_key_dir(DeployRole.DECODE, relay_bind="x:1"), "tcp://"),
        (lambda: RelayEnvConfig(DeployRole.PREFILL, "s", "p", "w"), "curve_server_key_file"),
        (lambda: RelayEnvConfig(DeployRole.PREFILL, "s", "p", ""), "plan_client_key_file"),
        (lambda: RelayEnvConfig.with_key_dir(DeployRole.PREFILL, plan_bind="x:1"), "plan_bind"),
        (
            lambda: RelayEnvConfig.with_key_dir(DeployRole.PREFILL, recv_buffer_bytes=1 << 30),
            "recv_buffer_bytes",
        ),
        (
            lambda: RelayEnvConfig.with_key_dir(DeployRole.PREFILL, relay_advertise="tcp://x:1"),
            "relay_advertise",
        ),
        (lambda: RelayEnvConfig.with_key_dir(DeployRole.PREFILL, num_streams=0), "num_streams"),
        (lambda: RelayEnvConfig.with_key_dir(DeployRole.PREFILL, link_gbps=0.0), "link_gbps"),
        (lambda: triton_repo_config(DeployRole.PREFILL, ""), "model"),
        (lambda: triton_repo_config(DeployRole.DECODE, "m", max_batch_size=0), "max_batch_size"),
        (lambda: triton_repo_config(DeployRole.DECODE, "m", max_input_len=132096), "max_input"),
        (lambda: triton_repo_config(DeployRole.DECODE, "m", tokens_per_block=24), "tokens_per"),
        (
            lambda: triton_repo_config(
                DeployRole.DECODE, "m", relay=RelayEnvConfig.with_key_dir(DeployRole.PREFILL)
            ),
            "relay.role",
        ),
        (lambda: triton_repo_config(DeployRole.DECODE, "m", model_name="a/b"), "model_name"),
    ],
)
def test_bad_configuration_is_refused_with_the_field_named(build, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


def test_rendering_is_pure_and_deterministic(tmp_path: Path) -> None:
    config = triton_repo_config(DeployRole.DECODE, "/models/hf")
    first = (render_config_pbtxt(config), render_model_yaml(config), render_env_file(config))
    assert first == (
        render_config_pbtxt(config),
        render_model_yaml(config),
        render_env_file(config),
    )
    written = write_repository(config, tmp_path / "new" / "repo")
    assert [p.name for p in written] == ["config.pbtxt", "model.yaml", "prfaas.env"]


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.value)
def test_the_connector_accepts_each_committed_env_file(role: DeployRole, tmp_path: Path) -> None:
    """The rendered ``prfaas.env`` is what the connector inside TensorRT-LLM reads
    (``config.connector_config_from_env``): with the key files in place it configures the
    role's relay and plan server, nothing missing or misnamed."""
    from trtllm_prfaas.config import connector_config_from_env
    from trtllm_prfaas.deploy.gpu_stack import write_keys

    write_keys(tmp_path)  # prefill/decode/worker key pairs, the names the env files use
    env = {
        name: value.replace(DEFAULT_KEY_DIR, str(tmp_path))
        for name, value in read_env_file(
            REPO_DIR / role.value / "tensorrt_llm" / "prfaas.env"
        ).items()
    }
    config = connector_config_from_env(env)
    assert config.role.value == role.value
    assert config.plan_endpoint == env["TRTLLM_PRFAAS_PLAN_BIND"]
    assert config.relay.security.curve is not None
    if role is DeployRole.DECODE:
        assert config.receiver_endpoint == env["TRTLLM_PRFAAS_RELAY_BIND"]


def test_decode_receiver_budget_reaches_the_env_file_and_the_connector(tmp_path: Path) -> None:
    from trtllm_prfaas.config import connector_config_from_env
    from trtllm_prfaas.deploy.gpu_stack import write_keys

    out = tmp_path / "repo"
    assert run_command(
        "--role", "decode", "--model", "/m", "--out", str(out), "--key-dir", str(tmp_path),
        "--recv-buffer-bytes", str(8 << 30),
    ) == 0  # fmt: skip
    env = read_env_file(out / "tensorrt_llm" / "prfaas.env")
    assert env["TRTLLM_PRFAAS_RECV_BUFFER_BYTES"] == str(8 << 30)
    write_keys(tmp_path)
    connector_config_from_env(env)  # accepted as the connector reads it
