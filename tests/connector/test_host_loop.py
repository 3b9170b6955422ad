"""The reference engine drives connectors in exactly TensorRT-LLM's per-iteration order, parks
async loads, pins saving requests' blocks, and survives a failing connector."""

from __future__ import annotations

import pytest

from tests.builders import tiny_model
from tests.conftest import EngineFactory
from tests.connector.fakes import CallLog, RecordingScheduler, RecordingWorker
from trtllm_prfaas.connector.base import ConnectorPair
from trtllm_prfaas.engines.engine import ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import ConnectorError

GREEDY = SamplingParams(max_tokens=3, ignore_eos=True)


def _recording(pin_saves: bool = False) -> tuple[ConnectorPair, CallLog]:
    log = CallLog()
    args = ReferenceEngine.llm_args_for(tiny_model())
    pair = ConnectorPair(RecordingScheduler(args, log, pin_saves), RecordingWorker(args, log))
    return pair, log


def _iterations(names: list[str]) -> list[list[str]]:
    """Split a call log into iterations (each ends with get_finished)."""
    out, current = [], []
    for name in names:
        current.append(name)
        if name == "get_finished":
            out.append(current)
            current = []
    return out


def test_per_iteration_call_order_matches_tensorrt_llm(make_engine: EngineFactory) -> None:
    pair, log = _recording()
    engine = make_engine(connector=pair)
    engine.generate([[1] * 20], GREEDY)
    layers = [f"{hook}:{i}" for i in range(4) for hook in ("wait_for_layer_load", "save_kv_layer")]
    iterations = _iterations(
        [f"{n}:{a}" if n in ("wait_for_layer_load", "save_kv_layer") else n for n, a in log.calls]
    )
    first = iterations[0]
    assert first == [
        "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
        "bind_connector_meta", "start_load_kv", *layers, "wait_for_save", "get_finished",
    ]  # fmt: skip
    last = iterations[-1]
    assert last == [
        "build_connector_meta", "bind_connector_meta", "start_load_kv", *layers,
        "wait_for_save", "request_finished", "get_finished",
    ]  # fmt: skip
    assert engine.pool.data_ptr() == pair.worker.pool.data_ptr()  # register_kv_caches: THE pool


def test_scheduler_output_reports_tokens_blocks_and_positions(make_engine: EngineFactory) -> None:
    pair, _ = _recording()
    engine = make_engine(connector=pair, chunk_size=16)
    prompt = list(range(1, 41))  # 40 tokens: TensorRT-LLM's chunks [0,16) [16,32) [32,40)
    engine.generate([prompt], GREEDY)
    outputs = pair.scheduler.outputs
    first = outputs[0].new_requests[0]
    assert first.new_tokens == prompt and len(first.new_block_ids) == 3
    assert (first.computed_position, first.num_scheduled_tokens) == (0, 16)
    positions = [
        (d.computed_position, d.num_scheduled_tokens) for o in outputs for d in o.cached_requests
    ]
    assert positions[:2] == [(16, 16), (32, 8)]
    assert positions[2] == (40, 1)  # generation: computed_position = len(tokens) - 1
    assert all(not o.new_requests for o in outputs[1:])


def test_pinned_blocks_stay_until_get_finished_reports_the_save(make_engine: EngineFactory) -> None:
    pair, log = _recording(pin_saves=True)
    engine = make_engine(connector=pair)
    rid = engine.add_request([1] * 20, GREEDY)
    while not any(name == "request_finished" for name in log.names()):
        engine.step()
    assert engine.running[rid].block_ids, "blocks must stay pinned while saving"
    free_while_saving = engine.blocks.num_free
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert steps >= 2 and engine.blocks.num_free > free_while_saving
    passed_in = [a[0] for n, a in log.calls if n == "get_finished" and a[0]]
    assert passed_in == [[rid]]  # an id is passed in exactly once


def test_connector_exception_fails_its_requests_and_engine_keeps_serving(
    make_engine: EngineFactory,
) -> None:
    pair, _ = _recording()
    engine = make_engine(connector=pair)
    pair.worker.fail_on_save_layer = 2
    rid = engine.add_request([1] * 10, GREEDY)
    outputs = engine.step()
    assert outputs[0].request_id == rid and outputs[0].finish_reason == "error"
    assert isinstance(outputs[0].error, ConnectorError)
    assert "disk on fire" in str(outputs[0].error)
    assert engine.generate([[2] * 10], GREEDY)[0]


def test_returning_an_id_that_was_never_passed_in_is_a_contract_violation(
    make_engine: EngineFactory,
) -> None:
    pair, _ = _recording()
    pair.worker.get_finished = lambda saving, loading: ([999], [])
    engine = make_engine(connector=pair)
    engine.add_request([1] * 10, GREEDY)
    with pytest.raises(ConnectorError, match="request 999 before it was passed in"):
        engine.step()
    engine.abort(next(iter(engine.running)))
