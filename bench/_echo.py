"""Zero-cost echo servers for ``bench/router.py``, each run in its own (spawned) process.

Three servers, all answering ``max_tokens`` copies of ``ECHO_TOKEN`` as soon as asked:

- ``serve_direct``: the KServe gRPC front door (``FrontDoor``) over ``EchoOrchestrator``, an
  ``Orchestrator`` whose ``generate`` yields one final chunk at once (the baseline), and beside
  it the two HTTP doors (KServe v2 REST, OpenAI) over the same ``EchoOrchestrator``, each on its
  own ``HttpDoor`` thread as the gRPC door is on its own.
- ``serve_worker``: a real ``WorkerServer`` (control socket, serve loop, load reports, deadlines,
  ``TransferDone``) whose ``ReferenceEngine`` is swapped for ``EchoEngine`` after ``__init__``.
  ``EchoWorkerServer`` also answers every decode request's "is the relayed KV announced?" with
  COMPLETE, so the decode leg never waits for a relay (no KV moves; see ``bench/router.py``).
- ``serve_router``: the real ``RouterService`` (gRPC front door, KServe v2 REST and OpenAI
  doors on its loop, ``DisaggregatedOrchestrator``, metrics; no HTTP ``/metrics`` endpoint) in
  front of echo workers.

Each ``serve_*`` sends one ready message (its address, or ``{door: address}`` for the servers
with several doors: ``grpc`` as ``host:port``, ``rest`` and ``openai`` as ``http://host:port``)
on ``conn``, then serves until anything
(``None``) arrives on ``conn`` or the connection closes, and closes what it opened. Logging is
configured by the caller before this module is imported (project modules bind their loggers at
import time).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from trtllm_prfaas.config import model_preset
from trtllm_prfaas.connector.plans import Plan
from trtllm_prfaas.engines.engine import EngineConfig
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.engines.tokenizer import VOCAB_SIZE, ByteTokenizer
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator, TokenChunk
from trtllm_prfaas.router.frontdoor import FrontDoor, FrontDoorConfig
from trtllm_prfaas.router.http_door import HttpDoor, HttpDoorConfig
from trtllm_prfaas.router.kserve_rest import rest_app
from trtllm_prfaas.router.openai_door import build_openai_app
from trtllm_prfaas.router.orchestrator import RouterConfig, WorkerSpec
from trtllm_prfaas.router.service import RouterService
from trtllm_prfaas.transport import InboundStatus, RelayConfig, RelaySecurity
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer

__all__ = [
    "ECHO_TOKEN",
    "EchoEngine",
    "EchoOrchestrator",
    "EchoWorkerServer",
    "serve_direct",
    "serve_router",
    "serve_worker",
]

ECHO_TOKEN = ord("x")  # the byte tokenizer's id for "x": every answer is "xxx..."
MAX_NUM_SEQS = 4096  # echo engines never run out of decode slots


# ---- the direct path -----------------------------------------------------------------------


class EchoOrchestrator(Orchestrator):
    """Yields ``max_tokens`` echo tokens in one final chunk, at once."""

    def __init__(self, model_name: str = "tensorrt_llm", max_seq_len: int = 4096) -> None:
        self._model_name, self._max_seq_len = model_name, max_seq_len
        self.tokenizer = ByteTokenizer()

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        tokens = [ECHO_TOKEN] * request.max_tokens
        yield TokenChunk(tokens, chr(ECHO_TOKEN) * request.max_tokens, True, "length")


# ---- the routed path: an echo engine inside a real worker ---------------------------------


@dataclass
class _Free:
    """Stands in for the engine's slot allocator and block manager (the load report reads them)."""

    num_free: int = MAX_NUM_SEQS
    num_available: int = 0


@dataclass
class _EchoConnectorWorker:
    """What ``WorkerServer`` reads after a step: finished exports, ``engine id -> error``."""

    transfer_errors: dict[int, str | None] = field(default_factory=dict)


@dataclass
class _EchoConnector:
    worker: _EchoConnectorWorker = field(default_factory=_EchoConnectorWorker)


@dataclass
class _Queued:
    request_id: int
    max_tokens: int
    is_export: bool  # a prefill whose KV would be relayed: report its transfer done


