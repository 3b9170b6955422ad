"""The CPU host driver for KV cache connectors: the connector-facing half of the reference engine.

``ConnectorHost`` is mixed into ``ReferenceEngine``. It builds ``SchedulerOutput`` exactly as
TensorRT-LLM's ``KvCacheConnectorSchedulerOutputManager`` does, binds the metadata, starts
loads, and runs the ``get_finished`` bookkeeping (ids passed in once, returned later, parked
loads rejoining, pinned saves releasing). It also enforces what TensorRT-LLM leaves implicit:
connector calls are timed (``hook_seconds``), exceptions from a connector become
``ConnectorError`` naming the call, an id returned before it was passed in is a contract
violation, and loads or saves that outlive ``connector_timeout_s`` are ended (a worker with the
``SupportsCancel`` capability is told; one with ``SupportsLoadFailures`` reports failed loads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trtllm_prfaas.connector.base import (
    RequestData,
    SchedulerOutput,
    SupportsCancel,
    SupportsLoadFailures,
)
from trtllm_prfaas.errors import ConnectorError, PrfaasError, TransferTimeout, TransportError
from trtllm_prfaas.telemetry.logging import get_logger

if TYPE_CHECKING:
    from trtllm_prfaas.connector.base import ConnectorPair
    from trtllm_prfaas.engines.batch import SequenceChunk
    from trtllm_prfaas.engines.engine import EngineConfig
    from trtllm_prfaas.engines.request import LlmRequest, RequestOutput, RequestState

__all__ = ["ConnectorHost"]

log = get_logger(__name__)


class ConnectorHost:
    """Mixin: the engine's connector bookkeeping. Needs ``connector``, ``running``, ``config``,
    ``_free`` and ``_fail`` from the engine."""

    connector: ConnectorPair | None
    running: dict[int, LlmRequest]
    config: EngineConfig
    _free: Callable[[LlmRequest, RequestState], None]
    _fail: Callable[[LlmRequest, PrfaasError], RequestOutput]

    def _init_connector_host(self) -> None:
        self._reported_tokens: dict[int, int] = {}  # what build_connector_meta already saw
        self._reported_blocks: dict[int, int] = {}
        self._matched_this_iteration: dict[int, int] = {}  # sync matches, subtracted once
        self._new_loading: list[int] = []  # not yet passed to get_finished
        self._new_saving: list[int] = []
        self._passed: set[int] = set()  # passed to get_finished, not yet returned
        self._deadlines: dict[int, float] = {}  # parked loads and pinned saves
        self.hook_seconds = 0.0

    def _connector_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call one connector method, timed; translate foreign exceptions at this boundary."""
        start = time.perf_counter()
        try:
            return fn(*args)
        except PrfaasError:
            raise
        except Exception as exc:
            raise ConnectorError(f"connector {fn.__qualname__} failed: {exc!r}") from exc
        finally:
            self.hook_seconds += time.perf_counter() - start

    def _record_sync_match(self, request_id: int, matched: int) -> None:
        if matched:
            self._matched_this_iteration[request_id] = matched

    def _bind_meta(self, scheduled: list[LlmRequest], chunks: list[SequenceChunk]) -> None:
        """build_connector_meta -> bind_connector_meta -> start_load_kv, for this iteration."""
        assert self.connector is not None
        output = SchedulerOutput()
        for req, chunk in zip(scheduled, chunks, strict=True):
            rid, is_new = req.request_id, req.request_id not in self._reported_tokens
            tokens = req.get_tokens(0)
            data = RequestData(
                request_id=rid,
                new_tokens=tokens[self._reported_tokens.get(rid, 0) :],
                new_block_ids=req.block_ids[self._reported_blocks.get(rid, 0) :],
                computed_position=chunk.start_pos - self._matched_this_iteration.get(rid, 0),
                num_scheduled_tokens=len(chunk.token_ids),
            )
            self._reported_tokens[rid], self._reported_blocks[rid] = len(tokens), len(req.block_ids)
            (output.new_requests if is_new else output.cached_requests).append(data)
        self._matched_this_iteration.clear()
        meta = self._connector_call(self.connector.scheduler.build_connector_meta, output)
        self._connector_call(self.connector.worker.bind_connector_meta, meta)
        self._connector_call(self.connector.worker.start_load_kv, None)

    def _poll_connector(self) -> list[RequestOutput]:
        """get_finished: parked loads rejoin the batch, pinned saves release their blocks."""
        assert self.connector is not None
        saving, loading = self._new_saving, self._new_loading
        self._new_saving, self._new_loading = [], []
        self._passed.update(saving + loading)
        done_saving, done_loading = self._connector_call(
            self.connector.worker.get_finished, saving, loading
        )
        outputs: list[RequestOutput] = []
        for rid in list(done_saving) + list(done_loading):
            if rid not in self._passed:
                raise ConnectorError(f"get_finished returned request {rid} before it was passed in")
            self._passed.discard(rid)
        for rid in done_loading:
            req = self.running.get(rid)
            if req is not None:
                self._loaded(req)
        for rid in done_saving:
            req = self.running.get(rid)
            if req is not None:
                self._free(req, _state("FINISHED"))
        outputs += self._handle_failed_loads()
        outputs += self._expire_connector_waits()
        return outputs

    def _handle_failed_loads(self) -> list[RequestOutput]:
        """Capability ``SupportsLoadFailures``: failures as data; ``on_load_failure`` decides."""
        assert self.connector is not None
        worker = self.connector.worker
        outputs: list[RequestOutput] = []
        if not isinstance(worker, SupportsLoadFailures):
            return outputs
        for rid, reason in self._connector_call(worker.get_failed_loads):
            self._passed.discard(rid)
            req = self.running.get(rid)
            if req is None or req.state is not _state("LOADING"):
                continue
            if self.config.on_load_failure == "fail":
                outputs.append(self._fail(req, TransportError(f"request {rid}: {reason}")))
                continue
            log.warning("connector_load_failed_recomputing", request_id=rid, reason=reason)
            self._deadlines.pop(rid, None)
            self._recompute(req)
        return outputs

    def _recompute(self, req: LlmRequest) -> None:
        """Forget what the connector supplied: prefill the whole prompt here."""
        raise NotImplementedError

    def _loaded(self, req: LlmRequest) -> None:
        self._deadlines.pop(req.request_id, None)
        req.state = _state("CONTEXT")

    def _expire_connector_waits(self) -> list[RequestOutput]:
        now, outputs = time.monotonic(), []
        for rid, deadline in list(self._deadlines.items()):
            req = self.running.get(rid)
            if req is None or deadline > now:
                continue
            timeout = self.config.connector_timeout_s
            if req.state is _state("LOADING"):
                self._cancel_load(req)
                outputs.append(
                    self._fail(
                        req,
                        TransferTimeout(
                            f"request {rid}: connector load not finished within {timeout}s"
                        ),
                    )
                )
            else:
                self._cancel_hook("cancel_save", rid)
                log.error("connector_save_timeout", request_id=rid, timeout_s=timeout)
                self._free(req, _state("FAILED"))
        return outputs

    def _cancel_load(self, req: LlmRequest) -> None:
        self._cancel_hook("cancel_load", req.request_id)

    def _cancel_hook(self, name: str, request_id: int) -> None:
        self._passed.discard(request_id)
        self._deadlines.pop(request_id, None)
        if request_id in self._new_loading:
            self._new_loading.remove(request_id)
        worker = self.connector.worker if self.connector else None
        if isinstance(worker, SupportsCancel):
            hook = worker.cancel_load if name == "cancel_load" else worker.cancel_save
            self._connector_call(hook, request_id)

    def _forget(self, request_id: int) -> None:
        """Drop per-request bookkeeping once the request is gone."""
        self._reported_tokens.pop(request_id, None)
        self._reported_blocks.pop(request_id, None)


def _state(name: str) -> RequestState:
    from trtllm_prfaas.engines.request import RequestState

    return RequestState[name]
