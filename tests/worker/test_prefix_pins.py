"""A decode worker pins a reserved slot's cached prefix (issue 15 item 4): the grant of a
``Reserve`` with ``prefix_hashes`` says how much of it the engine holds (block aligned, ending
at a state snapshot for the hybrid model), and the pin goes with the slot: ``Cancel`` of the
reservation and its ``ttl_s`` give it back; hashes it does not hold pin nothing; a
``relay_from_tokens`` that cannot be a relay's start is refused, naming the field."""

from __future__ import annotations

import time
from typing import Any

from tests.harness import collect, serving_on_thread
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.prefix_cache import cache_key_for
from trtllm_prfaas.kv.hashing import block_hashes
from trtllm_prfaas.transport import RelayConfig, RelaySecurity
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.client import WorkerClient
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer

TINY = model_preset("tiny")
TPB = TINY.tokens_per_block  # 16


def _grant(client: WorkerClient, reserve: p.Reserve) -> p.Tokens:
    client.send(reserve)
    deadline = time.monotonic() + 10.0
    while (left_s := deadline - time.monotonic()) > 0:
        message = client.recv(left_s)
        if isinstance(message, p.Tokens) and message.request_id == reserve.request_id:
            assert not message.error_kind and not message.finished, message.error_message
            return message
    raise AssertionError(f"no grant for {reserve.request_id}")


def _wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)


def test_a_reserved_slot_pins_the_cached_prefix_until_it_is_freed() -> None:
    relay = RelayConfig(RelaySecurity.insecure_plaintext())
    engine = EngineConfig(model=TINY, num_blocks=128, chunk_size=64, enable_block_reuse=True)
    config = WorkerConfig("d0", WorkerRole.DECODE, "dc-local", relay, engine)
    prompt = [(i * 37 + 5) % 250 + 1 for i in range(100)]
    hashes = block_hashes(prompt[:-1], TPB, cache_key_for(TINY))  # the router's: 6 blocks
    with WorkerServer(config) as server:
        assert isinstance(server.engine, ReferenceEngine)
        with serving_on_thread(server), WorkerClient(server.endpoint) as client:
            client.send(p.Submit("warm", prompt, max_tokens=2))  # caches the prompt's blocks
            assert collect(client, "warm").finish_reason == "length"
            # the hybrid engine holds 6 blocks and its snapshot at floor(99/16)*16 = 96
            assert _grant(client, p.Reserve("r1", 30.0, hashes)).num_cached_tokens == 96
            assert _grant(client, p.Reserve("r1", 30.0, hashes)).num_cached_tokens == 96  # again
            assert list(server._pins) == ["r1"]
            client.send(p.Cancel("r1"))
            _wait_until(lambda: not server._pins)
            # 5 blocks asked, but the state is snapshotted at chunk ends (64) and at 96 only:
            # the pin steps back to 64, as admission's match would
            assert _grant(client, p.Reserve("r2", 0.2, hashes[:5])).num_cached_tokens == 64
            _wait_until(lambda: not server._pins)  # its ttl_s passed unused
            assert _grant(client, p.Reserve("r3", 30.0, [1, 2, 3])).num_cached_tokens == 0
            assert not server._pins  # nothing matched: nothing held
            client.send(p.Cancel("r3"))
            bad = p.Submit("bad", [*prompt, 7], 4, transfer_uuid="u1", relay_from_tokens=40)
            client.send(bad)
            answer = collect(client, "bad")
            assert answer.error_kind == "InvalidRequestError"
            assert "relay_from_tokens 40 must be a multiple of 16" in answer.error_message
        assert server.engine.leak_report() == []
        assert server.engine.blocks.num_cached == 6  # the cache itself stays
