"""``prfaas worker --engine triton`` as a real process against the project's KServe front door
over a tiny reference engine on 127.0.0.1 (port 0), a stand-in Triton: tokens equal a direct
reference run with the same seed; the worker advertises the ``--triton-*`` sizes and, on decode,
``--advertise-relay``; a decode with a ``transfer_uuid`` does not wait for an announce (the
connector inside Triton claims the transfer); the role is fixed. Every server and process is
stopped in ``finally``. The compose GPU testbed's worker commands parse with this CLI."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.harness import collect, new_uuid, spawn_worker
from tests.router.conftest import make_engine
from trtllm_prfaas.engines.base import describe
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.engines.tokenizer import ByteTokenizer
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router.frontdoor import FrontDoor, FrontDoorConfig
from trtllm_prfaas.router.local import LocalEngineOrchestrator
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.assembly import WorkerConfig
from trtllm_prfaas.worker.command import add_arguments, build_config

PROMPT = ByteTokenizer().encode("Prefill-as-a-Service streams KV across datacenters.")
SIZES = ["--triton-max-seq-len", "512", "--triton-max-batch-size", "8", "--triton-num-blocks",
         "128", "--triton-tokens-per-block", "16", "--triton-connect-timeout-s", "20"]  # fmt: skip
COMPOSE_GPU = Path(__file__).resolve().parents[2] / "docker" / "compose.gpu.yml"


@pytest.fixture
def triton() -> Iterator[str]:
    """The stand-in Triton's gRPC address; leaves nothing running in its engine."""
    orchestrator = LocalEngineOrchestrator(make_engine())
    door = FrontDoor(orchestrator, FrontDoorConfig(port=0))
    try:
        door.start()
        yield door.address
        deadline = time.monotonic() + 5
        while orchestrator.leak_report() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert orchestrator.leak_report() == []
    finally:
        door.close()
        orchestrator.close()


def _direct(prompt: list[int], sampling: SamplingParams) -> list[int]:
    (tokens,) = make_engine().generate([prompt], sampling)
    return tokens


def test_prefill_worker_over_triton_streams_a_direct_runs_tokens(triton: str) -> None:
    worker = spawn_worker("prefill", "dc-remote", "--engine", "triton", "--triton-url", triton,
                          *SIZES)  # fmt: skip
    try:
        assert worker.relay == ""
        with worker.client() as client:
            info = client.ping(10)
            assert (info.role, info.cluster, info.model_id) == ("prefill", "dc-remote",
                                                                "tensorrt_llm")  # fmt: skip
            sizes = (info.max_seq_len, info.max_num_seqs, info.num_blocks, info.tokens_per_block)
            assert sizes == (512, 8, 128, 16) and info.relay_endpoint == ""

            client.send(p.Submit("greedy", PROMPT, 12))
            greedy = collect(client, "greedy")  # collect drops other requests' messages
            client.send(p.Submit("sampled", PROMPT[:20], 9, temperature=0.8, seed=1234))
            sampled = collect(client, "sampled")
            assert greedy.error_kind == "" and sampled.error_kind == ""
            assert greedy.token_ids == _direct(PROMPT, SamplingParams(12))
            assert sampled.token_ids == _direct(PROMPT[:20], SamplingParams(9, 0.8, 1234))

            # A relayed prefill ends at its first token; the params ride along to Triton.
            client.send(p.Submit("relayed", PROMPT, 12, transfer_uuid=new_uuid(),
                                 relay_endpoint="tcp://127.0.0.1:7100"))  # fmt: skip
            relayed = collect(client, "relayed")
            assert relayed.error_kind == "" and relayed.token_ids == greedy.token_ids[:1]

            client.send(p.SetRole("decode", drain_timeout_s=1.0))  # fixed by the deployment
            answer = client.recv(10)
            while not isinstance(answer, p.WorkerInfo):
                assert answer is not None, "no WorkerInfo after SetRole"
                answer = client.recv(10)
            assert answer.role == "prefill"
    finally:
        assert worker.stop() == 0


def test_decode_worker_over_triton_advertises_the_relay_and_does_not_wait(triton: str) -> None:
    relay = "tcp://triton-decode:7100"
    worker = spawn_worker("decode", "dc-local", "--engine", "triton", "--triton-url", triton,
                          "--advertise-relay", relay, *SIZES)  # fmt: skip
    try:
        assert worker.relay == relay
        with worker.client() as client:
            assert client.ping(10).relay_endpoint == relay
            started = time.monotonic()
            submit = p.Submit("d1", PROMPT, 10, transfer_uuid=new_uuid(), announce_timeout_s=120)
            client.send(submit)
            tokens = collect(client, "d1", timeout_s=60)
            assert time.monotonic() - started < 60  # never waited for an announce
            assert tokens.error_kind == ""
            assert tokens.token_ids == _direct(PROMPT, SamplingParams(10))
    finally:
        assert worker.stop() == 0


def _config(*argv: str) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    add_arguments("worker", parser)
    return build_config(parser.parse_args(list(argv)))


def test_cli_checks_triton_flags() -> None:
    with pytest.raises(ConfigError, match="advertise_relay"):
        _config("--role", "decode", "--cluster", "c", "--engine", "triton", "--triton-url", "h:1")
    with pytest.raises(ConfigError, match="--triton-url HOST:PORT"):
        _config("--role", "prefill", "--cluster", "c", "--engine", "triton")
    with pytest.raises(ConfigError, match="need --engine triton"):
        _config("--role", "decode", "--cluster", "c", "--plaintext", "--advertise-relay", "x")
    reference = _config("--role", "prefill", "--cluster", "c", "--plaintext")
    assert reference.triton is None and reference.advertise_relay == ""


def test_cli_relay_knobs() -> None:
    base = ("--role", "prefill", "--cluster", "c", "--plaintext")
    config = _config(*base, "--chunk-bytes", "65536", "--relay-cpus", "0")
    assert config.relay.chunk_bytes == 65536 and config.relay.cpu_affinity == frozenset({0})
    assert _config(*base).relay.cpu_affinity is None
    with pytest.raises(ConfigError, match="--relay-cpus"):
        _config(*base, "--relay-cpus", "0,x")
    with pytest.raises(ConfigError, match="cpu_affinity"):
        _config(*base, "--relay-cpus", "-1")


def test_compose_gpu_worker_commands_parse() -> None:
    services = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    commands = [s["command"] for s in services.values() if s.get("command")]
    commands = [c for c in commands if c[0] == "worker"]
    configs = {c.role.value: c for c in (_config(*command[1:]) for command in commands)}
    assert set(configs) == {"prefill", "decode"}
    for role, config in configs.items():
        assert config.triton is not None and config.triton.url == f"triton-{role}:8001"
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
