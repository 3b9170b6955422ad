"""``prfaas worker --engine triton`` as a real process against a fake Triton serving TensorRT-LLM's
``llmapi`` model (``tests/fakes/llmapi_triton.py``: the prefill model non-decoupled, the decode
model decoupled) on 127.0.0.1 (port 0), with the connector's plan servers stood in by real
``PlanServer``s: tokens equal the served model's output re-encoded with its own tokenizer
(``--tokenizer``); a relayed prefill ends at its first token with its plan posted to the
connector first; a decode with a ``transfer_uuid`` waits until every rank reports the transfer
complete, then runs with its plan, or without it after the announce timeout; the worker
advertises the ``--triton-*`` sizes and, on decode, ``--advertise-relay``; the role is fixed.
Every server and process is stopped in ``finally``/``with``. The compose GPU testbed's worker
commands parse with this CLI."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes import tokenizer as fake_tokenizer
from tests.fakes.llmapi_triton import FakeLlmapiTriton
from tests.harness import collect, new_uuid, spawn_worker
from tests.router.conftest import make_engine
from trtllm_prfaas.connector.plans import PlanBook, PlanServer
from trtllm_prfaas.engines.base import describe
from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.transport.config import RelaySecurity
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.assembly import WorkerConfig
from trtllm_prfaas.worker.command import add_arguments, build_config

hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture
PROMPT_TEXT = "Prefill-as-a-Service streams KV across datacenters: 東京 🚀 naïve"
SIZES = ["--triton-max-seq-len", "512", "--triton-max-batch-size", "8", "--triton-num-blocks",
         "128", "--triton-tokens-per-block", "16", "--triton-connect-timeout-s", "20"]  # fmt: skip
COMPOSE_GPU = Path(__file__).resolve().parents[2] / "docker" / "compose.gpu.yml"
PLAIN = RelaySecurity.insecure_plaintext()


@pytest.fixture
def tokenizer(hf_model_dir: Path) -> HfTokenizer:
    return HfTokenizer.from_dir(hf_model_dir)


@pytest.fixture
def plans() -> Iterator[tuple[PlanBook, dict[tuple[str, int], Any], str]]:
    """A two-rank connector's plan servers (rank r on port + r, as TRTLLM_PRFAAS_PLAN_BIND):
    (rank 0's book, statuses[(uuid, num_tokens)] answered by both ranks, rank 0's endpoint)."""
    book, statuses = PlanBook(), {}

    def status_of(uuid: str, num_tokens: int) -> str:
        value = statuses.get((uuid, num_tokens), "")
        return value() if callable(value) else value  # a callable stands in for the connector

    for _ in range(20):  # find two consecutive free ports
        rank0 = PlanServer("tcp://127.0.0.1:0", PLAIN, 0, book=book, status_of=status_of)
        port = int(rank0.endpoint.rsplit(":", 1)[1])
        try:
            rank1 = PlanServer(f"tcp://127.0.0.1:{port + 1}", PLAIN, 1, book=None,
                               status_of=status_of)  # fmt: skip
        except Exception:
            rank0.close()
            continue
        with rank0, rank1:
            yield book, statuses, rank0.endpoint
        return
    pytest.fail("no two consecutive free ports for the plan servers")


def _worker(role: str, triton: FakeLlmapiTriton, model_dir: Path, plan_endpoint: str,
            *extra: str) -> Any:  # fmt: skip
    return spawn_worker(
        role, "dc-remote" if role == "prefill" else "dc-local", "--engine", "triton",
        "--triton-url", triton.address, "--tokenizer", str(model_dir),
        "--triton-plan-endpoint", plan_endpoint, "--triton-tp-size", "2", "--plaintext",
        *SIZES, *extra,
    )  # fmt: skip


def test_prefill_worker_over_triton(hf_model_dir: Path, tokenizer: HfTokenizer, plans: Any) -> None:
    book, _, endpoint = plans
    prompt = tokenizer.encode(PROMPT_TEXT)
    text = tokenizer.decode(prompt)
    with FakeLlmapiTriton(hf_model_dir, decoupled=False) as triton:
        worker = _worker("prefill", triton, hf_model_dir, endpoint)
        try:
            assert worker.relay == ""
            with worker.client() as client:
                info = client.ping(10)
                assert (info.role, info.cluster, info.model_id) == ("prefill", "dc-remote",
                                                                    "tensorrt_llm")  # fmt: skip
                sizes = (info.max_seq_len, info.max_num_seqs, info.num_blocks,
                         info.tokens_per_block)  # fmt: skip
                assert sizes == (512, 8, 128, 16) and info.relay_endpoint == ""

                client.send(p.Submit("greedy", prompt, 12))
                greedy = collect(client, "greedy")  # collect drops other requests' messages
                client.send(p.Submit("sampled", prompt[:9], 9, temperature=0.8, seed=1234))
                sampled = collect(client, "sampled")
                assert greedy.error_kind == "" and sampled.error_kind == ""
                assert greedy.finish_reason == sampled.finish_reason == "length"
                assert greedy.token_ids == _model(tokenizer, triton, text, 12)
                short = tokenizer.decode(prompt[:9])
                assert sampled.token_ids == _model(tokenizer, triton, short, 9, 0.8, 1234)

                # A relayed prefill ends at its first token; its plan reached the connector first.
                uuid = new_uuid()
                relays = "tcp://10.0.0.2:7100,tcp://10.0.0.2:7101"
                client.send(p.Submit("relayed", prompt, 12, transfer_uuid=uuid,
                                     relay_endpoint=relays))  # fmt: skip
                relayed = collect(client, "relayed")
                assert relayed.error_kind == ""
                assert relayed.token_ids == _model(tokenizer, triton, text, 1)
                plan = book.take(prompt)  # what the connector's scheduler looks up
                assert plan is not None and plan.transfer_uuid == uuid
                assert plan.relay_endpoints == relays.split(",")

                client.send(p.SetRole("decode", drain_timeout_s=1.0))  # fixed by the deployment
                answer = client.recv(10)
                while not isinstance(answer, p.WorkerInfo):
                    assert answer is not None, "no WorkerInfo after SetRole"
                    answer = client.recv(10)
                assert answer.role == "prefill"
        finally:
            assert worker.stop() == 0


def _model(tokenizer: HfTokenizer, triton: FakeLlmapiTriton, text: str, max_tokens: int,
           temperature: float | None = None, seed: int | None = None) -> list[int]:  # fmt: skip
    """What the served model answers, as token ids re-encoded from its text."""
    final = triton.llm.reference(text, max_tokens, temperature, seed).text
    return tokenizer.encode(final, add_special_tokens=False)


def test_decode_worker_waits_for_the_transfer_on_every_rank(
    hf_model_dir: Path, tokenizer: HfTokenizer, plans: Any
) -> None:
    book, statuses, endpoint = plans
    prompt = tokenizer.encode(PROMPT_TEXT)
    words = [tokenizer.encode(w, add_special_tokens=False) for w in (" the", " and", " t")]
    t1 = next(ids[0] for ids in words if len(ids) == 1)  # a whole-word first token
    relay = "tcp://triton-decode:7100"
    with FakeLlmapiTriton(hf_model_dir, decoupled=True) as triton:
        worker = _worker("decode", triton, hf_model_dir, endpoint, "--advertise-relay", relay)
        try:
            assert worker.relay == relay
            with worker.client() as client:
                assert client.ping(10).relay_endpoint == relay
                uuid = new_uuid()
                statuses[(uuid, len(prompt))] = "receiving"
                client.send(p.Submit("d1", [*prompt, t1], 10, transfer_uuid=uuid))
                time.sleep(0.5)
                assert not triton.stats.requests  # held while the transfer is arriving
                statuses[(uuid, len(prompt))] = "complete"
                tokens = collect(client, "d1", timeout_s=30)
                assert tokens.error_kind == ""
                text = tokenizer.decode([*prompt, t1])
                assert tokens.token_ids == _model(tokenizer, triton, text, 10)
                plan = book.take(prompt)  # the decode's plan: the prompt without t1
                assert plan is not None and plan.transfer_uuid == uuid

                # Never announced: after the announce timeout it runs without a plan.
                started = time.monotonic()
                client.send(p.Submit("d2", [*prompt, t1], 4, transfer_uuid=new_uuid(),
                                     announce_timeout_s=0.5))  # fmt: skip
                late = collect(client, "d2", timeout_s=30)
                assert late.error_kind == "" and time.monotonic() - started < 10
                assert late.token_ids == _model(tokenizer, triton, text, 4)
                assert book.counts().held == 0
        finally:
            assert worker.stop() == 0


@pytest.mark.parametrize("outcome", ["loaded", "load_failed"])
def test_decode_worker_asks_the_connector_how_its_load_went(
    hf_model_dir: Path, tokenizer: HfTokenizer, plans: Any, outcome: str
) -> None:
    """At a remote decode's first token the worker asks every rank about the load: ``loaded``
    is reported as relayed tokens (the router's relay-outcome metric); ``load_failed`` (the
    connector inside TensorRT-LLM cannot fail a parked request) makes the worker abort that
    response and run the request again without its plan: the client gets the model's tokens."""
    _, statuses, endpoint = plans
    prompt = tokenizer.encode(PROMPT_TEXT)
    t1 = tokenizer.encode(" the", add_special_tokens=False)[0]
    with FakeLlmapiTriton(hf_model_dir, decoupled=True) as triton:
        worker = _worker("decode", triton, hf_model_dir, endpoint, "--advertise-relay", "tcp://d:1")
        try:
            with worker.client() as client:
                uuid = new_uuid()
                # The connector's answers: complete until the request reached it, then the load.
                statuses[(uuid, len(prompt))] = lambda: (
                    outcome if triton.stats.requests else ("complete")
                )
                client.send(p.Submit("d3", [*prompt, t1], 6, transfer_uuid=uuid))
                tokens = collect(client, "d3", timeout_s=30)
                assert tokens.error_kind == ""
                text = tokenizer.decode([*prompt, t1])
                assert tokens.token_ids == _model(tokenizer, triton, text, 6)
                if outcome == "loaded":
                    assert tokens.num_connector_tokens == len(prompt)
                    assert len(triton.stats.requests) == 1
                else:  # aborted at its first token, run again without the plan
                    assert tokens.num_connector_tokens == 0
                    assert len(triton.stats.requests) == 2
        finally:
            assert worker.stop() == 0


