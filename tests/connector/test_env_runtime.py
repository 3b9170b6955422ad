"""The GPU path's configuration: inside TensorRT-LLM the connector has only ``llm_args``, so it
builds its relay from the ``TRTLLM_PRFAAS_*`` variables (deploy/env.py), once per process."""

from __future__ import annotations

import json
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from trtllm_prfaas.config import connector_config_from_env
from trtllm_prfaas.connector import prfaas_runtime
from trtllm_prfaas.connector.plans import Plan, PlanClient, tokens_digest
from trtllm_prfaas.connector.prfaas import (
    PrfaasConnectorScheduler,
    PrfaasConnectorWorker,
    hybrid_reason,
)
from trtllm_prfaas.connector.prfaas_runtime import Role, cache_key_of
from trtllm_prfaas.deploy.env import ENV_VARS, DeployRole
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.transport import CurveKeys, RelaySecurity, generate_keypair


def _keys(tmp: Path) -> dict[str, Path]:
    paths = {}
    for side in ("prefill", "decode", "worker"):
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
        "TRTLLM_PRFAAS_PLAN_BIND": "tcp://127.0.0.1:0",
        "TRTLLM_PRFAAS_PLAN_CLIENT_KEY_FILE": str(keys["worker.public"]),
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
    assert prefill.plan_endpoint == "tcp://127.0.0.1:0" and prefill.relay_advertise is None
    plan_curve = prefill.plan_security.curve if prefill.plan_security else None
    assert plan_curve is not None  # the plan server: the connector's own keys, workers allowed
    assert plan_curve.server_public_key == keys["prefill.public"].read_bytes().strip()
    assert plan_curve.allowed_client_public_keys == {keys["worker.public"].read_bytes().strip()}
    assert decode.relay.credit_bytes == 256 << 20  # the documented default
    wide = connector_config_from_env(_env("decode", keys, recv_buffer_bytes=str(4 << 30)))
    assert wide.relay.credit_bytes == 4 << 30
    with pytest.raises(ConfigError, match="TRTLLM_PRFAAS_RECV_BUFFER_BYTES"):
        connector_config_from_env(_env("decode", keys, recv_buffer_bytes="lots"))
    advertised = connector_config_from_env(_env("decode", keys, relay_advertise="tcp://dc:7100"))
    assert advertised.relay_advertise == "tcp://dc:7100"
    plain = connector_config_from_env(_env("decode", keys, plan_client_key_file="plaintext"))
    assert plain.plan_security is not None and plain.plan_security.curve is None
    with pytest.raises(ConfigError, match="TRTLLM_PRFAAS_PLAN_BIND"):
        connector_config_from_env(_env("decode", keys, plan_bind="no-port"))
    with pytest.raises(ConfigError, match="TRTLLM_PRFAAS_PLAN_CLIENT_KEY_FILE"):
        connector_config_from_env(_env("decode", keys, plan_client_key_file="/nonexistent"))
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
    prfaas_runtime.close_runtimes()


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
    assert PrfaasConnectorWorker(other).runtime is not runtime  # another deployment's key
    wider = SimpleNamespace(model="/models/hf", kv_cache_config=kv, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="another configuration"):
        PrfaasConnectorWorker(wider)
    with pytest.raises(ConfigError, match=r"llm_args\.model"):
        cache_key_of(SimpleNamespace(kv_cache_config=kv))


@pytest.fixture
def fake_mpi_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """``tensorrt_llm._utils.mpi_rank()`` returning ``rank[0]`` (what the connector reads)."""
    rank = [0]
    package = types.ModuleType("tensorrt_llm")
    utils = types.ModuleType("tensorrt_llm._utils")
    utils.mpi_rank = lambda: rank[0]  # type: ignore[attr-defined]
    package._utils = utils  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt_llm", package)
    monkeypatch.setitem(sys.modules, "tensorrt_llm._utils", utils)
    yield rank


