"""Contract: the REAL PrfaaS connector inside the fake TensorRT-LLM 1.2 executor
(``trtllm_fake/``, rebuilt from upstream's source), one prefill and one decode
deployment of 1 or 2 tensor-parallel ranks each, in one process, over real loopback relays.

Everything reaches the connector as it would on a GPU: halves built from ``llm_args`` alone with
the ``TRTLLM_PRFAAS_*`` environment (Curve keys, ports), ``mpi_rank()`` from the fake
``tensorrt_llm._utils``, plans posted by a ``PlanClient`` to the connector's plan servers (the
worker's side channel, docs/design/trtllm_path.md section 3), the handoff of section 1 (the
prefill runs the prompt with ``max_tokens=1`` and samples t1; the decode request is the prompt
plus t1 and is submitted once every decode rank holds the transfer, section 4).

Checks: the relayed KV lands byte-identical in the decode pool at the right blocks, each rank
its head shard, before the decode computes anything but t1 (TP 1 and 2, L across a block
boundary and block-aligned, chunks of 1, 2 and 8 blocks, with and without the overlap
scheduler, two relays in one batch); the decode request is parked until loaded; the prefill's
blocks stay pinned until the save is reported; a warm prefix on the decode is honoured (claims
L minus ``num_computed_tokens``, also when partial reuse ends the match inside a block; shared
blocks untouched; TensorRT-LLM's ``prepopulatedPromptLen < promptLen`` check passes), and one
covering the whole prompt claims nothing; a warm prefix on the prefill is still exported; a
dense model needs no project-only hook; a transfer that never arrives, stops half way, or is
missing on one rank never parks a request, and a claimed load delivers the right KV or fails;
each iteration's calls come in upstream's order; nothing leaks. Tokens equal a single-engine run
of the fake model.

The device under the pools is the ``fake_device`` fixture when a conftest provides one (the
``--device`` option), else the plain CPU device.
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.connector.fake_device import CpuDevice, Device
from tests.connector.trtllm_fake import (
    FakeExecutor,
    FakeModel,
    drive,
    kv_rows,
    next_token,
    shard,
)
from trtllm_prfaas.connector import prfaas_runtime
from trtllm_prfaas.transport import CurveKeys, RelaySecurity, generate_keypair

MODEL = FakeModel(num_layers=4, num_kv_heads=4, head_dim=8, tokens_per_block=16, num_blocks=64)
PROMPT = [(i * 31 + 7) % 1000 for i in range(70)]  # 4 full blocks and a 6-token tail
TIMEOUT_S = 3  # TRTLLM_PRFAAS_TRANSFER_TIMEOUT_S: every failure path ends well within a test
UPSTREAM_WORKER_HOOKS = {
    "register_kv_caches", "bind_connector_meta", "start_load_kv", "wait_for_layer_load",
    "save_kv_layer", "wait_for_save", "get_finished",
}  # fmt: skip
_HOOKS = f"(wait_for_layer_load save_kv_layer ){{{MODEL.num_layers}}}wait_for_save "
RANK0_ITERATION = re.compile(
    r"^((get_num_new_matched_tokens update_state_after_alloc )*build_connector_meta "
    rf"bind_connector_meta start_load_kv ({_HOOKS})?)?(request_finished )*get_finished $"
)
OTHER_RANK_ITERATION = re.compile(
    rf"^(bind_connector_meta start_load_kv ({_HOOKS})?)?get_finished $"
)


# ------------------------------------------------------------------------------ deployments
@dataclass
class Keys:
    """Z85 key files: each side's relay pair, and the worker's (plan client) pair."""

    files: dict[str, Path]
    worker_public: bytes
    worker_secret: bytes

    @classmethod
    def make(cls, directory: Path) -> Keys:
        files = {}
        for side in ("prefill", "decode", "worker"):
            public, secret = generate_keypair()
            for kind, key in (("public", public), ("secret", secret)):
                files[f"{side}.{kind}"] = directory / f"{side}.{kind}"
                files[f"{side}.{kind}"].write_bytes(key + b"\n")
        worker = files["worker.public"].read_bytes().strip()
        return cls(files, worker, files["worker.secret"].read_bytes().strip())

    def plan_security(self, side: str) -> RelaySecurity:
        server = self.files[f"{side}.public"].read_bytes().strip()
        return RelaySecurity(curve=CurveKeys(server, None, self.worker_public, self.worker_secret))


def _free_port_base(count: int) -> int:
    """A port p with p .. p + count - 1 free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count < 65000 and all(_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _env(role: str, keys: Keys, plan_port: int, relay_port: int) -> dict[str, str]:
    f = {name: str(path) for name, path in keys.files.items()}
    env = {
        "TRTLLM_PRFAAS_ROLE": role,
        "TRTLLM_PRFAAS_CURVE_PUBLIC_KEY_FILE": f[f"{role}.public"],
        "TRTLLM_PRFAAS_CURVE_SECRET_KEY_FILE": f[f"{role}.secret"],
        "TRTLLM_PRFAAS_PLAN_BIND": f"tcp://127.0.0.1:{plan_port}",
        "TRTLLM_PRFAAS_PLAN_CLIENT_KEY_FILE": f["worker.public"],
        "TRTLLM_PRFAAS_TRANSFER_TIMEOUT_S": str(TIMEOUT_S),
        "TRTLLM_PRFAAS_NUM_STREAMS": "2",
    }
    if role == "prefill":
        env["TRTLLM_PRFAAS_CURVE_SERVER_KEY_FILE"] = f["decode.public"]
    else:
        env["TRTLLM_PRFAAS_CURVE_CLIENT_KEY_FILE"] = f["prefill.public"]
        env["TRTLLM_PRFAAS_RELAY_BIND"] = f"tcp://127.0.0.1:{relay_port}"
        env["TRTLLM_PRFAAS_RELAY_ADVERTISE"] = f"tcp://127.0.0.1:{relay_port}"
    return env


@dataclass
class Deployments:
    """A prefill and a decode deployment with the same tensor-parallel size."""

    prefill: FakeExecutor
    decode: FakeExecutor
    keys: Keys
    plan_ports: dict[str, int]
    relay_endpoints: list[str]  # decode rank r's receiver, as prefill rank r reaches it

    def post(self, side: str, plan: Any) -> None:
        """What the worker fronting ``side`` does before submitting: post the plan to rank 0's
        plan server and wait for the acknowledgement."""
        from trtllm_prfaas.connector.plans import PlanClient

        endpoint = f"tcp://127.0.0.1:{self.plan_ports[side]}"
        with PlanClient([endpoint], self.keys.plan_security(side)) as client:
            client.post(plan, timeout_s=5)

    def statuses(self, transfer_uuid: str, num_tokens: int) -> list[str]:
        """Every decode rank's status of the transfer (the worker's query, section 4)."""
        from trtllm_prfaas.connector.plans import PlanClient

        base, tp = self.plan_ports["decode"], self.decode.tp_size
        endpoints = [f"tcp://127.0.0.1:{base + r}" for r in range(tp)]
        with PlanClient(endpoints, self.keys.plan_security("decode")) as client:
            return client.statuses(transfer_uuid, num_tokens, timeout_s=5)


def _device(request: pytest.FixtureRequest) -> Device:
    try:
        device: Device = request.getfixturevalue("fake_device")
    except pytest.FixtureLookupError:
        return CpuDevice()
    return device


def _close_connector_runtimes() -> None:
    """The connector's process-wide runtimes (upstream never closes a connector)."""
    close = getattr(prfaas_runtime, "close_runtimes", None)
    if close is not None:
        close()
        return
    runtime = getattr(prfaas_runtime, "_process_runtime", None)  # the connector before issue 12
    if runtime is not None:
        runtime.close()


@pytest.fixture
def deployments(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployments]:
    options = getattr(request, "param", 1)
    options = {"tp_size": options} if isinstance(options, int) else dict(options)
    tp = options.setdefault("tp_size", 1)
    options.setdefault("chunk_size", 32)
    keys, device = Keys.make(tmp_path), _device(request)
    plan_ports = {side: _free_port_base(tp) for side in ("prefill", "decode")}
    relay_port = _free_port_base(tp)
    built: list[FakeExecutor] = []
    try:
        for side in ("decode", "prefill"):
            env = _env(side, keys, plan_ports[side], relay_port)
            built.append(FakeExecutor(MODEL, env=env, device=device, **options))
        endpoints = [f"tcp://127.0.0.1:{relay_port + r}" for r in range(tp)]
        yield Deployments(built[1], built[0], keys, plan_ports, endpoints)
    finally:
        for executor in built:
            executor.close()
        _close_connector_runtimes()


# -------------------------------------------------------------------------------- the flow
def _reference(prompt: list[int], n: int) -> list[int]:
    """The tokens a single engine generates: the fake model is greedy and deterministic."""
    tokens, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(MODEL, tokens))
        tokens.append(out[-1])
    return out


