"""The orchestrator converts a real PD prefill worker to decode (drain, ``SetRole``, rejoin) and
then routes through it: local and remote prefills relay their KV to the converted node, tokens
equal a single-engine run, every worker ends idle with all its blocks free."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import WorkerProcess, spawn_worker, wait_for
from tests.router.test_disaggregated import _prompt, _reference, _request, _tokens
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.client import WorkerClient

COMMON = ["--model-preset", "tiny", "--plaintext", "--num-blocks", "512", "--chunk-size", "64"]


@pytest.fixture
def workers() -> Iterator[dict[str, WorkerProcess]]:
    procs: dict[str, WorkerProcess] = {}
    try:
        procs["prfaas"] = spawn_worker("prefill", "dc-remote", *COMMON)
        procs["pd-a"] = spawn_worker("prefill", "dc-local", *COMMON)
        procs["pd-b"] = spawn_worker("prefill", "dc-local", *COMMON)
        yield procs
    finally:
        codes = {name: proc.stop() for name, proc in procs.items()}
    assert all(code == 0 for code in codes.values()), codes


def test_convert_prefill_worker_to_decode_then_serve(workers: dict[str, Any]) -> None:
    specs = tuple(WorkerSpec(n, w.control, n == "prfaas") for n, w in workers.items())

    async def scenario() -> None:
        orch = DisaggregatedOrchestrator(RouterConfig(specs, threshold_tokens=100, control=None))
        await orch.start()
        try:
            info = await orch.convert_role("pd-b", "decode")
            assert info.role == "decode" and info.relay_endpoint
            assert orch.cluster.workers["pd-b"].role == "decode"
            for length in (60, 400):
                got = await _tokens(orch, _request(f"r{length}", _prompt(length)))
                assert got == _reference(_prompt(length)), length
            assert [(d.is_remote, d.decode_node_id) for d in orch.decisions] == [
                (False, "pd-b"),
                (True, "pd-b"),
            ]
            assert orch.counters["prefill_fallback"] == 0  # every request got t1 from its prefill
        finally:
            await orch.close()

    asyncio.run(scenario())
    for proc in workers.values():
        with WorkerClient(proc.control) as client:
            info = client.ping(10)
            report = wait_for(client, p.LoadReport, lambda m: m.num_running == 0, timeout_s=10)
            assert report.num_free_blocks == info.num_blocks and not report.is_draining
