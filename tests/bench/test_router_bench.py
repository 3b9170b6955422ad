"""``bench/router.py`` at a tiny scale: the same server entry points (run in threads here, not
processes, to stay fast), the measurement functions on every door (gRPC, KServe v2 REST,
OpenAI), the JSON shape, and counts that add up."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import threading
from collections.abc import Iterator
from typing import Any

import _echo  # bench/ is on sys.path (tests/bench/conftest.py)
import pytest
import router as bench

TINY = bench.Settings(
    rate_rps=200.0,
    num_requests=30,
    rounds=2,
    warmup_requests=4,
    max_tokens=3,
    concurrency=4,
    rps_seconds=0.3,
    rps_warmup_s=0.1,
)


class _Entry:
    """One ``_echo.serve_*`` entry point on a thread, driven through a pipe like a child."""

    def __init__(self, entry: str, *args: Any) -> None:
        self._conn, child_conn = multiprocessing.Pipe()
        target = getattr(_echo, entry)
        self._thread = threading.Thread(target=target, args=(*args, child_conn), daemon=True)
        self._thread.start()

    def ready(self) -> Any:
        assert self._conn.poll(30.0), "entry point not ready"
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send(None)
        self._thread.join(15.0)
        assert not self._thread.is_alive()
        self._conn.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[bench.Stack]:
    entries: list[_Entry] = []
    try:
        entries.append(direct := _Entry("serve_direct"))
        entries.append(decode := _Entry("serve_worker", "decode"))
        entries.append(prefill := _Entry("serve_worker", "prefill"))
        workers = [("decode", decode.ready(), False), ("prefill", prefill.ready(), False)]
        entries.append(router := _Entry("serve_router", workers))
        pid = os.getpid()
        pids = {"router": pid, "decode": pid, "prefill": pid}
        yield bench.stack_of(direct.ready(), router.ready(), {"server": pid}, pids)
    finally:
        for entry in reversed(entries):
            entry.stop()


def test_stack_has_every_door_of_both_servers(stack: bench.Stack) -> None:
    protocols = {name: target.protocol for name, target in stack.paths.items()}
    assert protocols == {"direct": "grpc", "routed": "grpc", "rest_direct": "rest",
                         "rest": "rest", "openai_direct": "openai", "openai": "openai"}  # fmt: skip
    for door in bench.HTTP_DOORS:
        assert stack.paths[door].address.startswith("http://127.0.0.1:")
        assert stack.paths[door].address != stack.paths[f"{door}_direct"].address


def test_open_loop_counts_every_request_on_every_door(stack: bench.Stack) -> None:
    for target in stack.paths.values():
        run = asyncio.run(bench.open_loop(target, 10, 500.0, 2, poisson=True, seed=1))
        assert (len(run.latencies_s), run.num_errors) == (10, 0), target
        assert all(0 < t < 5 for t in run.latencies_s)


def test_a_wrong_answer_or_a_refused_request_is_an_error(stack: bench.Stack) -> None:
    """The caller checks the text: a door answering something else is never counted as done."""

    async def one(target: bench.Target, max_tokens: int, expected_tokens: int) -> float | None:
        caller = bench.Caller(target, max_tokens)
        caller.expected = bench.ECHO_CHAR * expected_tokens
        try:
            return await caller.call()
        finally:
            await caller.close()

    for target in stack.paths.values():
        assert asyncio.run(one(target, 2, 2)) is not None, target
        assert asyncio.run(one(target, 2, 3)) is None, target  # not the expected text
        assert asyncio.run(one(target, 0, 0)) is None, target  # max_tokens 0: refused (400)


def test_measure_reports_one_json_line_whose_counts_add_up(stack: bench.Stack) -> None:
    result = asyncio.run(bench.measure(stack, TINY))
    line = json.dumps(result)
    assert "\n" not in line and json.loads(line) == result
    for key in ("p50_added_ms", "p99_added_ms", "max_rps", "direct_max_rps", "meets_targets",
                "http_meets_targets"):  # fmt: skip
        assert key in result
    direct, routed = result["direct"], result["routed"]
    http_paths = [result["http"][door][side] for door in bench.HTTP_DOORS
                  for side in ("direct", "routed")]  # fmt: skip
    for path in (direct, routed, *http_paths):
        assert path["num_requests"] == TINY.num_requests
        assert path["num_ok"] + path["num_errors"] == path["num_requests"]
        assert path["num_errors"] == 0 and path["rps_errors"] == 0
        assert path["rps_completed"] > 0 and path["max_rps"] > 0
        assert 0 < path["p50_ms"] <= path["p99_ms"]
    assert result["p50_added_ms"] == pytest.approx(routed["p50_ms"] - direct["p50_ms"], abs=1e-3)
    assert result["p99_added_ms"] == pytest.approx(routed["p99_ms"] - direct["p99_ms"], abs=1e-3)
    assert result["max_rps"] == routed["max_rps"]
    assert set(direct["cpu_ms_per_request"]) == {"server", "client"}
    assert set(routed["cpu_ms_per_request"]) == {"router", "decode", "prefill", "client"}
    for door in bench.HTTP_DOORS:
        http = result["http"][door]
        via_direct, via_router = http["direct"], http["routed"]
        # every HTTP figure is against an anchor of the same run: the direct gRPC call ...
        assert result["http_p99_added_ms"][door] == http["p99_added_ms"]
        assert http["p99_added_ms"] == pytest.approx(via_router["p99_ms"] - direct["p99_ms"],
                                                     abs=1e-3)  # fmt: skip
        assert http["p99_added_ms"] == pytest.approx(
            http["door_p99_added_ms"] + http["router_p99_added_ms"], abs=2e-3
        )
        # ... and the router's gRPC door for the rate
        assert result["http_max_rps"][door] == via_router["max_rps"] == http["max_rps"]
        ratio = via_router["max_rps"] / routed["max_rps"]
        assert result["http_rps_ratio_to_grpc"][door] == pytest.approx(ratio, abs=1e-3)
        assert set(via_router["cpu_ms_per_request"]) == set(routed["cpu_ms_per_request"])
        cpu_http = sum(via_router["cpu_ms_per_request"].values())
        cpu_grpc = sum(routed["cpu_ms_per_request"].values())
        assert http["added_cpu_ms_per_request"] == pytest.approx(cpu_http - cpu_grpc, abs=1e-3)
        assert http["cpu_bound_rps_ratio_to_grpc"] == pytest.approx(cpu_grpc / cpu_http, abs=1e-3)
        assert set(via_direct["cpu_ms_per_request"]) == {"server", "client"}
    targets = result["http_targets"]
    assert result["http_meets_targets"] == all(
        result["http_p99_added_ms"][d] <= targets["p99_added_ms"]
        and result["http_rps_ratio_to_grpc"][d] >= targets["rps_ratio_to_grpc"]
        for d in bench.HTTP_DOORS
    )


def test_quantiles_interpolate_and_empty_is_nan() -> None:
    assert bench.quantile_ms([0.001, 0.002, 0.003], 0.5) == pytest.approx(2.0)
    assert bench.quantile_ms([], 0.99) != bench.quantile_ms([], 0.99)  # NaN


def test_echo_engine_finishes_everything_in_one_step() -> None:
    from trtllm_prfaas.connector.plans import Plan, tokens_digest
    from trtllm_prfaas.engines.request import SamplingParams

    engine = _echo.EchoEngine(_echo.worker_config("prefill").engine)
    export = Plan("t7", 2, tokens_digest([256, 1]), ["tcp://x"])
    engine.add_request([256, 1], SamplingParams(max_tokens=1), 7, export)
    engine.add_request([256, 1], SamplingParams(max_tokens=3), 8, None)
    outputs = engine.step()
    assert [(o.request_id, o.new_token_ids, o.finished) for o in outputs] == [
        (7, [_echo.ECHO_TOKEN], True),
        (8, [_echo.ECHO_TOKEN] * 3, True),
    ]
    assert engine.connector.worker.transfer_errors == {7: None}
    assert not engine.has_unfinished()
    assert chr(_echo.ECHO_TOKEN) == bench.ECHO_CHAR
