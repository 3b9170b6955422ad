"""Prefill on worker A, KV relayed over real loopback ZeroMQ, decode on worker B (two separate
processes), with the prompt-plus-first-token handoff: tokens equal a single-engine run, bit for
bit, for prompts from 1 token to thousands, across block boundaries, with 1 and 4 streams, with
and without Curve, greedy and seeded sampling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import WorkerProcess, collect, new_uuid, spawn_worker, wait_for
from trtllm_prfaas.config import load_control_security, model_preset, write_testbed_keyset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.worker import protocol as p

LENGTHS = [1, 2, 15, 16, 17, 33, 250, 3000]


def _prompt(n: int) -> list[int]:
    return [(i * 7919 + n) % 256 for i in range(n)]


@pytest.fixture(scope="module")
def reference() -> ReferenceEngine:
    model = model_preset("tiny")
    return ReferenceEngine(EngineConfig(model=model, num_blocks=512, chunk_size=2048))


def _pair(tmp: Path, streams: int, curve: bool, *extra: str) -> tuple[WorkerProcess, WorkerProcess]:
    common = [
        "--model-preset",
        "tiny",
        "--num-blocks",
        "512",
        "--num-streams",
        str(streams),
        "--chunk-size",
        "64",
        *extra,
    ]
    control = None  # plaintext control plane unless the workers have Curve keys
    if curve:
        keys = write_testbed_keyset(tmp)
        decode_security, prefill_security = (
            ["--curve-keys", str(keys.receiver)],
            ["--curve-keys", str(keys.sender)],
        )
        control = load_control_security(keys.router, False, "router")
    else:
        decode_security = prefill_security = ["--plaintext"]
    decode = spawn_worker("decode", "dc-local", *common, *decode_security, control_security=control)
    try:
        prefill = spawn_worker(
            "prefill", "dc-remote", *common, *prefill_security, control_security=control
        )
    except BaseException:
        decode.stop()
        raise
    return prefill, decode


@pytest.fixture
def workers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    streams, curve = request.param
    prefill, decode = _pair(tmp_path, streams, curve)
    try:
        yield prefill, decode
    finally:
        codes = [prefill.stop(), decode.stop()]
    assert codes == [0, 0], "workers must shut down cleanly"


def relay_generate(
    prefill: WorkerProcess, decode: WorkerProcess, prompt: list[int], sampling: SamplingParams
) -> tuple[list[int], p.Tokens]:
    """Run one request the remote way, as the router does (prompt plus first token): the prefill
    on A runs the whole prompt and relays its KV to B; B gets the prompt followed by t1, one
    sampling draw skipped, and decodes from t1. Returns (all tokens, B's final message)."""
    pc, dc = prefill.client(), decode.client()
    rid, transfer = new_uuid(), new_uuid()
    common = dict(temperature=sampling.temperature, seed=sampling.seed, ignore_eos=True)
    pc.send(p.Submit(rid, prompt, 1, transfer_uuid=transfer, relay_endpoint=decode.relay, **common))
    first = collect(pc, rid)
    assert first.error_kind == "" and len(first.token_ids) == 1, first
    t1 = first.token_ids[0]
    rest = sampling.max_tokens - 1
    dc.send(
        p.Submit(
            rid,
            [*prompt, t1],
            rest,
            transfer_uuid=transfer,
            announce_timeout_s=5.0,
            num_skipped_draws=1,
            **common,
        )
    )
    decoded = collect(dc, rid)
    done = wait_for(pc, p.TransferDone, lambda m: m.request_id == rid)
    assert done.error == ""
    return [t1, *decoded.token_ids], decoded


@pytest.mark.parametrize(
    "workers",
    [(1, False), (4, False), (4, True)],
    indirect=True,
    ids=["1-stream", "4-streams", "4-streams-curve"],
)
def test_relayed_decode_equals_single_engine(
    workers: tuple[WorkerProcess, WorkerProcess], reference: ReferenceEngine
) -> None:
    prefill, decode = workers
    for temperature in (0.0, 0.8):
        sampling = SamplingParams(max_tokens=6, temperature=temperature, seed=5, ignore_eos=True)
        for length in LENGTHS:
            prompt = _prompt(length)
            want = reference.generate([prompt], sampling)[0]
            tokens, decoded = relay_generate(prefill, decode, prompt, sampling)
            assert decoded.error_kind == "", decoded.error_message
            assert tokens == want, (length, temperature)
            assert decoded.num_connector_tokens == length  # the relay, not a recompute
    assert reference.leak_report() == []


@pytest.mark.parametrize("chunk_bytes", [8 << 10, 10_000], ids=["block-aligned", "misaligned"])
def test_multi_chunk_items_decode_equal_single_engine(
    tmp_path: Path, reference: ReferenceEngine, chunk_bytes: int
) -> None:
    # The workers prefill in 64-token chunks, so each item is 4 blocks of 4 KiB (tiny model):
    # two 8 KiB chunks placed one by one from their frames, or two misaligned chunks
    # (10,000 + 6,384 bytes) assembled into one buffer first. The tiny preset's attention gain
    # makes tokens depend on the full-attention KV: a chunk placed at the wrong blocks fails
    # here (checked by mutation), as it does byte for byte in test_trtllm_contract.
    prefill, decode = _pair(tmp_path, 4, False, "--chunk-bytes", str(chunk_bytes))
    try:
        sampling = SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True)
        for length in (70, 250, 3000):
            prompt = _prompt(length)
            want = reference.generate([prompt], sampling)[0]
            tokens, decoded = relay_generate(prefill, decode, prompt, sampling)
            assert decoded.error_kind == "", decoded.error_message
            assert decoded.num_connector_tokens == length  # the relay, not a recompute
            assert tokens == want, length
    finally:
        codes = [prefill.stop(), decode.stop()]
    assert codes == [0, 0], "workers must shut down cleanly"
