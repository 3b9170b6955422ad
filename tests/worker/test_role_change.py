"""Role change on a real worker process: ``SetRole`` drains (reports ``is_draining``, refuses new
requests, finishes in-flight ones), rebuilds the connector runtime for the decode role with the
Curve keys it was started with, answers ``WorkerInfo`` with a relay endpoint, then decodes a KV
relayed from another process bit-exactly, and ends with every block free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import WorkerProcess, collect, new_uuid, spawn_worker, wait_for
from trtllm_prfaas.config import load_control_security, model_preset, write_testbed_keyset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.worker import protocol as p

COMMON = ["--model-preset", "tiny", "--num-blocks", "256", "--chunk-size", "64"]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    """Two workers with the key file of a node that may change role (receiver and sender relay
    keys); their control sockets are Curve too, reached with the router's keys."""
    keyset = write_testbed_keyset(tmp_path)
    keys = ["--curve-keys", str(keyset.both)]
    control = load_control_security(keyset.router, False, "router")
    procs: list[WorkerProcess] = []
    try:
        procs.append(spawn_worker("prefill", "dc-local", *COMMON, *keys, control_security=control))
        procs.append(spawn_worker("prefill", "dc-remote", *COMMON, *keys, control_security=control))
        yield procs[0], procs[1]
    finally:
        codes = [proc.stop() for proc in procs]
    assert codes == [0, 0]


def _prompt(n: int) -> list[int]:
    return [(i * 7919 + n) % 256 for i in range(n)]


def _reference(prompt: list[int], max_tokens: int) -> list[int]:
    engine = ReferenceEngine(EngineConfig(model=model_preset("tiny"), num_blocks=256))
    return engine.generate([prompt], SamplingParams(max_tokens, 0.0, 0, ignore_eos=True))[0]


def test_prefill_worker_drains_converts_to_decode_and_decodes_relayed_kv(pair) -> None:
    convert, prefill = pair
    with convert.client() as client, prefill.client() as sender:
        before = client.ping(10)
        assert before.role == "prefill" and before.relay_endpoint == ""
        busy = _prompt(300)
        client.send(p.Submit("busy", busy, 40, ignore_eos=True))
        client.send(p.SetRole("decode"))
        wait_for(client, p.LoadReport, lambda m: m.is_draining)
        client.send(p.Submit("refused", _prompt(20), 4))
        refused = collect(client, "refused")
        assert refused.error_kind == "AdmissionRejected"
        info = wait_for(client, p.WorkerInfo, lambda m: True, timeout_s=60)
        assert info.role == "decode" and info.relay_endpoint.startswith("tcp://")
        assert info.kv_bytes_per_token > 0

        prompt, uuid = _prompt(500), new_uuid()
        client.send(p.Submit("relayed", prompt, 8, ignore_eos=True, transfer_uuid=uuid))
        relay = info.relay_endpoint
        sender.send(p.Submit("relayed", prompt, 8, transfer_uuid=uuid, relay_endpoint=relay))
        got = collect(client, "relayed")
        assert got.error_kind == "" and got.token_ids == _reference(prompt, 8)
        done = wait_for(sender, p.TransferDone, lambda m: m.request_id == "relayed")
        assert done.error == ""

        idle = wait_for(client, p.LoadReport, lambda m: m.num_running == 0 and not m.is_draining)
        assert idle.role == "decode" and idle.num_free_blocks == info.num_blocks
