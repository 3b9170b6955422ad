"""An in-process fake of a worker pool that speaks the real control protocol, instantly.

For router tests and benchmarks that need the orchestrator's real code path (ZeroMQ sockets,
``policy.route``, slot reservation, streaming) without engines: each :class:`FakeWorker` binds a
ROUTER socket on loopback and, on the router's event loop, answers

- ``Ping`` with its ``WorkerInfo``; ``SetRole`` by switching role and answering ``WorkerInfo``;
- ``Submit``: a prefill worker returns one token (t1) and ``TransferDone`` after
  ``prefill_s_per_token`` x prompt length, a decode worker ``max_tokens`` tokens after
  ``decode_delay_s``. Tokens are a pure function of the prompt (``fake_tokens``); a decode leg
  (the prompt followed by t1, ``num_skipped_draws=1``) continues the original prompt's answer, so
  every route gives the same tokens, as on real workers (``first_token`` and
  ``prefill_error`` script a prefill's t1 or its failure, ``relay_wait_s`` a relayed decode's
  wait for its KV; ``submits`` records what arrived);
- ``Reserve`` as a real decode worker does (``worker/slots.py``: granted while one of its
  ``max_num_seqs`` slots is free, refused otherwise or on a prefill worker); a decode leg holds
  its slot until its answer is sent; ``Cancel`` of a reservation frees it;
- ``LoadReport`` whenever :meth:`FakeWorker.report` is called (the test scripts the load the
  router sees) and on every ``report_interval_s`` with the last scripted values.

Prefix caches: ``prefix_cache="approximate"`` only says so in ``WorkerInfo``; with ``"events"``
a prefill worker keeps the simulator's cache model (``sim/caches.py``: ``max_cached_blocks``
blocks of 16 tokens, hybrid snapshots, LRU) under the key its ``WorkerInfo`` names, stores each
prefilled prompt's blocks in it and sends the KV cache events (``KvEvents``) just before the
prefill's answer, so the router's index has them when the leg ends (the sim/router parity test);
it answers ``Ping`` with its snapshot after its ``WorkerInfo`` (the real worker sends it with
its next report: a router keeps one that comes before its join for the join).

Failures: ``silent`` stops every message while the connection stays up (a wedged process:
its libzmq still answers heartbeats); :meth:`FakeWorker.kill` closes the socket (as SIGKILL
does: the kernel closes the TCP connection, the router's socket monitor sees it);
:meth:`FakeWorker.restart` binds a fresh socket at the same endpoint (a restarted worker: it
knows no router until one sends it something, as ``worker/server.py``'s ``_routers``).

``FakeWorkerPool`` is an async context manager: it starts every worker and closes their sockets
and tasks on exit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio
from msgspec.structs import replace

from trtllm_prfaas.kv.hashing import CacheKey, block_hashes
from trtllm_prfaas.sim.caches import CacheModel, NodePrefixCache
from trtllm_prfaas.tasks import cancel_and_wait
from trtllm_prfaas.vocabulary import Role, parse_role
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.slots import DecodeSlots

__all__ = ["FAKE_CACHE_KEY", "FakeWorker", "FakeWorkerPool", "FakeWorkerSpec", "fake_tokens"]

FAKE_TOKENS_PER_BLOCK = 16
FAKE_CACHE_KEY = CacheKey("fake", "HND", "bfloat16", 0)  # an "events" fake's blocks' key


def fake_tokens(prompt: list[int], count: int) -> list[int]:
    """``count`` deterministic token ids for ``prompt`` (bytes 0..255)."""
    seed = sum((i + 1) * t for i, t in enumerate(prompt[-16:])) + len(prompt)
    return [(seed * 31 + k * 17) % 256 for k in range(count)]


@dataclass(frozen=True)
class FakeWorkerSpec:
    """Name, role (``prefill``/``decode``), cluster; engine-like limits for ``WorkerInfo``."""

    name: str
    role: str
    cluster: str = "dc-local"
    max_seq_len: int = 8192
    max_num_seqs: int = 16
    num_blocks: int = 512
    prefill_s_per_token: float = 0.0
    decode_delay_s: float = 0.005
    relay_wait_s: float = 0.0  # a decode leg with a transfer waits this much more (its KV)
    first_token: int | None = None  # a prefill answers this t1 instead of the fake one
    prefill_error: str = ""  # a prefill answers with this error kind instead of t1
    prefix_cache: str = ""  # WorkerInfo.prefix_cache: "approximate" (reuses, reports nothing)
    max_cached_blocks: int = 4096  # "events": the modelled cache's capacity


class FakeWorker:
    """One fake worker on the running event loop (see the module doc)."""

    def __init__(
        self, spec: FakeWorkerSpec, ctx: zmq.asyncio.Context, report_interval_s: float
    ) -> None:
        self.spec = spec
        self.role = parse_role(spec.role, f"FakeWorkerSpec {spec.name}")
        self._ctx = ctx
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.bind("tcp://127.0.0.1:0")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.routers: set[bytes] = set()
        self.num_submits = 0
        self.submits: list[p.Submit] = []  # every Submit received, in order
        self.slots = DecodeSlots(spec.max_num_seqs)
        self.silent = False  # True: sends nothing more (reports, replies), as a killed worker
        self.last_report = p.LoadReport(
            spec.name, 0, 0, spec.max_num_seqs, spec.num_blocks, 0, role=spec.role
        )
        self._interval_s = report_interval_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.cache: NodePrefixCache | None = None
        if spec.prefix_cache == "events":
            model = CacheModel(spec.max_cached_blocks, FAKE_TOKENS_PER_BLOCK, is_hybrid=True)
            self.cache = NodePrefixCache(model)

    def start(self) -> None:
        self._spawn(self._serve())
        self._spawn(self._tick())

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await cancel_and_wait(list(self._tasks), 5.0, "fake worker")
        self.socket.close(linger=0)

    async def kill(self) -> None:
        """Die as a SIGKILLed worker: tasks stop, the socket closes (its connections with it)."""
        await self.close()

    def restart(self) -> None:
        """Come back at the same endpoint with a new socket; knows no router yet."""
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.bind(self.endpoint)
        self.routers = set()
        self.start()

    def info(self) -> p.WorkerInfo:
        s = self.spec
        relay = f"tcp://127.0.0.1:1/{s.name}" if self.role == Role.DECODE else ""
        key = FAKE_CACHE_KEY if self.cache is not None else CacheKey("fake", "", "", 0)
        return p.WorkerInfo(
            s.name, self.role, s.cluster, key.model_id, s.max_seq_len, FAKE_TOKENS_PER_BLOCK,
            s.num_blocks, s.max_num_seqs, relay, kv_bytes_per_token=1024, kv_state_bytes=65536,
            prefix_cache=s.prefix_cache, kv_layout=key.layout, kv_dtype=key.dtype,
        )  # fmt: skip

    async def report(self, **fields: object) -> None:
        """Send a ``LoadReport`` with ``fields`` changed (kept for the periodic reports)."""
        self.last_report = replace(self.last_report, role=self.role, **fields)  # type: ignore[arg-type]
        await self._broadcast(self.last_report)

    async def _broadcast(self, message: p.Message) -> None:
        if self.silent:
            return
        for identity in self.routers:
            await self.socket.send_multipart([identity, p.encode_message(message)])

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._broadcast(self.last_report)

    async def _serve(self) -> None:
        while True:
            identity, frame = await self.socket.recv_multipart()
            self.routers.add(identity)
            try:
                message = p.decode_message(frame)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            delay_s, replies = self._answer(message)
            leg_id = message.request_id if isinstance(message, p.Submit) else None
            self._spawn(self._reply(identity, delay_s, replies, leg_id))

    async def _reply(
        self, identity: bytes, delay_s: float, replies: list[p.Message], leg_id: str | None
    ) -> None:
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            if self.silent:
                return
            for reply in replies:
                await self.socket.send_multipart([identity, p.encode_message(reply)])
        finally:
            if leg_id is not None:
                self.slots.leg_ended(leg_id)

    def _reserve(self, message: p.Reserve) -> p.Tokens:
        rid = message.request_id
        if self.role == Role.DECODE and self.slots.reserve(rid, message.ttl_s, 0.0, 0):
            return p.Tokens(rid, [])
        why = f"fake worker {self.spec.name} refused a decode slot ({self.role})"
        return p.Tokens(rid, [], True, "error", "AdmissionRejected", why)

    def _answer(self, message: p.Message) -> tuple[float, list[p.Message]]:
        if isinstance(message, p.Ping):  # as a real worker: the snapshot it owes the pinger
            return 0.0, [self.info(), *self._cache_snapshot()]
        if isinstance(message, p.SetRole):
            self.role = parse_role(message.role, "SetRole")
            self.last_report = replace(self.last_report, role=self.role)
            return 0.0, [self.info()]
        if isinstance(message, p.Reserve):
            return 0.0, [self._reserve(message)]
        if isinstance(message, p.Cancel):
            self.slots.release(message.request_id)
            self.slots.detach(message.request_id)
            return 0.0, []
        if not isinstance(message, p.Submit):
            return 0.0, []
        self.num_submits += 1
        self.submits.append(message)
        prompt, rid = message.prompt_token_ids, message.request_id
        prefill_s = len(prompt) * self.spec.prefill_s_per_token
        if self.role == Role.PREFILL and self.spec.prefill_error:
            kind = self.spec.prefill_error
            return prefill_s, [p.Tokens(rid, [], True, "error", kind, "scripted prefill failure")]
        if self.role == Role.PREFILL and message.transfer_uuid:
            t1 = (
                fake_tokens(prompt, 1) if self.spec.first_token is None else [self.spec.first_token]
            )
            done: list[p.Message] = [p.Tokens(rid, t1, True, "length"), p.TransferDone(rid)]
            return prefill_s, self._cache_events(prompt) + done
        res = message.reservation_id
        if res is not None and not (
            (res in self.slots or self.slots.reserve(res, message.deadline_s, 0.0, 0))
            and self.slots.attach(res, rid)
        ):
            why = f"fake worker {self.spec.name}: no decode slot"
            return 0.0, [p.Tokens(rid, [], True, "error", "AdmissionRejected", why)]
        # A decode leg's prompt ends with t1, sampled elsewhere: the answer continues the
        # original prompt's, so every route gives the same tokens.
        skipped = message.num_skipped_draws
        original = prompt[: len(prompt) - skipped]
        tokens = fake_tokens(original, message.max_tokens + skipped)[skipped:]
        relayed = len(prompt) - 1 if message.transfer_uuid else 0  # as if the relay delivered
        delay_s = self.spec.decode_delay_s + (self.spec.relay_wait_s if relayed else 0.0)
        return delay_s, [p.Tokens(rid, tokens, True, "length", "", "", relayed)]

    def _cache_snapshot(self) -> list[p.Message]:
        """An ``"events"`` worker's snapshot (its events are drained as they are recorded)."""
        return (
            []
            if self.cache is None
            else [p.KvEvents(self.spec.name, snapshot=self.cache.log.snapshot())]
        )

    def _cache_events(self, prompt: list[int]) -> list[p.Message]:
        """An ``"events"`` prefill worker caches the prompt: the events it reports (or none)."""
        if self.cache is None:
            return []
        chain = block_hashes(prompt[:-1], FAKE_TOKENS_PER_BLOCK, FAKE_CACHE_KEY)
        self.cache.store(chain)
        return [p.KvEvents(self.spec.name, batch=self.cache.drain())]


class FakeWorkerPool:
    """Fake workers by name; ``async with FakeWorkerPool(specs) as pool`` starts and closes them."""

    def __init__(self, specs: list[FakeWorkerSpec], report_interval_s: float = 0.05) -> None:
        self._ctx = zmq.asyncio.Context()
        self.workers = {s.name: FakeWorker(s, self._ctx, report_interval_s) for s in specs}

    def __getitem__(self, name: str) -> FakeWorker:
        return self.workers[name]

    async def __aenter__(self) -> FakeWorkerPool:
        for worker in self.workers.values():
            worker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers.values():
            await worker.close()
        self._ctx.term()
