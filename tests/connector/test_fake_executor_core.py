"""The fake TensorRT-LLM executor itself: it enforces what upstream enforces (see the docstring
of ``trtllm_fake/`` for the upstream file and symbol behind each behaviour).

Driven with a scripted connector defined here (loaded by module path like any connector), whose
answers each test sets in ``SCRIPT`` and whose calls land in ``CALLS``.
"""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.connector.trtllm_fake import (
    ConnectorSpec,
    FakeExecutor,
    FakeModel,
    State,
    TllmCheckError,
    drive,
    kv_rows,
)

SPEC = ConnectorSpec(__name__, "ScriptedScheduler", "ScriptedWorker")
MODEL = FakeModel(num_blocks=32)
PROMPT = [(i * 37 + 11) % 1000 for i in range(70)]  # 4 full blocks and 6 tokens
SCRIPT: dict[str, Any] = {}
CALLS: list[tuple[Any, ...]] = []


def _rank() -> int:
    return int(importlib.import_module("tensorrt_llm._utils").mpi_rank())


class ScriptedScheduler:
    def __init__(self, llm_args: Any) -> None:
        CALLS.append(("scheduler_init", _rank()))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Any:
        CALLS.append(("match", request, num_computed_tokens, _rank()))
        return SCRIPT.get("match", lambda req, n: (0, False))(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        CALLS.append(("alloc", request.request_id, list(block_ids)))

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        CALLS.append(("meta", scheduler_output))
        return SCRIPT.get("meta", lambda out: {"n": len(out.new_requests)})(scheduler_output)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        CALLS.append(("finished", request.request_id, list(cache_block_ids)))
        return bool(SCRIPT.get("saving", False))


class ScriptedWorker:
    def __init__(self, llm_args: Any) -> None:
        self.rank = _rank()
        self.metas: list[Any] = []
        self.loading: set[int] = set()
        self.saving: set[int] = set()
        CALLS.append(("worker_init", self.rank))

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        CALLS.append(("register", self.rank, tuple(kv_cache_tensor.shape)))

    def bind_connector_meta(self, metadata: Any) -> None:
        self.metas.append(metadata)

    def start_load_kv(self, stream: Any) -> None:
        CALLS.append(("start_load", self.rank, stream))

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        CALLS.append(("pre", self.rank, layer_idx, stream, _rank()))

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        CALLS.append(("post", self.rank, layer_idx, stream))
        if SCRIPT.get("save_raises"):
            raise RuntimeError("connector failure in a forward hook")

    def wait_for_save(self, stream: Any) -> None:
        CALLS.append(("wait_save", self.rank, stream))

    def get_finished(self, finished: list[int], started: list[int]) -> Any:
        self.saving.update(finished)
        self.loading.update(started)
        done = SCRIPT.get("done", lambda worker: (sorted(worker.saving), sorted(worker.loading)))
        saved, loaded = done(self)
        self.saving -= set(saved)
        self.loading -= set(loaded)
        return saved, loaded


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    SCRIPT.clear()
    CALLS.clear()
    yield
    assert "tensorrt_llm" not in sys.modules  # the fake modules left with the executors


@pytest.fixture
def executor(request: pytest.FixtureRequest) -> Iterator[FakeExecutor]:
    options = getattr(request, "param", {})
    with FakeExecutor(MODEL, connector=SPEC, **options) as ex:
        yield ex


def _calls(kind: str) -> list[tuple[Any, ...]]:
    return [c for c in CALLS if c[0] == kind]


@pytest.mark.parametrize("executor", [{"tp_size": 2}], indirect=True)
def test_scheduler_on_rank_zero_worker_per_rank_hooks_with_streams(executor) -> None:
    assert _calls("scheduler_init") == [("scheduler_init", 0)]
    assert sorted(_calls("worker_init")) == [("worker_init", 0), ("worker_init", 1)]
    shape = MODEL.pool_shape(2)  # each rank holds its head shard
    assert _calls("register") == [("register", 0, shape), ("register", 1, shape)]
    rid = executor.add_request(PROMPT, 2)
    drive(executor, until=lambda: executor.results[rid].is_finished and not executor.has_work())
    pre = _calls("pre")
    assert {(c[1], c[4]) for c in pre} == {(0, 0), (1, 1)}  # mpi_rank() is the hook's rank
    assert all(c[3] is not None for c in pre + _calls("post"))
    assert all(c[2] is not None for c in _calls("wait_save") + _calls("start_load"))
    metas = [w.worker.metas for w in executor.ranks]
    assert metas[0] == metas[1] and metas[0][0] is not metas[1][0]  # broadcast: equal copies
    assert executor.leak_report() == []


def test_a_claim_of_the_whole_prompt_trips_the_check(executor) -> None:
    SCRIPT["match"] = lambda req, n: (req.prompt_len - n, True)
    executor.add_request(PROMPT, 2)
    with pytest.raises(TllmCheckError, match=r"prepopulatedPromptLen \(70\) >= promptLen \(70\)"):
        executor.step()
    with pytest.raises(RuntimeError, match="died"):
        executor.step()  # the loop is dead, as upstream's after an unwrapped C++ exception


def test_async_zero_tokens_is_refused(executor) -> None:
    SCRIPT["match"] = lambda req, n: (0, True)
    executor.add_request(PROMPT, 2)
    with pytest.raises(RuntimeError, match="load_kv_async must be False"):
        executor.step()


def test_generation_only_requests_are_refused(executor) -> None:
    executor.add_request(PROMPT, 2, generation_only=True)
    with pytest.raises(RuntimeError, match="not supported for generation-only requests"):
        executor.step()


def test_unpicklable_metadata_fails(executor) -> None:
    SCRIPT["meta"] = lambda out: lambda: None
    executor.add_request(PROMPT, 2)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        executor.step()


def test_get_finished_may_only_return_ids_passed_in(executor) -> None:
    SCRIPT["done"] = lambda worker: ([], [12345])
    executor.add_request(PROMPT, 1)
    with pytest.raises(KeyError):
        executor.step()


def test_the_scheduler_sees_only_fields_of_the_pinned_llm_request(executor) -> None:
    executor.add_request(PROMPT, 1)
    executor.step()
    request = _calls("match")[0][1]
    assert request.get_tokens(0) == PROMPT and request.prompt_len == 70
    assert request.is_generation_only_request is False
    for name in ("connector_params", "py_disaggregated_params", "py_request_id", "opaque_state"):
        assert not hasattr(request, name), name


@pytest.mark.parametrize(
    ("executor", "want"),
    [({"partial_reuse": False}, [0, 32, 64]), ({"partial_reuse": True}, [0, 40, 69])],
    indirect=["executor"],
    ids=["full-blocks", "partial-reuse"],
)
def test_block_reuse_passes_the_device_match_as_num_computed_tokens(executor, want) -> None:
    first = executor.add_request(PROMPT, 2)
    drive(executor, until=lambda: not executor.has_work())
    second = executor.add_request([*PROMPT[:40], 1, 2, 3], 2)  # shares 2 blocks and 8 tokens
    third = executor.add_request(PROMPT, 2)  # shares 4 blocks (and 5 of the released tail)
    drive(executor, until=lambda: not executor.has_work())
    assert [c[2] for c in _calls("match")] == want
    assert executor.claims[second] == (want[1], 0, False)
    blocks = {c[1]: c[2] for c in _calls("alloc")}
    assert blocks[second][:2] == blocks[first][:2] and blocks[third][:4] == blocks[first][:4]
    assert blocks[second][2] != blocks[first][2]  # never shared: a private block or a copy
    assert executor.computed[second][0] == (want[1], 43)  # computes only what did not match
    block = executor.device.read_block(executor.ranks[0].pool, blocks[second][2], 0)
    rows = block.view(2, MODEL.num_kv_heads, MODEL.tokens_per_block, MODEL.head_dim)
    for pos in range(32, 43):  # copied (partial reuse) or computed: the KV of these tokens
        want_rows = kv_rows(MODEL, [*PROMPT[:40], 1, 2, 3], pos, 0)
        assert torch.equal(rows[:, :, pos - 32, :], want_rows), pos
    assert executor.leak_report() == []


def test_async_load_parks_until_every_rank_reports_it() -> None:
    SCRIPT["match"] = lambda req, n: (48 - n, True)
    loaded_by: set[int] = set()
    SCRIPT["done"] = lambda w: ([], sorted(w.loading) if w.rank in loaded_by else [])
    with FakeExecutor(MODEL, connector=SPEC, tp_size=2) as ex:
        rid = ex.add_request(PROMPT, 2)
        ex.step()
        assert ex.parked() == [rid] and ex.requests[rid].state is State.LOADING
        assert [c for c in ex.iterations[-1][0] if c == "wait_for_layer_load"] == []
        loaded_by.add(0)
        ex.step()
        ex.step()
        assert ex.parked() == [rid]  # rank 1 has not reported: still parked
        loaded_by.add(1)
        ex.step()
        assert ex.parked() == [] and rid in ex.loaded_snapshots
        drive(ex, until=lambda: not ex.has_work())
        assert ex.computed[rid][0] == (48, 70)  # resumes after the claimed tokens
        first = next(c[1] for c in _calls("meta") if c[1].new_requests)
        assert first.new_requests[0].computed_position == 48  # back from the load: no external
        assert ex.leak_report() == []


def test_sync_match_is_subtracted_once_from_computed_position(executor) -> None:
    SCRIPT["match"] = lambda req, n: (32, False)
    executor.add_request(PROMPT, 1)
    drive(executor, until=lambda: not executor.has_work())
    outputs = [c[1] for c in _calls("meta")]
    first, second = outputs[0].new_requests[0], outputs[1].cached_requests[0]
    assert (first.computed_position, first.num_scheduled_tokens) == (0, 32)
    assert (second.computed_position, second.num_scheduled_tokens) == (64, 6)


@pytest.mark.parametrize("executor", [{"overlap_scheduler": True}], indirect=True)
def test_overlap_runs_a_finished_request_once_more_then_pins_its_save(executor) -> None:
    SCRIPT["saving"] = True
    rid = executor.add_request(PROMPT, 1)
    drive(executor, until=lambda: executor.results[rid].is_finished)
    assert executor.computed[rid] == [(0, 32), (32, 64), (64, 70), (70, 71)]
    finished = _calls("finished")
    assert [c[1] for c in finished] == [rid] and len(finished[0][2]) == 5
    drive(executor, until=lambda: not executor.has_work())
    assert executor.leak_report() == []


@pytest.mark.parametrize("executor", [{"overlap_scheduler": False}], indirect=True)
def test_without_overlap_the_request_finishes_with_its_context(executor) -> None:
    rid = executor.add_request(PROMPT, 1)
    drive(executor, until=lambda: not executor.has_work())
    assert executor.computed[rid] == [(0, 32), (32, 64), (64, 70)]
    assert len(executor.results[rid].tokens) == 1


@pytest.mark.parametrize("executor", [{"overlap_scheduler": True}], indirect=True)
def test_a_hook_exception_fails_every_request_and_kills_the_overlap_loop(executor) -> None:
    SCRIPT["save_raises"] = True
    rids = [executor.add_request(PROMPT, 2), executor.add_request(PROMPT[:20], 2)]
    with pytest.raises(RuntimeError, match="Sampling failed"):
        executor.step()
    assert all("connector failure" in str(executor.results[r].error) for r in rids)
    assert [c[1] for c in _calls("finished")] == rids  # terminated: request_finished ran


@pytest.mark.parametrize("executor", [{"overlap_scheduler": False}], indirect=True)
def test_a_hook_exception_fails_every_request_and_the_plain_loop_goes_on(executor) -> None:
    SCRIPT["save_raises"] = True
    failed = executor.add_request(PROMPT, 2)
    executor.step()
    assert "connector failure" in str(executor.results[failed].error)
    SCRIPT["save_raises"] = False
    ok = executor.add_request(PROMPT[:20], 2)
    drive(executor, until=lambda: not executor.has_work())
    assert executor.results[ok].error is None and len(executor.results[ok].tokens) == 2
    assert executor.leak_report() == []