def _plan(transfer: str, prompt: list[int], endpoints: list[str]) -> Any:
    from trtllm_prfaas.connector.plans import Plan, tokens_digest

    return Plan(transfer, len(prompt), tokens_digest(prompt), list(endpoints))


@dataclass
class Relayed:
    prefill_id: int
    decode_id: int
    transfer: str


def _relay(d: Deployments, prompt: list[int], max_tokens: int) -> Relayed:
    """The router and the two workers: prefill (max_tokens=1) -> t1 -> wait until every decode
    rank holds the whole transfer -> decode ``prompt + [t1]`` for ``max_tokens - 1`` tokens."""
    transfer = uuid.uuid4().hex
    d.post("prefill", _plan(transfer, prompt, d.relay_endpoints))
    p_rid = d.prefill.add_request(prompt, 1)
    drive(d.prefill, until=lambda: d.prefill.results[p_rid].is_finished, what="prefill")
    assert d.prefill.results[p_rid].error is None, d.prefill.results[p_rid].error
    t1 = d.prefill.results[p_rid].tokens[0]
    complete = ["complete"] * d.decode.tp_size
    drive(d.prefill, until=lambda: d.statuses(transfer, len(prompt)) == complete, what="transfer")
    d.post("decode", _plan(transfer, prompt, []))
    d_rid = d.decode.add_request([*prompt, t1], max_tokens - 1)
    done = lambda: not (d.prefill.has_work() or d.decode.has_work())  # noqa: E731
    drive(d.prefill, d.decode, until=done, what="relay")
    return Relayed(p_rid, d_rid, transfer)