def _config(*argv: str) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    add_arguments("worker", parser)
    return build_config(parser.parse_args(list(argv)))


def test_cli_checks_triton_flags(tmp_path: Path) -> None:
    triton = ("--engine", "triton", "--triton-url", "h:1")
    with pytest.raises(ConfigError, match="advertise_relay"):
        _config("--role", "decode", "--cluster", "c", *triton, "--tokenizer", "/m")
    with pytest.raises(ConfigError, match="--triton-url HOST:PORT"):
        _config("--role", "prefill", "--cluster", "c", "--engine", "triton")
    with pytest.raises(ConfigError, match="needs --tokenizer DIR"):
        _config("--role", "prefill", "--cluster", "c", *triton)
    with pytest.raises(ConfigError, match="need --engine triton"):
        _config("--role", "decode", "--cluster", "c", "--plaintext", "--triton-url", "h:1")
    reference = _config("--role", "prefill", "--cluster", "c", "--plaintext")
    assert reference.triton is None and reference.advertise_relay == ""
    # A reference decode worker binding a wildcard advertises the name its peers reach it by.
    wildcard = ("--relay", "tcp://0.0.0.0:7100", "--advertise-relay", "tcp://d:7100")
    behind_dns = _config("--role", "decode", "--cluster", "c", "--plaintext", *wildcard)
    assert behind_dns.triton is None and behind_dns.advertise_relay == "tcp://d:7100"
    # Plans: one plan server per rank (port + rank), Curve keys from the key directory.
    base = ("--role", "prefill", "--cluster", "c", *triton, "--tokenizer", "/m",
            "--triton-plan-endpoint", "tcp://t:7200", "--triton-tp-size", "2")  # fmt: skip
    with pytest.raises(ConfigError, match="needs --triton-plan-keys DIR"):
        _config(*base)
    plain = _config(*base, "--plaintext").triton
    assert plain is not None and plain.plan_endpoints == ("tcp://t:7200", "tcp://t:7201")
    assert plain.tokenizer_dir == "/m"
    for name in ("prefill.public", "worker.public", "worker.secret"):
        (tmp_path / name).write_bytes(b"x" * 40)
    curve = _config(*base, "--triton-plan-keys", str(tmp_path)).triton
    assert curve is not None and curve.plan_security is not None
    assert curve.plan_security.curve is not None
    assert curve.plan_security.curve.server_public_key == b"x" * 40
    decode = (
        "--role",
        "decode",
        "--cluster",
        "c",
        *triton,
        "--tokenizer",
        "/m",
        "--advertise-relay",
        "tcp://d:1",
        "--triton-plan-endpoint",
        "tcp://t:7200",
    )
    with pytest.raises(ConfigError, match=r"decode\.public"):  # the decode Triton's own key
        _config(*decode, "--triton-plan-keys", str(tmp_path))
    no_plans = _config("--role", "prefill", "--cluster", "c", *triton, "--tokenizer", "/m").triton
    assert no_plans is not None and no_plans.plan_endpoints == ()


