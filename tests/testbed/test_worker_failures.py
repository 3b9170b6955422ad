"""A worker killed mid-request: the client gets a fallback result (prefill worker lost: the
decode node recomputes) or a clear error within its deadline (decode worker lost), never a hang.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import WorkerProcess, spawn_worker
from tests.router.test_disaggregated import _prompt, _reference, _request, orchestrator
from trtllm_prfaas.errors import TransferTimeout

# A slow inter-DC link (paced to 2 Mbit/s) keeps the KV transfer in flight long enough to kill.
COMMON = [
    "--model-preset",
    "tiny",
    "--plaintext",
    "--num-blocks",
    "512",
    "--chunk-size",
    "64",
    "--transfer-timeout-s",
    "4",
    "--load-timeout-s",
    "4",
]


@pytest.fixture
def workers() -> Iterator[dict[str, WorkerProcess]]:
    procs: dict[str, WorkerProcess] = {}
    try:
        procs["decode"] = spawn_worker("decode", "dc-local", *COMMON)
        procs["pd-prefill"] = spawn_worker("prefill", "dc-local", *COMMON)
        procs["prfaas"] = spawn_worker("prefill", "dc-remote", *COMMON, "--link-gbps", "0.002")
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


async def _kill_after(proc: WorkerProcess, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    proc.process.kill()


def test_prefill_worker_killed_mid_transfer_falls_back_to_local_prefill(workers: Any) -> None:
    prompt = _prompt(1500)  # remote: over the threshold; ~200 KB of KV on a 2 Mbit/s link

    async def scenario() -> list[int]:
        async with orchestrator(workers) as orch:
            killer = asyncio.create_task(_kill_after(workers["prfaas"], 0.5))
            tokens: list[int] = []
            async for chunk in orch.generate(_request("victim", prompt, deadline_s=60)):
                tokens += chunk.token_ids
            await killer
            assert orch.decisions[-1].is_remote
            assert orch.counters["relay_recomputed"] == 1  # the fallback is counted, not silent
            return tokens

    start = time.monotonic()
    assert asyncio.run(scenario()) == _reference(prompt)
    assert time.monotonic() - start < 60


def test_decode_worker_killed_mid_request_gives_an_error_within_the_deadline(workers: Any) -> None:
    async def scenario() -> None:
        async with orchestrator(workers) as orch:
            killer = asyncio.create_task(_kill_after(workers["decode"], 0.5))
            with pytest.raises(TransferTimeout, match="deadline"):
                request = _request("orphan", _prompt(1500), max_tokens=200, deadline_s=3.0)
                async for _chunk in orch.generate(request):
                    pass
            await killer

    start = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - start < 10