def _assert_rows(snapshot: torch.Tensor, tokens: list[int], positions: range, rank: int,
                 tp: int) -> None:  # fmt: skip
    """``snapshot`` (blocks, layers, kv, row) holds rank ``rank``'s shard of the KV of
    ``tokens`` at ``positions`` (logical positions of the request)."""
    tpb, heads = MODEL.tokens_per_block, MODEL.num_kv_heads // tp
    for layer in range(MODEL.num_layers):
        for pos in positions:
            block = snapshot[pos // tpb, layer].view(2, heads, tpb, MODEL.head_dim)
            want = shard(MODEL, kv_rows(MODEL, tokens, pos, layer), rank, tp)
            assert torch.equal(block[:, :, pos % tpb, :], want), (rank, layer, pos)


def _assert_claimed_right_or_failed(d: Deployments, rid: int, prompt: list[int]) -> None:
    """A request the connector claimed for holds the right KV on every rank when the load is
    reported, unless it ended with an error: a claim must never deliver missing KV silently."""
    matched, claimed, _ = d.decode.claims[rid]
    if d.decode.results[rid].error is None and claimed:
        for rank, snapshot in enumerate(d.decode.loaded_snapshots[rid]):
            positions = range(matched, matched + claimed)
            _assert_rows(snapshot, prompt, positions, rank, d.decode.tp_size)


def _assert_order_and_no_leaks(*executors: FakeExecutor) -> None:
    for executor in executors:
        for iteration in executor.iterations:
            for rank, calls in enumerate(iteration):
                pattern = RANK0_ITERATION if rank == 0 else OTHER_RANK_ITERATION
                assert pattern.match(" ".join(calls) + " "), (rank, calls)
        assert executor.leak_report() == []
        assert executor.errors == [] and executor.dead is None


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("deployments", [1, 2], indirect=True, ids=["tp1", "tp2"])
@pytest.mark.parametrize("prompt", [PROMPT, PROMPT[:64]], ids=["L70", "L64-aligned"])
def test_relayed_kv_lands_byte_identical_in_the_decode_pool(deployments, prompt) -> None:
    d, tp, length = deployments, deployments.decode.tp_size, len(prompt)
    run = _relay(d, prompt, max_tokens=4)

    assert d.decode.claims[run.decode_id] == (0, length, True)  # L tokens, async
    assert d.decode.computed[run.decode_id][0] == (length, length + 1)  # computes t1 only
    assert run.decode_id in d.decode.ever_parked  # parked by its load, computed after it
    assert run.prefill_id in d.prefill.ever_pinned  # blocks pinned until the save was reported
    for rank, snapshot in enumerate(d.decode.loaded_snapshots[run.decode_id]):
        _assert_rows(snapshot, prompt, range(length), rank, tp)  # as the prefill computed it
    reference = _reference(prompt, 4)
    assert d.prefill.results[run.prefill_id].tokens == reference[:1]
    assert d.decode.results[run.decode_id].tokens == reference[1:]
    # What the worker fronting the engine asks at the first token: every rank loaded it.
    assert d.statuses(run.transfer, length) == ["loaded"] * tp
    _assert_order_and_no_leaks(d.prefill, d.decode)


def test_a_dense_model_relays_with_upstream_hooks_only(deployments) -> None:
    """TensorRT-LLM calls only its own hooks (no ``register_recurrent_states``, no
    ``get_failed_loads``/``cancel_*``) and has no ``connector_options``: that is enough."""
    d = deployments
    run = _relay(d, PROMPT, max_tokens=2)
    assert d.decode.claims[run.decode_id] == (0, len(PROMPT), True)
    for executor in (d.prefill, d.decode):
        called = {name for rank in executor.ranks for name in rank.log}
        worker_calls = called - {
            "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
            "request_finished",
        }  # fmt: skip
        assert worker_calls <= UPSTREAM_WORKER_HOOKS
    assert not hasattr(d.decode.llm_args, "connector_options")
    _assert_order_and_no_leaks(d.prefill, d.decode)


POISON = 3.0  # what the test writes into the decode's cached prefix blocks


@pytest.mark.parametrize("warm", [32, 40], ids=["2-blocks", "2-blocks-and-8-tokens"])
def test_a_warm_prefix_on_the_decode_is_honoured(deployments, warm) -> None:
    """The decode already holds the start of the prompt (a shared system prompt): TensorRT-LLM
    passes ``num_computed_tokens`` (32, or 40 with partial reuse, the default); the connector
    claims the other L - k tokens, never writes the shared (fully matched) blocks, and the
    ``prepopulatedPromptLen < promptLen`` check passes."""
    d, tpb = deployments, MODEL.tokens_per_block
    warm_id = d.decode.add_request([*PROMPT[:warm], 5, 6, 7, 8], 2)
    drive(d.decode, until=lambda: not d.decode.has_work(), what="warm-up")
    shared = [d.decode.blocks.cached_block(PROMPT[: (b + 1) * tpb]) for b in range(2)]
    assert None not in shared
    poison = torch.full((2, MODEL.num_kv_heads, MODEL.head_dim), POISON, dtype=MODEL.dtype)
    for rank in d.decode.ranks:  # mark them, so a write over them cannot go unseen
        for block in shared:
            for layer in range(MODEL.num_layers):
                for pos in range(tpb):
                    d.decode.device.write_token_rows(
                        rank.pool, block, layer, pos, poison, rank.stream
                    )

    run = _relay(d, PROMPT, max_tokens=3)
    assert d.decode.results[warm_id].error is None
    assert d.decode.claims[run.decode_id] == (warm, len(PROMPT) - warm, True)
    snapshot = d.decode.loaded_snapshots[run.decode_id][0]
    assert torch.all(snapshot[:2] == POISON), "the connector wrote over shared blocks"
    _assert_rows(snapshot, PROMPT, range(32, len(PROMPT)), 0, 1)  # matched part or relayed
    assert d.decode.results[run.decode_id].tokens == _reference(PROMPT, 3)[1:]
    _assert_order_and_no_leaks(d.prefill, d.decode)


def test_a_transfer_that_never_arrives_parks_nothing(deployments) -> None:
    """The decode's plan names a transfer no prefill ever sends: the request is computed
    locally (never claimed) or fails by a deadline; it is never parked for good."""
    d = deployments
    transfer = uuid.uuid4().hex
    d.post("decode", _plan(transfer, PROMPT, []))
    rid = d.decode.add_request([*PROMPT, 42], 3)
    drive(d.decode, until=lambda: d.decode.results[rid].is_finished, timeout_s=TIMEOUT_S + 10,
          what="decode of a missing transfer")  # fmt: skip
    result = d.decode.results[rid]
    assert result.error is not None or result.tokens == _reference([*PROMPT, 42], 3)
    _assert_claimed_right_or_failed(d, rid, PROMPT)
    drive(d.decode, until=lambda: not d.decode.has_work(), what="drain")
    assert d.decode.leak_report() == []


def test_a_transfer_that_stops_half_way_parks_nothing(deployments) -> None:
    """The prefill sends its first chunk's blocks, then stalls (its node hangs): a decode
    submitted early must not stay parked on the half transfer past the transfer deadline."""
    d = deployments
    transfer = uuid.uuid4().hex
    prompt = PROMPT
    d.post("prefill", _plan(transfer, prompt, d.relay_endpoints))
    d.prefill.add_request(prompt, 1)
    drive(d.prefill, until=lambda: d.statuses(transfer, len(prompt)) != [""],
          what="first chunk on the wire")  # fmt: skip
    d.post("decode", _plan(transfer, prompt, []))
    rid = d.decode.add_request([*prompt, 42], 3)
    drive(d.decode, until=lambda: d.decode.results[rid].is_finished, timeout_s=TIMEOUT_S + 10,
          what="decode of a stalled transfer")  # fmt: skip
    result = d.decode.results[rid]
    assert result.error is not None or result.tokens == _reference([*prompt, 42], 3)
    _assert_claimed_right_or_failed(d, rid, prompt)
    drive(d.prefill, d.decode, until=lambda: not (d.prefill.has_work() or d.decode.has_work()),
          timeout_s=TIMEOUT_S + 10, what="drain")  # fmt: skip
    assert d.decode.leak_report() == [] and d.prefill.leak_report() == []


@pytest.mark.parametrize(
    "deployments",
    [{"chunk_size": 16}, {"chunk_size": 128}, {"overlap_scheduler": False}],
    indirect=True,
    ids=["chunk16", "chunk128", "no-overlap"],
)
def test_relay_under_other_chunkings_and_the_plain_loop(deployments) -> None:
    """One block per chunk, the whole prompt in one chunk, and ``disable_overlap_scheduler``
    (the executor loop without the extra step of a finished request)."""
    d = deployments
    run = _relay(d, PROMPT, max_tokens=3)
    assert d.decode.claims[run.decode_id] == (0, len(PROMPT), True)
    _assert_rows(d.decode.loaded_snapshots[run.decode_id][0], PROMPT, range(len(PROMPT)), 0, 1)
    assert d.decode.results[run.decode_id].tokens == _reference(PROMPT, 3)[1:]
    _assert_order_and_no_leaks(d.prefill, d.decode)


@pytest.mark.parametrize("deployments", [1, 2], indirect=True, ids=["tp1", "tp2"])
def test_a_warm_prefix_on_the_prefill_is_still_exported(deployments) -> None:
    """The prefill reuses 2 cached blocks (``num_computed_tokens=32`` there): it never
    computes them in this request, yet the decode needs them: they are sent from the pool."""
    d, tp = deployments, deployments.prefill.tp_size
    d.prefill.add_request([*PROMPT[:32], 9, 9, 9], 1)
    drive(d.prefill, until=lambda: not d.prefill.has_work(), what="prefill warm-up")
    run = _relay(d, PROMPT, max_tokens=2)
    assert d.prefill.claims[run.prefill_id][0] == 32  # the prefill matched 2 blocks on device
    assert d.prefill.computed[run.prefill_id][0][0] == 32  # and computed from token 32 on
    assert d.decode.claims[run.decode_id] == (0, len(PROMPT), True)
    for rank, snapshot in enumerate(d.decode.loaded_snapshots[run.decode_id]):
        _assert_rows(snapshot, PROMPT, range(len(PROMPT)), rank, tp)
    _assert_order_and_no_leaks(d.prefill, d.decode)


def test_a_decode_prefix_covering_the_whole_prompt_claims_nothing(deployments) -> None:
    """A block-aligned prompt (L = 64) whose 4 blocks the decode already holds: there is
    nothing to load (``num_computed_tokens = L``); the decode computes t1 only."""
    d, prompt = deployments, PROMPT[:64]
    d.decode.add_request([*prompt, 1, 2], 1)
    drive(d.decode, until=lambda: not d.decode.has_work(), what="warm-up")
    run = _relay(d, prompt, max_tokens=3)
    matched, claimed, _ = d.decode.claims[run.decode_id]
    assert (matched, claimed) == (64, 0)
    assert d.decode.computed[run.decode_id][0] == (64, 65)
    assert d.decode.results[run.decode_id].tokens == _reference(prompt, 3)[1:]
    _assert_order_and_no_leaks(d.prefill, d.decode)


@pytest.mark.parametrize("deployments", [2], indirect=True, ids=["tp2"])
def test_two_relays_in_one_batch(deployments) -> None:
    """Two prompts in flight together on both sides: each decode claims its own transfer."""
    d, prompts = deployments, [PROMPT, [(t + 500) % 1000 for t in PROMPT[:50]]]
    transfers = [uuid.uuid4().hex for _ in prompts]
    for transfer, prompt in zip(transfers, prompts, strict=True):
        d.post("prefill", _plan(transfer, prompt, d.relay_endpoints))
    p_ids = [d.prefill.add_request(prompt, 1) for prompt in prompts]
    drive(d.prefill, until=lambda: all(d.prefill.results[i].is_finished for i in p_ids))
    for transfer, prompt in zip(transfers, prompts, strict=True):
        want = ["complete"] * d.decode.tp_size
        drive(d.prefill, until=lambda: d.statuses(transfer, len(prompt)) == want)  # noqa: B023
        d.post("decode", _plan(transfer, prompt, []))
    d_ids = [
        d.decode.add_request([*prompt, d.prefill.results[p].tokens[0]], 2)
        for prompt, p in zip(prompts, p_ids, strict=True)
    ]
    drive(d.prefill, d.decode, until=lambda: not (d.prefill.has_work() or d.decode.has_work()))
    for prompt, rid in zip(prompts, d_ids, strict=True):
        assert d.decode.claims[rid] == (0, len(prompt), True)
        for rank, snapshot in enumerate(d.decode.loaded_snapshots[rid]):
            _assert_rows(snapshot, prompt, range(len(prompt)), rank, 2)
        assert d.decode.results[rid].tokens == _reference(prompt, 3)[1:]
    _assert_order_and_no_leaks(d.prefill, d.decode)


@pytest.mark.parametrize("deployments", [2], indirect=True, ids=["tp2"])
def test_a_transfer_missing_on_one_rank_parks_nothing(deployments) -> None:
    """Prefill rank 1 cannot reach decode rank 1 (a wrong endpoint), so only rank 0's shard
    arrives; a decode submitted once rank 0 holds its transfer (a worker that checked one rank
    only) must not stay parked: TensorRT-LLM resumes it only when every rank reports the load.
    Rank 1 then holds no relayed KV: the connector logs that output as suspect and answers
    ``load_failed`` to the worker's status query."""
    d = deployments
    transfer, dead = uuid.uuid4().hex, f"tcp://127.0.0.1:{_free_port_base(1)}"
    d.post("prefill", _plan(transfer, PROMPT, [d.relay_endpoints[0], dead]))
    p_rid = d.prefill.add_request(PROMPT, 1)
    drive(d.prefill, until=lambda: d.prefill.results[p_rid].is_finished, what="prefill")
    drive(d.prefill, until=lambda: d.statuses(transfer, len(PROMPT))[0] == "complete")
    d.post("decode", _plan(transfer, PROMPT, []))
    t1 = d.prefill.results[p_rid].tokens[0]
    rid = d.decode.add_request([*PROMPT, t1], 3)
    drive(d.decode, until=lambda: d.decode.results[rid].is_finished, timeout_s=TIMEOUT_S + 10,
          what="decode with rank 1's shard missing")  # fmt: skip
    result = d.decode.results[rid]
    assert result.error is not None or result.tokens == _reference(PROMPT, 4)[1:]
    # Rank 1 answers load_failed: the worker fronting the engine drops that response and runs
    # the request again without its plan (tests/worker/test_triton_worker.py), never silent.
    assert d.statuses(transfer, len(PROMPT)) == ["loaded", "load_failed"]
    drive(d.prefill, d.decode, until=lambda: not (d.prefill.has_work() or d.decode.has_work()),
          timeout_s=TIMEOUT_S + 10, what="drain")  # fmt: skip
    assert d.decode.leak_report() == [] and d.prefill.leak_report() == []


@pytest.mark.parametrize("deployments", [2], indirect=True, ids=["tp2"])
def test_a_plan_for_another_tensor_parallel_size_is_refused(deployments) -> None:
    """Prefill rank r sends to decode rank r: a plan naming one decode endpoint for a prefill
    of tensor-parallel size 2 is refused when posted, naming both sizes."""
    from trtllm_prfaas.errors import ConfigError

    d = deployments
    with pytest.raises(ConfigError, match=r"(?s)(?=.*\b1\b)(?=.*\b2\b)"):
        d.post("prefill", _plan(uuid.uuid4().hex, PROMPT, d.relay_endpoints[:1]))
    assert d.prefill.leak_report() == []