def test_cli_relay_knobs() -> None:
    base = ("--role", "prefill", "--cluster", "c", "--plaintext")
    config = _config(*base, "--chunk-bytes", "65536", "--relay-cpus", "0")
    assert config.relay.chunk_bytes == 65536 and config.relay.cpu_affinity == frozenset({0})
    assert _config(*base).relay.cpu_affinity is None
    with pytest.raises(ConfigError, match="--relay-cpus"):
        _config(*base, "--relay-cpus", "0,x")
    with pytest.raises(ConfigError, match="cpu_affinity"):
        _config(*base, "--relay-cpus", "-1")


def test_compose_gpu_worker_commands_parse(tmp_path: Path) -> None:
    services = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    commands = [s["command"] for s in services.values() if s.get("command")]
    commands = [c for c in commands if c[0] == "worker"]
    for name in ("prefill.public", "decode.public", "worker.public", "worker.secret"):
        (tmp_path / name).write_bytes(b"x" * 40)  # the curve-keys volume's files, stood in
    local = [[str(tmp_path) if a == "/etc/prfaas/curve" else a for a in c] for c in commands]
    configs = {c.role.value: c for c in (_config(*command[1:]) for command in local)}
    assert set(configs) == {"prefill", "decode"}
    for role, config in configs.items():
        assert config.triton is not None and config.triton.url == f"triton-{role}:8001"
        assert config.triton.tokenizer_dir == "/models/hf"
        assert config.triton.plan_endpoints[0] == f"tcp://triton-{role}:7200"
        assert len(config.triton.plan_endpoints) == 8  # the rendered model.yaml's TP size
    assert configs["decode"].advertise_relay == "tcp://triton-decode:7100"


def test_reference_descriptor_is_read_from_its_config() -> None:
    engine = make_engine()
    spec = engine.config.model.kv_spec
    d = describe(engine)
    assert (d.model_id, d.max_seq_len, d.tokens_per_block, d.num_blocks, d.max_num_seqs) == (
        engine.config.model.model_id,
        engine.config.model.max_seq_len,
        engine.config.model.tokens_per_block,
        engine.config.num_blocks,
        engine.config.max_num_seqs,
    )
    assert (d.kv_bytes_per_token, d.kv_state_bytes) == (spec.bytes_per_token, spec.state_bytes)