def test_each_rank_binds_its_own_receiver_and_plan_server_and_serves_status(
    process_env: dict[str, Path], fake_mpi_rank: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    relay_port, plan_port = _free_port(), _free_port()
    monkeypatch.setenv("TRTLLM_PRFAAS_RELAY_BIND", f"tcp://127.0.0.1:{relay_port}")
    monkeypatch.setenv("TRTLLM_PRFAAS_PLAN_BIND", f"tcp://127.0.0.1:{plan_port}")
    monkeypatch.setenv("TRTLLM_PRFAAS_RELAY_ADVERTISE", "tcp://decode.example:7100")
    kv = SimpleNamespace(tokens_per_block=32, dtype="bfloat16")
    llm_args = SimpleNamespace(model="/models/hf", kv_cache_config=kv, tensor_parallel_size=2)
    runtimes = []
    for rank in (0, 1):
        fake_mpi_rank[0] = rank
        runtimes.append(PrfaasConnectorWorker(llm_args).runtime)
    r0, r1 = runtimes
    assert (r0.rank, r1.rank) == (0, 1) and r0.key != r1.key
    assert r0.receiver and r0.receiver.endpoint == f"tcp://127.0.0.1:{relay_port}"
    assert r1.receiver and r1.receiver.endpoint == f"tcp://127.0.0.1:{relay_port + 1}"
    assert [r.receiver_endpoint for r in runtimes] == [
        "tcp://decode.example:7100",
        "tcp://decode.example:7101",
    ]
    assert r0.plan_server and r0.plan_server.endpoint.endswith(f":{plan_port}")
    assert r1.plan_server and r1.plan_server.endpoint.endswith(f":{plan_port + 1}")
    worker_pub, worker_sec = (
        process_env[f"worker.{k}"].read_bytes().strip() for k in ("public", "secret")
    )
    server_pub = process_env["decode.public"].read_bytes().strip()
    security = RelaySecurity(
        CurveKeys(server_pub, client_public_key=worker_pub, client_secret_key=worker_sec)
    )
    endpoints = [r.plan_server.endpoint for r in runtimes if r.plan_server]
    with PlanClient(endpoints, security) as client:
        client.post(Plan("u1", 3, tokens_digest([1, 2, 3])), timeout_s=5.0)
        assert r0.plans.take([1, 2, 3]) is not None and r1.plans.counts().posted == 0
        assert client.statuses("u1", 3, timeout_s=5.0) == ["", ""]


def test_a_hybrid_model_is_refused_at_connector_start_saying_what_to_use(
    process_env: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "nemotron-h"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "nemotron_h", "hybrid_override_pattern": "M-M*-"})
    )
    llm_args = SimpleNamespace(
        model=str(model), kv_cache_config=SimpleNamespace(tokens_per_block=32)
    )
    for half in (PrfaasConnectorScheduler, PrfaasConnectorWorker):
        with pytest.raises(ConfigError, match=r"hybrid.*#13577.*local-only.*generation-only"):
            half(llm_args)
    dense = tmp_path / "llama"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert hybrid_reason(str(dense)) is None
    (dense / "config.json").write_text(json.dumps({"model_type": "qwen3_next",
        "layer_types": ["linear_attention", "full_attention"]}))  # fmt: skip
    assert hybrid_reason(str(dense)) is not None


def test_a_prefill_plan_for_another_tensor_parallel_size_is_refused_naming_both(
    process_env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = process_env
    for name, value in _env("prefill", keys, plan_client_key_file="plaintext").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRTLLM_PRFAAS_RELAY_BIND")
    kv = SimpleNamespace(tokens_per_block=32, dtype="bfloat16")
    llm_args = SimpleNamespace(model="/models/hf", kv_cache_config=kv)
    runtime = PrfaasConnectorScheduler(llm_args).runtime
    assert runtime.plan_server is not None
    plaintext = RelaySecurity.insecure_plaintext()
    with PlanClient([runtime.plan_server.endpoint], plaintext) as client:
        two = Plan("u2", 2, tokens_digest([4, 5]), ["tcp://d:1", "tcp://d:2"])
        with pytest.raises(ConfigError, match=r"2 decode relay endpoint.*size 1"):
            client.post(two, timeout_s=5.0)
        client.post(Plan("u3", 2, tokens_digest([4, 5]), ["tcp://d:1"]), timeout_s=5.0)
    assert runtime.plans.counts().posted == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port + 0


def test_the_scheduler_never_raises_into_the_executor_loop(process_env: dict[str, Path]) -> None:
    """``get_num_new_matched_tokens`` runs inside ``prepare_resources``: an exception there ends
    TensorRT-LLM's executor loop, so the connector claims nothing and counts the error."""
    kv = SimpleNamespace(tokens_per_block=32, dtype="bfloat16")
    scheduler = PrfaasConnectorScheduler(SimpleNamespace(model="/models/hf", kv_cache_config=kv))

    def broken(beam: int) -> list[int]:
        raise RuntimeError("a C++ binding failed")

    request = SimpleNamespace(request_id=3, get_tokens=broken)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert scheduler.runtime.counts["scheduler_errors"] == 1
