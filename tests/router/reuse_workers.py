"""In-process reference workers with block reuse, for the prefix-cache tests of the router
(``test_relay_from.py``, ``test_cache_move.py``): each serves on a thread; on the way out every
one goes idle, is stopped and, before it closes, checked for leaks (pinned prefixes, blocks,
snapshots, requests). Plus the small helpers those tests share."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.transport import RelayConfig, RelaySecurity
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer

__all__ = ["prompt", "reference", "reuse_workers", "turn", "until"]

TEMPERATURE, SEED = 0.7, 9


@contextlib.contextmanager
def reuse_workers(
    model: ModelConfig, roles: Mapping[str, tuple[WorkerRole, str]], **worker_options: Any
) -> Iterator[dict[str, WorkerServer]]:
    """One worker per ``roles`` entry (name -> (role, cluster)), plaintext relay, block reuse
    on; ``worker_options`` go to every ``WorkerConfig``. Asserts no leak on any of them."""
    relay = RelayConfig(security=RelaySecurity.insecure_plaintext())
    engine = EngineConfig(model=model, num_blocks=512, chunk_size=64, enable_block_reuse=True)
    servers: dict[str, WorkerServer] = {}
    threads: list[threading.Thread] = []
    leaks: dict[str, list[str]] = {}
    try:
        for name, (role, cluster) in roles.items():
            config = WorkerConfig(name, role, cluster, relay, engine, **worker_options)
            servers[name] = WorkerServer(config)
            threads.append(threading.Thread(target=servers[name].serve, daemon=True))
            threads[-1].start()
        yield servers
        deadline = time.monotonic() + 10.0  # pinned saves and acks settle
        while any(s.engine.has_unfinished() for s in servers.values()):
            assert time.monotonic() < deadline, "workers did not go idle"
            time.sleep(0.02)
    finally:
        for server in servers.values():
            server.stop()
        for thread in threads:
            thread.join(timeout=10)
        for name, server in servers.items():
            assert isinstance(server.engine, ReferenceEngine)
            leaks[name] = server.engine.leak_report() + [f"pins {p}" for p in server._pins]
            server.close()
        assert not any(t.is_alive() for t in threads)
    assert all(not leak for leak in leaks.values()), leaks


def prompt(n: int, salt: int) -> list[int]:
    return [(i * 131 + salt) % 255 + 1 for i in range(n)]


def reference(model: ModelConfig, tokens: list[int], max_tokens: int) -> list[int]:
    """One cold engine, block reuse off: what every route must give bit for bit."""
    engine = ReferenceEngine(EngineConfig(model=model, num_blocks=512))
    return engine.generate([tokens], SamplingParams(max_tokens, TEMPERATURE, SEED))[0]


async def until(predicate: Callable[[], Any], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def turn(orch: Any, request_id: str, tokens: list[int], max_tokens: int) -> list[int]:
    """One request through ``orch`` (sampled as ``reference``); its generated tokens."""
    request = GenerateRequest(request_id, tokens, max_tokens, temperature=TEMPERATURE,
                              seed=SEED, streaming=True, deadline_s=60.0)  # fmt: skip
    out: list[int] = []
    async for chunk in orch.generate(request):
        out += chunk.token_ids
    return out
