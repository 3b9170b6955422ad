"""The GPU path's configuration: inside TensorRT-LLM the connector has only ``llm_args``, so it
builds its relay from the ``TRTLLM_PRFAAS_*`` variables (deploy/env.py), once per process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from trtllm_prfaas.config import connector_config_from_env
from trtllm_prfaas.connector import prfaas_runtime
from trtllm_prfaas.connector.prfaas import PrfaasConnectorScheduler, PrfaasConnectorWorker
from trtllm_prfaas.connector.prfaas_runtime import Role, cache_key_of
from trtllm_prfaas.deploy.env import ENV_VARS, DeployRole
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.transport import generate_keypair


def _keys(tmp: Path) -> dict[str, Path]:
    paths = {}
    for side in ("prefill", "decode"):
        public, secret = generate_keypair()
        paths[f"{side}.public"] = tmp / f"{side}.public"
        paths[f"{side}.secret"] = tmp / f"{side}.secret"
        paths[f"{side}.public"].write_bytes(public + b"\n")
        paths[f"{side}.secret"].write_bytes(secret)
    return paths


def _env(role: str, keys: dict[str, Path], **extra: str) -> dict[str, str]:
    env = {
        "TRTLLM_PRFAAS_ROLE": role,
        "TRTLLM_PRFAAS_CURVE_PUBLIC_KEY_FILE": str(keys[f"{role}.public"]),
        "TRTLLM_PRFAAS_CURVE_SECRET_KEY_FILE": str(keys[f"{role}.secret"]),
    }
    if role == "decode":
        env["TRTLLM_PRFAAS_RELAY_BIND"] = "tcp://127.0.0.1:0"
        env["TRTLLM_PRFAAS_CURVE_CLIENT_KEY_FILE"] = str(keys["prefill.public"])
    else:
        env["TRTLLM_PRFAAS_CURVE_SERVER_KEY_FILE"] = str(keys["decode.public"])
    return {**env, **{f"TRTLLM_PRFAAS_{k.upper()}": v for k, v in extra.items()}}


def test_every_required_variable_of_each_role_is_read(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    for role in ("prefill", "decode"):
        env = _env(role, keys)
        required = {v.name for v in ENV_VARS if v.is_required and DeployRole(role) in v.roles}
        assert required == set(env)  # the documented contract is exactly what is needed
        for name in required:
            with pytest.raises(ConfigError, match=name):
                connector_config_from_env({k: v for k, v in env.items() if k != name})


def test_values_land_in_the_connector_config(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    decode = connector_config_from_env(_env("decode", keys, num_streams="2"))
    assert decode.role is Role.DECODE and decode.receiver_endpoint == "tcp://127.0.0.1:0"
    curve = decode.relay.security.curve
    assert curve is not None and decode.relay.num_streams == 2
    assert curve.allowed_client_public_keys == {keys["prefill.public"].read_bytes().strip()}
    prefill = connector_config_from_env(
        _env("prefill", keys, link_gbps="25", transfer_timeout_s="12")
    )
    assert prefill.role is Role.PREFILL and prefill.relay.link_gbps == 25.0
    assert prefill.transfer_timeout_s == 12.0
    assert prefill.relay.security.curve is not None
    assert prefill.relay.security.curve.server_public_key == keys["decode.public"].read_bytes()[:40]
    with pytest.raises(ConfigError, match="TRTLLM_PRFAAS_ROLE"):
        connector_config_from_env({**_env("prefill", keys), "TRTLLM_PRFAAS_ROLE": "both"})
    with pytest.raises(ConfigError, match="TRTLLM_PRFAAS_NUM_STREAMS"):
        connector_config_from_env(_env("prefill", keys, num_streams="four"))
    with pytest.raises(ConfigError, match="cannot read"):
        connector_config_from_env(_env("prefill", keys, curve_server_key_file="/nonexistent"))
    with pytest.raises(ConfigError, match="TRTLLM_PRFAAS_NUM_STREAMS"):
        connector_config_from_env(_env("decode", keys, num_streams="0"))
    keys["decode.public"].write_text("not a key")
    with pytest.raises(ConfigError, match=r"TRTLLM_PRFAAS_CURVE_SERVER_KEY_FILE.*Z85"):
        connector_config_from_env(_env("prefill", keys))


@pytest.fixture
def process_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    keys = _keys(tmp_path)
    for name, value in _env("decode", keys).items():
        monkeypatch.setenv(name, value)
    yield keys
    runtime = prfaas_runtime._process_runtime
    if runtime is not None:
        runtime.close()
    prfaas_runtime._process_runtime = None


def test_both_halves_built_by_tensorrt_llm_share_one_runtime_from_the_env(
    process_env: dict[str, Path],
) -> None:
    kv = SimpleNamespace(tokens_per_block=32, dtype="bfloat16")
    llm_args = SimpleNamespace(model="/models/hf", kv_cache_config=kv)  # no connector_options
    scheduler, worker = PrfaasConnectorScheduler(llm_args), PrfaasConnectorWorker(llm_args)
    assert scheduler.runtime is worker.runtime
    runtime = worker.runtime
    assert runtime.config.role is Role.DECODE and runtime.receiver is not None
    assert runtime.receiver_endpoint.startswith("tcp://127.0.0.1:")
    assert runtime.key == cache_key_of(llm_args)
    assert (runtime.key.model_id, runtime.key.dtype, runtime.key.tp_rank) == (
        "/models/hf",
        "bfloat16",
        0,
    )
    other = SimpleNamespace(model="/models/other", kv_cache_config=kv)
    with pytest.raises(ConfigError, match="another configuration"):
        PrfaasConnectorWorker(other)
    with pytest.raises(ConfigError, match=r"llm_args\.model"):
        cache_key_of(SimpleNamespace(kv_cache_config=kv))
