"""Decode workers are the authority on their decode slots.

``DecodeSlots`` step by step; a real decode worker granting, refusing and freeing reservations
over its control socket; and two router replicas (two orchestrators in one process) bursting
onto the same two small decode workers: no worker ever holds more decodes than its slots, a
refused reservation is tried on the other decode node, the rest are answered ``AdmissionRejected``
(UNAVAILABLE), nothing hangs, served requests give single-engine tokens, and every slot comes
back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from tests.harness import collect, serving_on_thread
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import AdmissionRejected
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.transport import RelayConfig, RelaySecurity
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.client import WorkerClient
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer
from trtllm_prfaas.worker.slots import DecodeSlots

SLOTS = 2


def engine_config(max_num_seqs: int = SLOTS) -> EngineConfig:
    return EngineConfig(model=model_preset("tiny"), num_blocks=128, max_num_seqs=max_num_seqs,
                        chunk_size=64)  # fmt: skip


# --------------------------------------------------------------------------- DecodeSlots
def test_slots_grant_up_to_capacity_and_come_back() -> None:
    slots = DecodeSlots(2)
    assert slots.reserve("a", 10.0, 0.0, 0) and slots.reserve("a", 10.0, 0.0, 0)  # idempotent
    assert slots.reserve("b", 10.0, 0.0, 0)
    assert not slots.reserve("c", 10.0, 0.0, 0)  # full
    assert slots.attach("a", "leg-a") and not slots.attach("zzz", "leg-z")
    slots.detach("leg-a")  # a cancelled leg keeps its reservation
    assert "a" in slots and not slots.reserve("c", 10.0, 0.0, 0)
    assert slots.attach("a", "leg-a~local")
    assert slots.leg_ended("leg-a~local") == "a"  # the request is over here: slot free
    assert slots.reserve("c", 10.0, 0.0, 0)
    assert slots.release("b") == [] and slots.num_free(0) == 1
    assert slots.num_free(1) == 0 and not slots.reserve("d", 10.0, 0.0, 1)  # unreserved count


def test_unused_reservations_expire_but_attached_ones_do_not() -> None:
    slots = DecodeSlots(2)
    slots.reserve("idle", 1.0, 0.0, 0)
    slots.reserve("busy", 1.0, 0.0, 0)
    slots.attach("busy", "leg")
    assert slots.expire(0.5) == [] and slots.expire(1.0) == ["idle"]
    assert "busy" in slots and slots.release("busy") == ["leg"] and not slots.has_leg("leg")


# ------------------------------------------------------------------ one real decode worker
class CountingWorker(WorkerServer):
    """Records the most decodes it ever held at once (admitted or waiting for their KV)."""

    max_decodes = 0

    def _submit(self, identity: bytes, submit: p.Submit) -> None:
        super()._submit(identity, submit)
        self.max_decodes = max(self.max_decodes, len(self._requests) + len(self._held))


@contextmanager
def serving(name: str, role: WorkerRole, max_num_seqs: int = SLOTS) -> Iterator[CountingWorker]:
    """An in-process worker serving on a thread; stopped and joined even on failure."""
    relay = RelayConfig(RelaySecurity.insecure_plaintext())
    config = WorkerConfig(name, role, "dc-local", relay, engine_config(max_num_seqs))
    with CountingWorker(config) as server, serving_on_thread(server):
        yield server


def _answer(client: WorkerClient, request_id: str) -> p.Tokens:
    deadline = time.monotonic() + 10.0
    while (left_s := deadline - time.monotonic()) > 0:
        message = client.recv(left_s)
        if isinstance(message, p.Tokens) and message.request_id == request_id:
            return message
    raise AssertionError(f"no answer for {request_id}")


def _wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)


def test_a_decode_worker_grants_refuses_and_frees_its_slots() -> None:
    with (
        serving("d0", WorkerRole.DECODE) as worker,
        serving("p0", WorkerRole.PREFILL) as prefill,
        WorkerClient(worker.endpoint) as client,
        WorkerClient(prefill.endpoint) as prefill_client,
    ):
        for rid in ("a", "b"):
            client.send(p.Reserve(rid, 30.0))
            granted = _answer(client, rid)
            assert not granted.finished and not granted.error_kind
        client.send(p.Reserve("c", 30.0))
        refused = _answer(client, "c")
        assert refused.finished and refused.error_kind == "AdmissionRejected"
        assert "all 2 decode slots are taken" in refused.error_message
        report = client.recv(5.0)
        while not isinstance(report, p.LoadReport):
            report = client.recv(5.0)
        assert report.num_free_slots == 0  # routers see the reservations

        prompt = [(i * 37 + 11) % 256 for i in range(30)]  # a decode leg on reservation "a"
        client.send(p.Submit("leg-a", prompt, 5, ignore_eos=True, reservation_id="a"))
        served = collect(client, "leg-a", timeout_s=30)
        expected = ReferenceEngine(engine_config()).generate(
            [prompt], SamplingParams(5, 0.0, 0, ignore_eos=True)
        )[0]
        assert served.error_kind == "" and served.token_ids == expected
        client.send(p.Cancel("b"))  # the router frees "b": the leg finish freed "a"
        _wait_until(lambda: len(worker._slots) == 0)
        client.send(p.Reserve("d", 0.2))  # unused: expires after 0.2 s
        assert not _answer(client, "d").finished
        _wait_until(lambda: len(worker._slots) == 0, 5.0)

        prefill_client.send(p.Reserve("x", 30.0))
        refused = _answer(prefill_client, "x")
        assert (
            refused.error_kind == "AdmissionRejected" and "prefill worker" in refused.error_message
        )
        assert worker.max_decodes <= SLOTS


# --------------------------------------------------------- two router replicas, one burst
def _request(rid: str, prompt: list[int], max_tokens: int) -> GenerateRequest:
    return GenerateRequest(rid, prompt, max_tokens, temperature=0.0, seed=0, streaming=True,
                           deadline_s=60.0)  # fmt: skip


async def _outcome(orch: DisaggregatedOrchestrator, request: GenerateRequest) -> list[int] | str:
    tokens: list[int] = []
    try:
        async for chunk in orch.generate(request):
            tokens += chunk.token_ids
    except AdmissionRejected as exc:
        return str(exc)
    return tokens


def _prompt(k: int) -> list[int]:
    return [256] + [(i * 131 + k) % 256 for i in range(23)]


def test_two_router_replicas_never_oversubscribe_a_decode_worker() -> None:
    max_tokens = 24
    with ExitStack() as stack:
        prefill = stack.enter_context(serving("pd-p", WorkerRole.PREFILL, 8))
        decodes = [stack.enter_context(serving(f"d{k}", WorkerRole.DECODE)) for k in range(2)]
        specs = (
            WorkerSpec("pd-p", prefill.endpoint, False),
            *(WorkerSpec(d.config.worker_id, d.endpoint, False) for d in decodes),
        )

        async def scenario() -> tuple[list[list[int] | str], list[DisaggregatedOrchestrator]]:
            config = RouterConfig(specs, threshold_tokens=4096, control=None)
            routers = [DisaggregatedOrchestrator(config) for _ in range(2)]
            for router in routers:
                await router.start()
            try:
                burst = [
                    _outcome(router, _request(f"r{r}-{k}", _prompt(k), max_tokens))
                    for k in range(6)
                    for r, router in enumerate(routers)
                ]
                outcomes = await asyncio.wait_for(asyncio.gather(*burst), 60.0)
                again = [_outcome(routers[k % 2], _request(f"again-{k}", _prompt(k), max_tokens))
                         for k in range(2 * SLOTS)]  # fmt: skip
                outcomes += await asyncio.wait_for(asyncio.gather(*again), 60.0)
                one = await _outcome(routers[0], _request("t1-only", _prompt(99), 1))
                assert isinstance(one, list) and len(one) == 1
                return outcomes, routers
            finally:
                for router in routers:
                    await router.close()

        outcomes, routers = asyncio.run(scenario())
        burst, again = outcomes[:12], outcomes[12:]
        served = [o for o in burst if isinstance(o, list)]
        refused = [o for o in burst if isinstance(o, str)]
        assert len(served) + len(refused) == 12 and refused, outcomes
        assert len(served) >= 2 * SLOTS  # both decode workers were filled
        assert all("refused" in why for why in refused)
        assert sum(r.counters["slot_refused"] for r in routers) >= len(refused)
        assert all(isinstance(o, list) for o in again), again  # every slot came back
        reference = ReferenceEngine(engine_config())
        expected = [
            reference.generate([_prompt(k)], SamplingParams(max_tokens, 0.0, 0))[0]
            for k in range(6)
        ]
        burst_prompts = [k for k in range(6) for _ in routers]  # the burst's order
        for k, outcome in zip([*burst_prompts, *range(2 * SLOTS)], outcomes, strict=True):
            if isinstance(outcome, list):
                assert outcome == expected[k], k  # single-engine tokens
        for decode in decodes:
            assert decode.max_decodes <= SLOTS, decode.max_decodes
            _wait_until(lambda d=decode: len(d._slots) == 0 and not d._requests, 10.0)  # type: ignore[misc]
        assert sum(d.max_decodes for d in decodes) == 2 * SLOTS


@pytest.mark.parametrize("max_num_seqs", [1])
def test_a_full_decode_worker_answers_unavailable_without_hanging(max_num_seqs: int) -> None:
    with (
        serving("pd-p", WorkerRole.PREFILL, 4) as prefill,
        serving("d0", WorkerRole.DECODE, max_num_seqs) as decode,
        WorkerClient(decode.endpoint) as squatter,
    ):
        squatter.send(p.Reserve("held-by-another-router", 60.0))
        assert not _answer(squatter, "held-by-another-router").finished
        specs = (
            WorkerSpec("pd-p", prefill.endpoint, False),
            WorkerSpec("d0", decode.endpoint, False),
        )

        async def scenario() -> list[int] | str:
            router = DisaggregatedOrchestrator(RouterConfig(specs, control=None))
            await router.start()
            try:
                start = time.monotonic()
                outcome = await asyncio.wait_for(
                    _outcome(router, _request("r", _prompt(1), 4)), 10.0
                )
                assert time.monotonic() - start < 2.0  # a refusal is an answer, not a wait
                return outcome
            finally:
                await router.close()

        outcome = asyncio.run(scenario())
        assert isinstance(outcome, str) and "d0 refused" in outcome
        assert decode.max_decodes == 0
