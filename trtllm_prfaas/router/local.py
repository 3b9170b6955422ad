"""``LocalEngineOrchestrator``: the ``Orchestrator`` over one in-process reference engine.

Single-engine mode, and the ground truth the disaggregated router's tokens are compared against.

Threads: one background thread owns the engine; nothing else touches it. Callers talk to it
through a thread-safe command queue (submit, abort, call); the thread steps the engine while it
has work and blocks on the queue while it is idle. Each request's outputs are handed to the
caller's event loop with ``loop.call_soon_threadsafe`` into a per-request ``asyncio.Queue``.

Failure rules: ``add_request`` errors (bad input, no capacity) reach the caller as raised
errors; an engine-failed request raises its error; an exception escaping ``engine.step()`` fails
every in-flight request with ``EngineError`` and the thread keeps serving. A request past its
deadline is aborted in the engine and raises ``TransferTimeout``. ``close()`` fails whatever is
still in flight with ``EngineError``, aborts it in the engine, and joins the thread.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from trtllm_prfaas.engines.engine import ReferenceEngine
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.engines.tokenizer import Tokenizer
from trtllm_prfaas.errors import EngineError, PrfaasError, TransferTimeout
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator, TokenChunk
from trtllm_prfaas.router.detokenize import IncrementalDetokenizer
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = ["LocalEngineOrchestrator"]

log = get_logger(__name__)
T = TypeVar("T")

_IDLE_WAIT_S = 0.05  # how long the idle thread blocks on the command queue before re-checking


@dataclass
class _Sink:
    """Where one request's outputs go: a queue on the caller's loop."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[RequestOutput | PrfaasError] = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | PrfaasError) -> bool:
        """Hand ``item`` to the caller's loop; False when that loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # the loop was closed: nobody is listening any more
            return False
        return True


@dataclass(frozen=True)
class _Submit:
    engine_id: int
    request: GenerateRequest
    sink: _Sink


@dataclass(frozen=True)
class _Abort:
    engine_id: int


@dataclass(frozen=True)
class _Call:
    fn: Callable[[ReferenceEngine], Any]
    future: Future[Any]


_Command = _Submit | _Abort | _Call | None  # None: stop


class LocalEngineOrchestrator(Orchestrator):
    """Serves requests from one ``ReferenceEngine`` stepped by a background thread.

    Use as a context manager (or call ``close()``); the thread starts in ``__init__``.
    ``tokenizer`` (default: the engine's byte tokenizer) encodes prompts and decodes the text;
    the engine's model must have its vocabulary (``ModelConfig.vocab_size``/``eos_id``).
    """

    def __init__(
        self,
        engine: ReferenceEngine,
        model_name: str = "tensorrt_llm",
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self._engine = engine
        self.tokenizer: Tokenizer = tokenizer or engine.tokenizer
        self._model_name = model_name
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._sinks: dict[int, _Sink] = {}  # engine id -> sink; engine thread only
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="local-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ Orchestrator API
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_seq_len(self) -> int:
        return self._engine.cfg.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def is_ready(self) -> bool:
        return self._thread.is_alive() and not self._closed.is_set()

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        if not self.is_ready():
            raise EngineError("the local engine is closed")
        deadline = time.monotonic() + request.deadline_s
        sink = _Sink(asyncio.get_running_loop())
        engine_id = next(self._ids)
        self._commands.put(_Submit(engine_id, request, sink))
        decoder, pending, finished = IncrementalDetokenizer(self.tokenizer), list[int](), False
        try:
            while not finished:
                out = await self._next_output(sink, request, deadline)
                finished = out.finished
                pending += out.new_token_ids
                if request.streaming or finished:
                    yield self._chunk(decoder, pending, out)
                    pending = []
        finally:
            if not finished:  # consumer left, deadline passed or an error: free the engine's blocks
                self._commands.put(_Abort(engine_id))

    # ------------------------------------------------------------------------ extras
    def call(self, fn: Callable[[ReferenceEngine], T], timeout_s: float = 10.0) -> T:
        """Run ``fn(engine)`` on the engine thread and return its result (tests, health)."""
        future: Future[T] = Future()
        self._commands.put(_Call(fn, future))
        return future.result(timeout=timeout_s)

    def leak_report(self, timeout_s: float = 10.0) -> list[str]:
        """The engine's leak report, read on its own thread; [] when idle and clean."""
        return self.call(lambda engine: engine.leak_report(), timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (in-flight requests fail with EngineError) and join it. Idempotent."""
        if not self._closed.is_set():
            self._closed.set()
            self._commands.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise EngineError(f"engine thread did not stop within {timeout_s}s")

    def __enter__(self) -> LocalEngineOrchestrator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------- caller side
    @staticmethod
    async def _next_output(sink: _Sink, request: GenerateRequest, deadline: float) -> RequestOutput:
        remaining_s = deadline - time.monotonic()
        try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(max(remaining_s, 0.0)):
                item = await sink.outputs.get()
        except TimeoutError:
            raise TransferTimeout(
                f"request {request.request_id} did not finish within its deadline of "
                f"{request.deadline_s:g}s"
            ) from None
        if isinstance(item, PrfaasError):
            raise item
        if item.error is not None:
            raise item.error
        if item.finish_reason == "aborted":
            raise EngineError(f"request {request.request_id} was aborted by the engine")
        return item

    @staticmethod
    def _chunk(
        decoder: IncrementalDetokenizer, token_ids: list[int], out: RequestOutput
    ) -> TokenChunk:
        text = decoder.push(token_ids)
        if out.finished:
            text += decoder.flush()
        return TokenChunk(
            token_ids, text, out.finished, out.finish_reason if out.finished else None
        )

    # ------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                busy = self._engine.has_unfinished()
                stopping = self._drain_commands(block=not busy)
                if not stopping and self._engine.has_unfinished():
                    self._step()
            except Exception as exc:  # never die silently: fail what is in flight, keep serving
                log.exception("engine_thread_error")
                self._fail_all(EngineError(f"engine thread error: {exc}"))
        self._shutdown()

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; True when asked to stop."""
        try:
            command = (
                self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            return False
        while True:
            if command is None:
                return True
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return False

    def _apply(self, command: _Submit | _Abort | _Call) -> None:
        if isinstance(command, _Submit):
            self._submit(command)
        elif isinstance(command, _Abort):
            self._sinks.pop(command.engine_id, None)
            self._engine.abort(command.engine_id)
        else:
            self._run_call(command)

    def _submit(self, command: _Submit) -> None:
        req = command.request
        try:
            sampling = SamplingParams(req.max_tokens, req.temperature, req.seed)
            self._engine.add_request(req.prompt_token_ids, sampling, command.engine_id)
        except PrfaasError as exc:
            command.sink.put(exc)
            return
        self._sinks[command.engine_id] = command.sink
        log.debug("request_submitted", request_id=req.request_id, engine_id=command.engine_id)

    def _run_call(self, command: _Call) -> None:
        try:
            command.future.set_result(command.fn(self._engine))
        except Exception as exc:  # handed to the caller, not swallowed
            command.future.set_exception(exc)

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:  # a bug in the engine: fail what is in flight, keep serving
            log.exception("engine_step_failed")
            self._fail_all(EngineError(f"engine step failed: {exc}"))
            return
        for out in outputs:
            self._dispatch(out)

    def _dispatch(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if sink is None:
            return
        if out.finished:
            del self._sinks[out.request_id]
        if not sink.put(out) and not out.finished:
            self._sinks.pop(out.request_id, None)
            self._engine.abort(out.request_id)

    def _fail_all(self, error: PrfaasError) -> None:
        for engine_id, sink in list(self._sinks.items()):
            sink.put(error)
            self._engine.abort(engine_id)
        self._sinks.clear()

    def _shutdown(self) -> None:
        self._fail_all(EngineError("the local engine was closed while the request was running"))
        while True:  # fail calls and submissions that raced with close()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Submit):
                command.sink.put(EngineError("the local engine is closed"))
            elif isinstance(command, _Call):
                command.future.set_exception(EngineError("the local engine is closed"))