class EchoEngine:
    """Exactly what ``WorkerServer`` uses of ``ReferenceEngine``; every step finishes everything.

    A queued request finishes on the next ``step()`` with ``max_tokens`` echo tokens; an export
    (a prefill with a ``relay_endpoint``) also reports its transfer as done, without error.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: list[_Queued] = []
        self.running: dict[int, _Queued] = {}  # always empty: nothing outlives a step
        self.slots = _Free(num_free=config.max_num_seqs)
        self.blocks = _Free(num_available=config.num_blocks)
        self.connector = _EchoConnector()

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        request_id: int,
        plan: Plan | None = None,
    ) -> int:
        is_export = bool(plan and plan.relay_endpoints)
        self.waiting.append(_Queued(request_id, sampling.max_tokens, is_export))
        return request_id

    def step(self) -> list[RequestOutput]:
        done, self.waiting = self.waiting, []
        for queued in done:
            if queued.is_export:
                self.connector.worker.transfer_errors[queued.request_id] = None
        return [
            RequestOutput(q.request_id, [ECHO_TOKEN] * q.max_tokens, True, "length") for q in done
        ]

    def abort(self, request_id: int) -> RequestOutput | None:
        self.waiting = [q for q in self.waiting if q.request_id != request_id]
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting)


class EchoWorkerServer(WorkerServer):
    """A ``WorkerServer`` with ``EchoEngine`` as its engine; decode legs never wait for KV.

    The real connector runtime stays open (and is closed by ``close()``), but no KV moves: the
    decode worker treats every relayed transfer as already complete.
    """

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.engine = EchoEngine(self.engine.config)  # type: ignore[assignment]

    def _transfer_status(self, submit: p.Submit) -> InboundStatus | None:
        return InboundStatus.COMPLETE


def worker_config(role: str) -> WorkerConfig:
    """An echo worker of the local PD cluster: tiny model shape, plaintext relay, loopback.

    ``MAX_NUM_SEQS`` from the start, not only in ``EchoEngine``: the worker sizes what it counts
    from the engine it builds (its decode-slot reservations too), and a tiny reference engine
    with that many sequence slots costs little."""
    engine = EngineConfig(model=model_preset("tiny"), num_blocks=64, max_num_seqs=MAX_NUM_SEQS)
    relay = RelayConfig(security=RelaySecurity.insecure_plaintext())
    return WorkerConfig(f"echo-{role}", WorkerRole(role), "dc-local", relay, engine)


# ---- process entry points ------------------------------------------------------------------


def _wait_for_stop(conn: Connection) -> None:
    with contextlib.suppress(EOFError):  # EOF: the parent is gone
        conn.recv()


def serve_worker(role: str, conn: Connection) -> None:
    """An echo worker (``role``: "prefill" or "decode"); ready message: its control endpoint."""
    with EchoWorkerServer(worker_config(role)) as server:
        thread = threading.Thread(target=server.serve, name=f"echo-{role}")
        thread.start()
        try:
            conn.send(server.endpoint)
            _wait_for_stop(conn)
        finally:
            server.stop()
            thread.join(10.0)


def serve_direct(conn: Connection) -> None:
    """The gRPC, REST and OpenAI doors over one ``EchoOrchestrator``; ready: ``{door: address}``."""
    echo = EchoOrchestrator()
    with (
        FrontDoor(echo, FrontDoorConfig(port=0)) as door,
        HttpDoor(rest_app(echo), HttpDoorConfig(port=0), name="kserve-rest") as rest,
        HttpDoor(build_openai_app(echo), HttpDoorConfig(port=0), name="openai") as openai,
    ):
        conn.send({"grpc": door.address, "rest": rest.url, "openai": openai.url})
        _wait_for_stop(conn)


def serve_router(workers: list[tuple[str, str, bool]], conn: Connection) -> None:
    """The router over ``workers`` (name, control endpoint, is_prfaas), with its gRPC, REST and
    OpenAI doors; ready message: ``{door: address}``."""
    specs = tuple(WorkerSpec(name, endpoint, is_prfaas) for name, endpoint, is_prfaas in workers)
    frontdoor = FrontDoorConfig(port=0)
    with RouterService(RouterConfig(specs), frontdoor, metrics_port=None, http_port=0,
                       openai_port=0) as router:  # fmt: skip
        conn.send({"grpc": router.address, "rest": router.http_url, "openai": router.openai_url})
        _wait_for_stop(conn)
