"""Connector fakes for the host-loop tests: a recorder of every call, and async variants of the
host-memory connector. (The real in-process connector is ``connector.host_memory``.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trtllm_prfaas.connector.base import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    SupportsCancel,
)
from trtllm_prfaas.connector.host_memory import (
    HostMemoryConnectorScheduler,
    HostMemoryConnectorWorker,
)


@dataclass
class CallLog:
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class RecordingScheduler(KvCacheConnectorScheduler):  # type: ignore[misc]
    """Claims nothing; optionally pins finished requests' blocks for ``save_polls`` polls."""

    def __init__(self, llm_args: Any, log: CallLog, pin_saves: bool = False) -> None:
        super().__init__(llm_args)
        self.log, self.pin_saves = log, pin_saves
        self.outputs: list[Any] = []

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        self.log.calls.append(("get_num_new_matched_tokens", request.request_id))
        return 0, False

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        self.log.calls.append(("update_state_after_alloc", (request.request_id, list(block_ids))))

    def build_connector_meta(self, scheduler_output: Any) -> object:
        self.log.calls.append(("build_connector_meta", None))
        self.outputs.append(scheduler_output)
        return {"iteration": len(self.outputs)}

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        self.log.calls.append(("request_finished", request.request_id))
        return self.pin_saves


class RecordingWorker(KvCacheConnectorWorker):  # type: ignore[misc]
    def __init__(self, llm_args: Any, log: CallLog, save_polls: int = 2) -> None:
        super().__init__(llm_args)
        self.log, self.save_polls = log, save_polls
        self.saving: dict[int, int] = {}
        self.fail_on_save_layer: int | None = None
        self.pool: Any = None

    def bind_connector_meta(self, metadata: object) -> None:
        self.log.calls.append(("bind_connector_meta", metadata))
        super().bind_connector_meta(metadata)

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        self.pool = kv_cache_tensor

    def start_load_kv(self, stream: Any) -> None:
        self.log.calls.append(("start_load_kv", None))

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        self.log.calls.append(("wait_for_layer_load", layer_idx))

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        self.log.calls.append(("save_kv_layer", layer_idx))
        if self.fail_on_save_layer == layer_idx:
            self.fail_on_save_layer = None
            raise RuntimeError("disk on fire")

    def wait_for_save(self, stream: Any) -> None:
        self.log.calls.append(("wait_for_save", None))

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        self.log.calls.append(("get_finished", (list(finished_gen_req_ids),
                                                list(started_loading_req_ids))))  # fmt: skip
        for rid in finished_gen_req_ids:
            self.saving[rid] = self.save_polls
        done = [rid for rid, left in self.saving.items() if left <= 0]
        for rid in done:
            del self.saving[rid]
        for rid in self.saving:
            self.saving[rid] -= 1
        return done, []


class AsyncHostMemoryScheduler(HostMemoryConnectorScheduler):
    load_async = True


class AsyncHostMemoryWorker(HostMemoryConnectorWorker, SupportsCancel):
    """Copies in start_load_kv like its parent, but reports loads done only after a few polls."""

    def __init__(self, llm_args: Any, load_polls: int = 2) -> None:
        super().__init__(llm_args)
        self.load_polls = load_polls
        self.loading: dict[int, int] = {}
        self.cancelled: list[int] = []

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        for rid in started_loading_req_ids:
            self.loading[rid] = self.load_polls
        done = [rid for rid, left in self.loading.items() if left <= 0]
        for rid in done:
            del self.loading[rid]
        for rid in self.loading:
            self.loading[rid] -= 1
        return [], done

    def cancel_load(self, request_id: int) -> None:
        self.cancelled.append(request_id)
        self.loading.pop(request_id, None)

    def cancel_save(self, request_id: int) -> None:
        return None  # saves complete inside the forward pass
