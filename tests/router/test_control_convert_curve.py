"""Role conversion end to end under CurveZMQ on both planes (``test_control_convert`` is the
plaintext flow): the router's control sockets are Curve clients with the router's key pair, each
worker's control socket admits only that key, and the local PD workers hold the key file with
both relay roles' keys (``TestbedKeys.both``) so they can serve as prefill or decode.

One local worker is converted decode -> prefill and back (the other prefill -> decode and back);
in each state relayed requests are served: a remote prefill and a local one each relay their KV
(Curve) to whichever worker decodes now, tokens equal a single-engine run, no request falls back
or recomputes, and every worker ends idle with all its blocks free."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import WorkerProcess, spawn_worker, wait_for
from tests.router.test_disaggregated import _prompt, _reference, _request, _tokens
from trtllm_prfaas.config import load_control_security, write_testbed_keyset
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.transport import RelaySecurity
from trtllm_prfaas.worker import protocol as p

COMMON = ["--model-preset", "tiny", "--num-blocks", "512", "--chunk-size", "64"]
LOCAL, REMOTE = 60, 400  # prompt lengths on either side of the threshold (100)


@pytest.fixture
def curve_workers(tmp_path: Path) -> Iterator[tuple[dict[str, WorkerProcess], RelaySecurity]]:
    keys = write_testbed_keyset(tmp_path)
    control = load_control_security(keys.router, False, "router")
    specs = {
        "prfaas": ("prefill", "dc-remote", keys.sender),  # its role never changes
        "pd-a": ("prefill", "dc-local", keys.both),
        "pd-b": ("decode", "dc-local", keys.both),
    }
    procs: dict[str, WorkerProcess] = {}
    try:
        for name, (role, cluster, key_file) in specs.items():
            flags = [*COMMON, "--curve-keys", str(key_file)]
            procs[name] = spawn_worker(role, cluster, *flags, control_security=control)
        yield procs, control
    finally:
        codes = {name: proc.stop() for name, proc in procs.items()}
    assert all(code == 0 for code in codes.values()), codes


async def _serve_both_ways(orch: DisaggregatedOrchestrator, tag: str, decode: str) -> None:
    """A local and a remote request, each relayed to ``decode``, with single-engine tokens."""
    start = len(orch.decisions)
    for length in (LOCAL, REMOTE):
        got = await _tokens(orch, _request(f"{tag}-{length}", _prompt(length)))
        assert got == _reference(_prompt(length)), (tag, length)
    routed = [(d.is_remote, d.decode_node_id) for d in orch.decisions[start:]]
    assert routed == [(False, decode), (True, decode)], (tag, routed)
    assert orch.counters["prefill_fallback"] == 0 and orch.counters["relay_recomputed"] == 0


def test_convert_decode_to_prefill_and_back_under_curve(curve_workers: Any) -> None:
    workers, control = curve_workers
    specs = tuple(WorkerSpec(n, w.control, n == "prfaas") for n, w in workers.items())
    config = RouterConfig(specs, threshold_tokens=100, control=None, control_security=control)

    async def scenario() -> None:
        orch = DisaggregatedOrchestrator(config)
        await orch.start()
        try:
            await _serve_both_ways(orch, "start", decode="pd-b")
            assert (await orch.convert_role("pd-a", "decode")).relay_endpoint
            info = await orch.convert_role("pd-b", "prefill")  # decode -> prefill
            assert info.role == "prefill" and info.relay_endpoint == ""
            await _serve_both_ways(orch, "swapped", decode="pd-a")  # pd-b prefills, relays
            info = await orch.convert_role("pd-b", "decode")  # and back
            assert info.role == "decode" and info.relay_endpoint.startswith("tcp://")
            assert (await orch.convert_role("pd-a", "prefill")).role == "prefill"
            await _serve_both_ways(orch, "back", decode="pd-b")
        finally:
            await orch.close()

    asyncio.run(scenario())
    for proc in workers.values():  # leak check, over the same Curve control plane
        with proc.client() as client:
            info = client.ping(10)
            report = wait_for(client, p.LoadReport, lambda m: m.num_running == 0, timeout_s=10)
            assert report.num_free_blocks == info.num_blocks and not report.is_draining
