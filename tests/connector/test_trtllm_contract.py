"""Contract test: the REAL PrfaaS connector halves driven by a fake executor that follows
TensorRT-LLM's KvCacheConnectorManager semantics and pool shape (``trtllm_fake_executor.py``),
one prefill-role pair and one decode-role pair over a real loopback relay (plaintext).

Checks: the prefill's KV lands byte-identical in the decode pool at the right logical blocks
(and the linear layers' states in the decode's state slot); the decode request is parked until
loaded; the prefill's blocks stay pinned until the save is reported; nothing leaks; every
iteration's connector calls come in the real executor's order. Also pins down a GPU-path gap:
with TensorRT-LLM's plain chunking (the last prompt token not computed alone) the connector
exports nothing. The recurrent-state extension is unverified on GPUs (it needs a hook into
TensorRT-LLM's Mamba/linear cache manager).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.connector.trtllm_fake_executor import FakeExecutor, Layout, kv_rows, state_after
from trtllm_prfaas.connector.prfaas import PrfaasConnectorScheduler, PrfaasConnectorWorker
from trtllm_prfaas.connector.prfaas_runtime import (
    PrfaasConnectorConfig,
    PrfaasRuntime,
    Role,
    transfer_id_for,
)
from trtllm_prfaas.kv.hashing import CacheKey
from trtllm_prfaas.transport import InboundStatus, RelayConfig, RelaySecurity

LAYOUT = Layout()
KEY = CacheKey("fake-hybrid", "HND", "float32", tp_rank=0)
PROMPT = [(i * 31 + 7) % 256 for i in range(70)]  # L-1 = 69: 4 full blocks and a 5-token tail

_ITERATION = re.compile(
    r"^(get_num_new_matched_tokens update_state_after_alloc )*"
    r"(build_connector_meta bind_connector_meta start_load_kv "
    r"((wait_for_layer_load save_kv_layer ){%d}wait_for_save )?)?"
    r"(request_finished )*get_finished $".replace("{%d}", f"{{{len(LAYOUT.layer_kinds)}}}")
)


@pytest.fixture
def runtimes(request: pytest.FixtureRequest) -> Iterator[tuple[PrfaasRuntime, PrfaasRuntime]]:
    chunk_bytes = getattr(request, "param", RelayConfig.chunk_bytes)
    relay = RelayConfig(RelaySecurity.insecure_plaintext(), num_streams=2, chunk_bytes=chunk_bytes)
    decode = PrfaasRuntime.start(PrfaasConnectorConfig(Role.DECODE, relay), KEY)
    prefill = PrfaasRuntime.start(PrfaasConnectorConfig(Role.PREFILL, relay), KEY)
    try:
        yield prefill, decode
    finally:
        prefill.close()
        decode.close()


def _executor(runtime: PrfaasRuntime, **options: Any) -> FakeExecutor:
    args = SimpleNamespace(
        kv_cache_config=SimpleNamespace(tokens_per_block=LAYOUT.tokens_per_block),
        connector_options={"prfaas_runtime": runtime},
    )
    scheduler, worker = PrfaasConnectorScheduler(args), PrfaasConnectorWorker(args)
    return FakeExecutor(LAYOUT, scheduler, worker, **options)


def _expected_block(block: int, layer: int, claimed: int) -> torch.Tensor:
    """Logical block ``block`` of ``layer`` holding the KV of tokens < ``claimed`` only."""
    tpb = LAYOUT.tokens_per_block
    out = torch.zeros(LAYOUT.pool_shape[2:])
    view = out.view(2, LAYOUT.num_kv_heads, tpb, LAYOUT.head_dim)
    for pos in range(block * tpb, min((block + 1) * tpb, claimed)):
        view[:, :, pos % tpb, :] = kv_rows(LAYOUT, PROMPT, pos, layer)
    return out


def _assert_order(executor: FakeExecutor) -> None:
    for calls in executor.iterations:
        assert _ITERATION.match(" ".join(calls) + " "), calls


def _assert_no_leaks(executor: FakeExecutor) -> None:
    assert not executor.active and not executor.waiting
    assert sorted(executor.free_blocks) == list(range(LAYOUT.num_blocks))
    assert sorted(executor.free_slots) == list(range(LAYOUT.num_slots))
    assert not (executor.new_loading or executor.new_saving)
    assert not (executor.pending_loading or executor.pending_saving)


def _until(condition: Any, *executors: FakeExecutor, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        for executor in executors:
            executor.step()
        time.sleep(0.002)


# A block of one layer is 2 KiB here and items carry 1 to 2 blocks: one chunk per item, one
# block per chunk (placed straight from each frame), or misaligned chunks (assembled first).
@pytest.mark.parametrize(
    "runtimes", [1 << 20, 2048, 3000], indirect=True, ids=["1-chunk", "aligned", "misaligned"]
)
def test_relayed_kv_lands_byte_identical_in_the_decode_pool(runtimes) -> None:
    prefill_rt, decode_rt = runtimes
    prefill, decode = _executor(prefill_rt), _executor(decode_rt)
    transfer = uuid.uuid4().hex
    tid = transfer_id_for(transfer, PROMPT, KEY)
    params = {"transfer_uuid": transfer, "relay_endpoint": decode_rt.receiver_endpoint}
    p_rid = prefill.add_request(PROMPT, 1, params)
    receiver = decode_rt.receiver
    assert receiver is not None

    # Prefill: chunks [0,32) [32,64) [64,69) then the last token; blocks stream per layer.
    _until(lambda: receiver.status(tid) is not None, prefill)
    # Decode: the worker submits once the transfer is announced; it claims L-1 tokens, async.
    d_rid = decode.add_request(PROMPT, 3, {"transfer_uuid": transfer})
    decode.step()
    d_req = decode.active[d_rid]
    assert d_req.state == "loading" and decode.pending_loading == {d_rid: d_req}
    assert "wait_for_layer_load" not in decode.iterations[-1]  # parked: no forward for it
    pinned: set[int] = set()
    deadline = time.monotonic() + 20
    while d_rid not in decode.loaded_events:
        assert time.monotonic() < deadline, "decode load never reported"
        assert d_req.state == "loading" and d_req.output == []  # parked until loaded
        prefill.step()
        p_req = prefill.active.get(p_rid)
        if p_req is not None and p_req.state == "saving":
            pinned = set(p_req.block_ids)
            assert not pinned & set(prefill.free_blocks), "pinned blocks were freed early"
        decode.step()

    # Loaded, not yet computed on: the decode pool holds exactly the prefill's KV of L-1 tokens.
    claimed = len(PROMPT) - 1
    for j, layer in enumerate(LAYOUT.full):
        for block in range(-(-claimed // LAYOUT.tokens_per_block)):
            got = decode.pool[d_req.block_ids[block], j]
            assert torch.equal(got, _expected_block(block, layer, claimed)), (layer, block)
    for j, layer in enumerate(LAYOUT.linear):
        assert torch.equal(
            decode.states[d_req.slot, j], state_after(LAYOUT, PROMPT, claimed, layer)
        )
    assert d_req.context_current_position == claimed

    _until(lambda: not (prefill.has_work() or decode.has_work()), prefill, decode)
    assert d_req.output and len(d_req.output) == 3  # decoded after computing the last token
    # The decode request's first scheduled appearance computes exactly the last prompt token.
    assert any("wait_for_layer_load" in calls for calls in decode.iterations)
    for executor in (prefill, decode):
        _assert_order(executor)
        _assert_no_leaks(executor)
    assert prefill.scheduler._target._exports == {}
    assert prefill.worker._target._handles == {} and not prefill.worker._target._saving
    assert not decode.worker._target._loading and not decode.worker._target._loaded
    assert decode.worker._target.get_failed_loads() == []


def test_first_scheduler_output_excludes_the_external_load(runtimes) -> None:
    """A sync match's tokens are subtracted from computed_position once (and only once)."""
    prefill_rt, _ = runtimes
    seen: list[Any] = []
    executor = _executor(prefill_rt)
    scheduler = executor.scheduler._target
    scheduler.get_num_new_matched_tokens = lambda request, n: (32, False)
    build = scheduler.build_connector_meta
    scheduler.build_connector_meta = lambda out: (seen.append(out), build(out))[1]
    executor.add_request(PROMPT, 1, None)
    _until(lambda: not executor.has_work(), executor)
    first, second = seen[0], seen[1]
    assert [(d.computed_position, d.num_scheduled_tokens) for d in first.new_requests] == [(0, 32)]
    assert first.new_requests[0].new_block_ids == list(range(5))
    assert [(d.computed_position, d.num_scheduled_tokens) for d in second.cached_requests] == [
        (64, 5)
    ]
    _assert_order(executor)
    _assert_no_leaks(executor)


