"""The host-memory connector saves blocks and recurrent states and loads them back: reuse
computes only the unmatched tail, tokens stay identical, states are reused only on an exact
length, and the host pool's accounting returns to zero."""

from __future__ import annotations

import time

import pytest

from tests.builders import tiny_model
from tests.conftest import EngineFactory
from tests.connector.fakes import AsyncHostMemoryScheduler, AsyncHostMemoryWorker
from trtllm_prfaas.connector.host_memory import host_memory_connector
from trtllm_prfaas.engines.request import RequestState, SamplingParams
from trtllm_prfaas.errors import TransferTimeout

SAMPLING = SamplingParams(max_tokens=8, temperature=0.7, seed=3, ignore_eos=True)


def _prompt(n: int, seed: int = 1) -> list[int]:
    return [(seed * 7919 + i * 104729) % 256 for i in range(n)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("length", "reused"), [(2, 0), (16, 0), (17, 0), (40, 32), (129, 128)])
def test_a_repeat_reuses_the_last_block_aligned_chunk_end(
    make_engine: EngineFactory, dtype: str, length: int, reused: int
) -> None:
    """Chunks of 32 run to L: the state exists at 32, 64, ... and L; a repeat may claim at
    most L-1 tokens, so it resumes at the last block-aligned chunk end below L."""
    model = tiny_model(dtype=dtype)
    pair, store = host_memory_connector(model, num_blocks=64, num_states=16)
    engine = make_engine(model, connector=pair, chunk_size=32)
    want = make_engine(model, chunk_size=32).generate([_prompt(length)], SAMPLING)
    assert engine.generate([_prompt(length)], SAMPLING) == want
    computed = engine.stats.num_prompt_tokens_computed
    assert engine.generate([_prompt(length)], SAMPLING) == want
    assert engine.stats.num_connector_tokens == reused
    assert engine.stats.num_prompt_tokens_computed - computed == length - reused
    store.pool.assert_no_leaks()


def test_the_prompt_followed_by_its_first_token_claims_the_whole_prompt(
    make_engine: EngineFactory,
) -> None:
    """The state after all L prompt tokens is saved with the partial tail block, so a request
    of the prompt followed by one more token (the decode's shape) claims exactly L tokens."""
    model = tiny_model()
    pair, store = host_memory_connector(model, num_blocks=64, num_states=16)
    engine = make_engine(model, connector=pair, chunk_size=32)
    first = _prompt(45)
    engine.generate([first], SAMPLING)
    follow_up = [*first, 9]
    got = engine.generate([follow_up], SAMPLING)
    assert engine.stats.num_connector_tokens == 45
    assert got == make_engine(model, chunk_size=32).generate([follow_up], SAMPLING)
    store.pool.assert_no_leaks()


def test_shared_prefix_reuses_block_aligned_snapshot(make_engine: EngineFactory) -> None:
    model = tiny_model()
    pair, store = host_memory_connector(model, num_blocks=64, num_states=32)
    engine = make_engine(model, connector=pair, chunk_size=16)
    engine.generate([_prompt(120)], SAMPLING)
    other = _prompt(100) + _prompt(30, seed=9)  # shares 100 tokens
    got = engine.generate([other], SAMPLING)
    assert engine.stats.num_connector_tokens == 96  # the last block boundary inside the share
    assert got == make_engine(model).generate([other], SAMPLING)
    store.pool.assert_no_leaks()


def test_recurrent_state_is_reused_only_on_an_exact_length(make_engine: EngineFactory) -> None:
    """A strict prefix of a saved prompt ends where no state snapshot exists: the connector must
    fall back to the longest exact-length snapshot (32), not reuse a longer or shorter state."""
    model = tiny_model()
    pair, store = host_memory_connector(model, num_blocks=64, num_states=32)
    engine = make_engine(model, connector=pair, chunk_size=32)  # snapshots at 32, 64, 96, L-1
    engine.generate([_prompt(120)], SAMPLING)
    prefix = _prompt(50)  # needs a state after 49 tokens: none was saved
    got = engine.generate([prefix], SAMPLING)
    assert engine.stats.num_connector_tokens == 32
    assert got == make_engine(model).generate([prefix], SAMPLING)
    store.pool.assert_no_leaks()


def test_async_load_parks_the_request_until_loaded(make_engine: EngineFactory) -> None:
    model = tiny_model()
    pair, store = host_memory_connector(
        model, scheduler_cls=AsyncHostMemoryScheduler, worker_cls=AsyncHostMemoryWorker
    )
    engine = make_engine(model, connector=pair)
    want = engine.generate([_prompt(70)], SAMPLING)
    rid = engine.add_request(_prompt(70), SAMPLING)
    engine.step()
    assert engine.running[rid].state is RequestState.LOADING
    engine.step()
    assert engine.running[rid].state is RequestState.LOADING  # still parked: not scheduled
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == want[0]
    store.pool.assert_no_leaks()


def test_load_that_never_finishes_fails_by_deadline(make_engine: EngineFactory) -> None:
    model = tiny_model()
    pair, store = host_memory_connector(
        model, scheduler_cls=AsyncHostMemoryScheduler, worker_cls=AsyncHostMemoryWorker
    )
    pair.worker.load_polls = 10**9
    engine = make_engine(model, connector=pair, connector_timeout_s=0.05)
    engine.generate([_prompt(40)], SAMPLING)
    rid = engine.add_request(_prompt(40), SAMPLING)
    engine.step()
    time.sleep(0.1)
    outputs = engine.step()
    assert [o.finish_reason for o in outputs if o.request_id == rid] == ["error"]
    assert isinstance(outputs[-1].error, TransferTimeout)
    assert pair.worker.cancelled == [rid]
    assert engine.generate([_prompt(10, seed=4)], SAMPLING)  # keeps serving
    store.pool.assert_no_leaks()
