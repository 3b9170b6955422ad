"""Failure paths of the PrfaaS connector: a corrupt chunk fails the transfer and the decode computes
the prompt itself, a load that fails after its claim never parks the request,
a vanished decode peer fails the prefill's transfer by its deadline and frees its blocks, and a
restarted receiver is reconnected to."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from tests.connector.test_relay_e2e import _prompt, relay_generate
from tests.harness import collect, new_uuid, spawn_worker, wait_for
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.connector.base import ConnectorPair, RecurrentStates
from trtllm_prfaas.connector.plans import Plan, tokens_digest
from trtllm_prfaas.connector.prfaas import PrfaasConnectorScheduler, PrfaasConnectorWorker
from trtllm_prfaas.connector.prfaas_meta import LoadPlan, PrfaasMeta
from trtllm_prfaas.connector.prfaas_runtime import (
    PrfaasConnectorConfig,
    PrfaasRuntime,
    Role,
    transfer_id_for,
)
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.reference import LayerKind
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.kv.hashing import CacheKey
from trtllm_prfaas.transport import InboundStatus, RelayConfig, RelaySecurity, RelaySender
from trtllm_prfaas.worker import protocol as p

MODEL = model_preset("tiny")
SAMPLING = SamplingParams(max_tokens=5, temperature=0.6, seed=2, ignore_eos=True)
COMMON = ["--model-preset", "tiny", "--plaintext", "--num-blocks", "256", "--chunk-size", "64"]


def _engine(role: Role, fallback: str = "recompute") -> tuple[ReferenceEngine, PrfaasRuntime]:
    relay = RelayConfig(security=RelaySecurity.insecure_plaintext())
    config = PrfaasConnectorConfig(role, relay, transfer_timeout_s=5.0, load_timeout_s=5.0)
    runtime = PrfaasRuntime.start(config, CacheKey(MODEL.model_id, "HND", MODEL.dtype, 0))
    args = ReferenceEngine.llm_args_for(MODEL, prfaas_runtime=runtime)
    pair = ConnectorPair(PrfaasConnectorScheduler(args), PrfaasConnectorWorker(args))
    engine_config = EngineConfig(
        model=MODEL, num_blocks=256, chunk_size=64, on_load_failure=fallback
    )
    return ReferenceEngine(engine_config, pair, runtime.plans), runtime


def _flip_layer_one(header: Any, payload: memoryview) -> bytes | memoryview:
    if header.layer == 1 and header.offset == 0:
        broken = bytearray(payload)
        broken[3] ^= 0x40
        return bytes(broken)
    return payload


def _wait(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _relay_plans(prompt: list[int], t1: int, endpoint: str) -> tuple[str, Plan, Plan]:
    """The prefill's plan (all L tokens, to the decode's receiver) and the decode's (the L
    tokens before t1), under one fresh transfer uuid."""
    uuid = new_uuid()
    digest = tokens_digest(prompt)
    return uuid, Plan(uuid, len(prompt), digest, [endpoint]), Plan(uuid, len(prompt), digest)


def _run(*engines: ReferenceEngine, timeout_s: float = 30.0) -> list[Any]:
    outputs: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while any(e.has_unfinished() for e in engines):
        assert time.monotonic() < deadline, "engines did not finish in time"
        for engine in engines:
            outputs += engine.step()
    return outputs


def test_corrupt_chunk_fails_the_transfer_and_the_decode_computes_the_prompt() -> None:
    prefill, prefill_rt = _engine(Role.PREFILL)
    decode, decode_rt = _engine(Role.DECODE)
    try:
        endpoint = decode_rt.receiver_endpoint
        prefill_rt.senders[endpoint] = RelaySender(
            endpoint, prefill_rt.config.relay, chunk_hook=_flip_layer_one
        )
        prompt = _prompt(200)
        want = ReferenceEngine(EngineConfig(model=MODEL)).generate([prompt], SAMPLING)[0]
        uuid, prefill_plan, decode_plan = _relay_plans(prompt, want[0], endpoint)
        prefill.add_request(
            prompt, SamplingParams(max_tokens=1, ignore_eos=True), plan=prefill_plan
        )
        _run(prefill)
        errors = prefill.connector.worker.transfer_errors
        assert len(errors) == 1 and "corrupt" in next(iter(errors.values()))
        tid = transfer_id_for(uuid, prompt, decode_rt.key)
        _wait(lambda: decode_rt.receiver.status(tid) is InboundStatus.FAILED)
        sampling = replace(SAMPLING, max_tokens=SAMPLING.max_tokens - 1, num_skipped_draws=1)
        rid = decode.add_request([*prompt, want[0]], sampling, plan=decode_plan)
        outputs = [o for o in _run(decode) if o.request_id == rid]
        assert [t for o in outputs for t in o.new_token_ids] == want[1:]
        assert decode.stats.num_connector_tokens == 0  # nothing claimed: computed here
        assert decode_rt.counts["transfers_unclaimed"] == 1
        assert prefill.leak_report() == [] and decode.leak_report() == []
    finally:
        prefill_rt.close()
        decode_rt.close()


@pytest.mark.parametrize("fallback", ["recompute", "fail"])
def test_a_load_that_fails_after_its_claim_never_parks_the_request(fallback: str) -> None:
    """The claimed transfer vanishes between the claim and ``start_load_kv`` (a bug's shape):
    the error is logged and counted, and the reference engine recomputes or fails the request
    through ``SupportsLoadFailures`` instead of leaving it parked."""
    prefill, prefill_rt = _engine(Role.PREFILL)
    decode, decode_rt = _engine(Role.DECODE, fallback)
    try:
        prompt = _prompt(150)
        want = ReferenceEngine(EngineConfig(model=MODEL)).generate([prompt], SAMPLING)[0]
        uuid, prefill_plan, decode_plan = _relay_plans(prompt, want[0], decode_rt.receiver_endpoint)
        prefill.add_request(
            prompt, SamplingParams(max_tokens=1, ignore_eos=True), plan=prefill_plan
        )
        _run(prefill)
        tid = transfer_id_for(uuid, prompt, decode_rt.key)
        _wait(lambda: decode_rt.receiver.status(tid) is InboundStatus.COMPLETE)
        worker = decode.connector.worker
        start_load = worker.start_load_kv

        def vanish_then_load(stream: Any) -> None:
            decode_rt.receiver.release(tid)  # the data is gone after the claim
            start_load(stream)

        worker.start_load_kv = vanish_then_load
        sampling = replace(SAMPLING, max_tokens=SAMPLING.max_tokens - 1, num_skipped_draws=1)
        rid = decode.add_request([*prompt, want[0]], sampling, plan=decode_plan)
        outputs = [o for o in _run(decode) if o.request_id == rid]
        assert decode_rt.counts["loads_failed"] == 1
        assert decode_rt.status_of(uuid, len(prompt)) == "load_failed"  # the worker can see it
        if fallback == "recompute":
            assert [t for o in outputs for t in o.new_token_ids] == want[1:]
        else:
            assert outputs[-1].finish_reason == "error" and "only whole transfers" in str(
                outputs[-1].error
            )
        assert decode.leak_report() == []
    finally:
        prefill_rt.close()
        decode_rt.close()


def test_a_staging_failure_ends_only_that_export_never_the_forward_pass() -> None:
    """An exception out of ``save_kv_layer`` fails every active request upstream (and with the
    overlap scheduler kills the executor loop): the worker ends that request's transfer with
    the error instead, and the request itself completes."""
    prefill, prefill_rt = _engine(Role.PREFILL)
    _, decode_rt = _engine(Role.DECODE)
    try:
        worker = prefill.connector.worker

        def exhausted(*args: Any) -> Any:
            raise RuntimeError("pinned memory exhausted")

        worker.backend.stage_blocks = exhausted
        prompt = _prompt(90)
        _, plan, _ = _relay_plans(prompt, 0, decode_rt.receiver_endpoint)
        rid = prefill.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True), plan=plan)
        outputs = [o for o in _run(prefill) if o.request_id == rid]
        assert outputs[-1].finish_reason == "length" and len(outputs[-1].new_token_ids) == 1
        assert "pinned memory exhausted" in (worker.transfer_errors[rid] or "")
        assert prefill.stats.num_failed_requests == 0 and prefill.leak_report() == []
    finally:
        prefill_rt.close()
        decode_rt.close()


def test_a_rank_whose_transfer_is_still_arriving_loads_once_it_is_whole() -> None:
    """Rank 0 claims only a whole transfer, but another rank's may still be arriving: its
    load waits (no blocking) and is reported once the transfer is whole and copied."""
    prefill, prefill_rt = _engine(Role.PREFILL)
    relay = RelayConfig(security=RelaySecurity.insecure_plaintext())
    config = PrfaasConnectorConfig(Role.DECODE, relay, load_timeout_s=30.0)
    decode_rt = PrfaasRuntime.start(config, CacheKey(MODEL.model_id, "HND", MODEL.dtype, 0))
    try:
        worker = PrfaasConnectorWorker(
            ReferenceEngine.llm_args_for(MODEL, prfaas_runtime=decode_rt)
        )
        pool = torch.zeros(
            64, MODEL.num_full_layers, 2, MODEL.block_row_elems, dtype=MODEL.torch_dtype
        )
        worker.register_kv_caches(pool)
        kinds = MODEL.layer_kinds
        full = [i for i, k in enumerate(kinds) if k is LayerKind.FULL]
        linear = [i for i, k in enumerate(kinds) if k is LayerKind.LINEAR]
        states = torch.zeros((1, *MODEL.state_shape))
        worker.register_recurrent_states(RecurrentStates(
            states, lambda rid: 0, {layer: j for j, layer in enumerate(linear)},
            {layer: j for j, layer in enumerate(full)},
        ))  # fmt: skip
        prompt = _prompt(100)
        uuid, prefill_plan, _ = _relay_plans(prompt, 0, decode_rt.receiver_endpoint)
        blocks = list(range(10, 17))  # 100 tokens = 7 blocks of 16
        worker.bind_connector_meta(PrfaasMeta(loads=[LoadPlan(7, uuid, prompt, 0, blocks)]))
        worker.start_load_kv(None)
        assert worker.get_finished([], [7]) == ([], [])  # not here yet: waits, never fails
        prefill.add_request(
            prompt, SamplingParams(max_tokens=1, ignore_eos=True), plan=prefill_plan
        )
        _run(prefill)
        tid = transfer_id_for(uuid, prompt, decode_rt.key)
        _wait(lambda: decode_rt.receiver.status(tid) is InboundStatus.COMPLETE)
        assert worker.get_finished([], []) == ([], [7])
        assert all(pool[b].abs().sum() > 0 for b in blocks) and not pool[:10].any()
        assert states.abs().sum() > 0  # the recurrent state after L arrived too
        assert (
            decode_rt.counts["loads_failed"] == 0
            and decode_rt.receiver.status(tid) is not InboundStatus.COMPLETE
        )
    finally:
        prefill_rt.close()
        decode_rt.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prefill_worker() -> Iterator[Any]:
    worker = spawn_worker("prefill", "dc-remote", *COMMON, "--transfer-timeout-s", "2")
    try:
        yield worker
    finally:
        assert worker.stop() == 0


def test_vanished_decode_peer_fails_transfer_by_deadline_and_frees_blocks(
    prefill_worker: Any,
) -> None:
    client = prefill_worker.client()
    info = client.ping(10)
    dead_endpoint = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    rid, start = new_uuid(), time.monotonic()
    client.send(
        p.Submit(rid, _prompt(300), 1, transfer_uuid=new_uuid(), relay_endpoint=dead_endpoint)
    )
    assert collect(client, rid).token_ids  # the prefill itself completes
    done = wait_for(client, p.TransferDone, lambda m: m.request_id == rid, timeout_s=10)
    assert "deadline" in done.error and time.monotonic() - start < 6
    report = wait_for(client, p.LoadReport, lambda m: m.num_running == 0, timeout_s=5)
    assert report.num_free_blocks == info.num_blocks  # nothing pinned, nothing leaked


@pytest.fixture
def patient_prefill_worker() -> Iterator[Any]:
    worker = spawn_worker("prefill", "dc-remote", *COMMON)
    try:
        yield worker
    finally:
        assert worker.stop() == 0


def test_restarted_receiver_is_reconnected(patient_prefill_worker: Any) -> None:
    prefill_worker = patient_prefill_worker
    relay_port = _free_port()
    args = [*COMMON, "--relay", f"tcp://127.0.0.1:{relay_port}"]
    want = ReferenceEngine(EngineConfig(model=MODEL)).generate([_prompt(100)], SAMPLING)[0]
    for _ in range(2):  # the second decode worker binds the same relay port
        decode = spawn_worker("decode", "dc-local", *args)
        try:
            tokens, decoded = relay_generate(prefill_worker, decode, _prompt(100), SAMPLING)
            assert tokens == want and decoded.num_connector_tokens == 100
        finally:
            assert decode.stop() == 0
