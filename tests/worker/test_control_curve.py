"""The worker's control socket under CurveZMQ: only allowed router keys get anything done.

A worker with Curve keys binds its control ROUTER as a Curve server (``secure_server``) whose ZAP
handler (``ServerAuth``, pyzmq's ``ThreadAuthenticator`` on the worker's context) admits only
the routers' public keys in its key file's ``control`` section. A DEALER with a random key pair
fails the handshake at the ZAP step (libzmq reports ``EVENT_HANDSHAKE_FAILED_AUTH``); a DEALER
without Curve fails it at the greeting, a mechanism mismatch (``EVENT_HANDSHAKE_FAILED_PROTOCOL``;
libzmq ``src/zmtp_engine.cpp``, ``handshake_v3_x``). Either way no message reaches the worker:
no ``Ping`` answer, no ``Submit`` run, no ``SetRole`` applied, and the worker logs the refusal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.harness import collect, serving_on_thread
from trtllm_prfaas.config import (
    TestbedKeys,
    load_control_security,
    model_preset,
    write_testbed_keyset,
)
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import ConfigError, TransportError
from trtllm_prfaas.transport import CurveKeys, RelayConfig, RelaySecurity, generate_keypair
from trtllm_prfaas.worker import command
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.client import WorkerClient
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer

ENGINE = EngineConfig(model=model_preset("tiny"), num_blocks=64, max_num_seqs=4, chunk_size=64)
QUIET_S = 1.5  # an intruder waits this long for any answer (an allowed ping takes ~1 ms)


@pytest.fixture
def keys(tmp_path: Path) -> TestbedKeys:
    return write_testbed_keyset(tmp_path)


@contextmanager
def serving(control: RelaySecurity | None) -> Iterator[WorkerServer]:
    """An in-process prefill worker serving on a thread; stopped and joined even on failure."""
    config = WorkerConfig(
        "w0",
        WorkerRole.PREFILL,
        "dc-local",
        RelayConfig(RelaySecurity.insecure_plaintext()),
        ENGINE,
        control_security=control,
    )
    with WorkerServer(config) as server, serving_on_thread(server):
        yield server


def router_security(keys: TestbedKeys) -> RelaySecurity:
    return load_control_security(keys.router, False, "router")


def worker_security(keys: TestbedKeys) -> RelaySecurity:
    return load_control_security(keys.both, False, "worker")


def intruder_security(keys: TestbedKeys, kind: str) -> RelaySecurity | None:
    """``random_keys``: a Curve client that knows the worker's public key but holds a key pair
    no file allows; ``no_curve``: a plaintext DEALER."""
    if kind == "no_curve":
        return None
    public, secret = generate_keypair()
    server_public = router_security(keys).curve
    assert server_public is not None
    curve = CurveKeys(server_public.server_public_key, None, public, secret)
    return RelaySecurity(curve=curve)


def _reference(prompt: list[int], max_tokens: int) -> list[int]:
    engine = ReferenceEngine(ENGINE)
    return engine.generate([prompt], SamplingParams(max_tokens, 0.0, 0, ignore_eos=True))[0]


def test_allowed_router_is_answered_and_served(keys: TestbedKeys) -> None:
    with (
        serving(worker_security(keys)) as server,
        WorkerClient(server.endpoint, security=router_security(keys)) as client,
    ):
        info = client.ping(10)
        assert info.worker_id == "w0" and info.role == "prefill"
        prompt = [(i * 31 + 7) % 256 for i in range(40)]
        client.send(p.Submit("ok", prompt, 6, ignore_eos=True))
        got = collect(client, "ok", timeout_s=30)
        assert got.error_kind == "" and got.token_ids == _reference(prompt, 6)


@pytest.mark.parametrize("kind", ["random_keys", "no_curve"])
def test_unauthorised_peer_gets_nothing_done_and_is_logged(keys: TestbedKeys, kind: str) -> None:
    with (
        capture_logs() as logs,
        serving(worker_security(keys)) as server,
        WorkerClient(server.endpoint, security=intruder_security(keys, kind)) as intruder,
    ):
        # Queued before the handshake; once it fails the socket has no peer and refuses sends.
        for message in (p.Submit("stolen", [1, 2, 3, 4], 4, ignore_eos=True), p.SetRole("decode")):
            with contextlib.suppress(TransportError):
                intruder.send(message)
        with pytest.raises(TransportError):  # no answer, or no peer to send to
            intruder.ping(QUIET_S)
        assert intruder.recv(QUIET_S) is None  # no Tokens, no WorkerInfo, no LoadReport
        assert not server.engine.has_unfinished() and not server._requests
        with WorkerClient(server.endpoint, security=router_security(keys)) as router:
            assert router.ping(10).role == "prefill"  # SetRole never arrived
        assert server._routers and len(server._routers) == 1  # only the allowed router spoke
    refused = [e for e in logs if e["event"] == "control_peer_refused"]
    # A plaintext greeting meets Curve's: a mechanism mismatch, or (when the peer hangs up first)
    # a failure with only an errno; a Curve peer with a key not allowed: the ZAP refusal.
    expected = (
        {"handshake_failed_auth"}
        if kind == "random_keys"
        else {"handshake_failed_protocol", "handshake_failed"}
    )
    assert refused and {e["handshake"] for e in refused} <= expected, logs
    if kind == "random_keys":  # the ZAP handler names the key it refused
        assert any(e["event"] == "control_client_refused" for e in logs), logs


def test_plaintext_control_is_warned(keys: TestbedKeys) -> None:
    with capture_logs() as logs, serving(None) as server, WorkerClient(server.endpoint) as client:
        assert client.ping(10).worker_id == "w0"
    assert any(e["event"] == "control_plaintext" for e in logs), logs


def _worker_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments("worker", parser)
    return parser.parse_args(["--role", "prefill", "--cluster", "dc-local", *extra])


def test_prfaas_worker_key_flags(keys: TestbedKeys, tmp_path: Path) -> None:
    """``--curve-keys`` secures the relay and the control plane; ``--plaintext`` both; neither
    is refused; a key file without a ``control`` section is refused, naming the file."""
    config = command.build_config(_worker_args("--curve-keys", str(keys.both)))
    assert config.relay.security.curve is not None
    assert config.control_security is not None and config.control_security.curve is not None
    assert config.control_security.curve.allowed_client_public_keys == frozenset(
        [router_security(keys).curve.client_public_key]  # type: ignore[union-attr]
    )
    plain = command.build_config(_worker_args("--plaintext"))
    assert plain.relay.security.curve is None
    assert plain.control_security is not None and plain.control_security.curve is None
    with pytest.raises(ConfigError, match="--curve-keys FILE"):
        command.build_config(_worker_args())
    relay_only = tmp_path / "relay-only.json"
    relay_only.write_text(
        json.dumps({k: v for k, v in json.loads(keys.both.read_text()).items() if k != "control"})
    )
    with pytest.raises(ConfigError, match=r"relay-only\.json"):
        command.build_config(_worker_args("--curve-keys", str(relay_only)))


def test_router_keys_are_a_client_pair(keys: TestbedKeys) -> None:
    security = router_security(keys)
    assert security.curve is not None and security.curve.client_secret_key is not None
    with pytest.raises(ConfigError, match="no control section"):
        load_control_security(keys.router, False, "worker")  # a router file serves nothing
    with pytest.raises(ConfigError, match="mutually exclusive"):
        load_control_security(keys.router, True, "router")
    assert load_control_security(None, True, "router").curve is None
    with pytest.raises(ConfigError, match="--curve-keys FILE"):
        load_control_security(None, False, "router")