def test_plain_trtllm_chunking_never_ships_a_wrong_state(runtimes) -> None:
    """GPU path: TensorRT-LLM's last chunk ends at L, not L-1, so the recurrent state after
    exactly L-1 tokens never exists there. The connector still exports the blocks of the L-1
    prefix from that chunk, but for a hybrid model it cancels the transfer rather than ship the
    state of the wrong length: the decode side never claims it and computes the prompt itself.
    (A pure-attention model needs no state and its transfer completes.)"""
    prefill_rt, decode_rt = runtimes
    prefill = _executor(prefill_rt, split_last_token=False, chunk_size=128)
    transfer = uuid.uuid4().hex
    params = {"transfer_uuid": transfer, "relay_endpoint": decode_rt.receiver_endpoint}
    prefill.add_request(PROMPT, 1, params)
    _until(lambda: not prefill.has_work(), prefill)
    assert decode_rt.receiver is not None
    tid = transfer_id_for(transfer, PROMPT, KEY)
    _until(lambda: decode_rt.receiver.status(tid) in (InboundStatus.FAILED, None), prefill)
    assert decode_rt.receiver.status(tid) is not InboundStatus.COMPLETE
    _assert_order(prefill)
    _assert_no_leaks(prefill)


def test_get_finished_results_are_accepted_only_after_being_passed_in(runtimes) -> None:
    prefill_rt, _ = runtimes
    executor = _executor(prefill_rt)
    executor.worker._target.get_finished = lambda saving, loading: ([], [12345])
    executor.add_request(PROMPT[:5], 1, None)
    with pytest.raises(KeyError):
        executor.step()
