"""``prfaas bench`` end to end: stock tritonclient against a real front door."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import pytest

from tests.loadgen.conftest import Served
from trtllm_prfaas.engines.tokenizer import ByteTokenizer
from trtllm_prfaas.loadgen import command
from trtllm_prfaas.loadgen.runner import BenchConfig, BenchError, run_bench
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator, TokenChunk
from trtllm_prfaas.router.frontdoor import FrontDoor, FrontDoorConfig

FIELDS = {
    "url", "model", "arrivals", "rate_rps", "concurrency", "max_tokens", "prompt_kind", "seed",
    "max_prompt_tokens", "max_prompt_tokens_source", "duration_s", "num_requests", "num_sent",
    "num_ok", "num_failed", "num_not_sent", "ttft_ms", "tpot_ms", "request_throughput_rps",
    "output_tokens_per_s", "num_output_tokens", "num_prompt_tokens", "failures",
    "failure_reasons", "remote_share", "relay_bytes", "egress_gbps", "num_routed",
    "metrics_error",
}  # fmt: skip


def bench(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """Run ``prfaas bench ARGV --json`` through the command's own parser; the JSON report."""
    parser = argparse.ArgumentParser(prog="prfaas bench")
    command.add_arguments("bench", parser)
    status = command.run("bench", parser.parse_args([*argv, "--json", "--no-progress"]))
    # The in-process server's own log lines share stdout; the report is the one JSON line.
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('{"url"')]
    assert len(lines) == 1, lines
    return status, json.loads(lines[0])


def assert_counts_add_up(report: dict[str, Any]) -> None:
    assert report["num_sent"] == report["num_ok"] + report["num_failed"]
    assert report["num_requests"] == report["num_sent"] + report["num_not_sent"]
    assert sum(report["failures"].values()) == report["num_failed"]


def test_closed_loop_with_token_ids_and_metrics(served: Served, capsys) -> None:
    status, report = bench(capsys, "--url", served.door.address, "--concurrency", "3",
                           "--num-requests", "6", "--max-tokens", "4", "--prompt", "ids",
                           "--max-prompt-tokens", "200", "--seed", "7",
                           "--metrics-url", served.metrics_server.url)  # fmt: skip
    assert status == 0 and set(report) == FIELDS
    assert_counts_add_up(report)
    assert (report["num_ok"], report["num_failed"], report["num_not_sent"]) == (6, 0, 0)
    assert report["arrivals"] == "concurrency" and report["max_prompt_tokens_source"] == "flag"
    assert set(report["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
    assert set(report["tpot_ms"]) == {"mean", "p50", "p90"}
    ttft = report["ttft_ms"]
    assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] and ttft["mean"] > 0
    assert 6 <= report["num_output_tokens"] <= 24 and report["output_tokens_per_s"] > 0
    assert report["request_throughput_rps"] > 0 and report["failures"] == {}
    # One engine routes nothing and relays nothing: a share is n/a, the byte counters are zero.
    assert report["num_routed"] == 0 and report["remote_share"] is None
    assert report["relay_bytes"] == 0 and report["metrics_error"] is None
    answered = served.metrics.frontdoor_requests.labels(
        model="tensorrt_llm", rpc="ModelStreamInfer", status="OK")._value.get()  # fmt: skip
    assert answered == 6


def test_poisson_text_prompts_and_the_text_report(served: Served, capsys) -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments("bench", parser)
    args = parser.parse_args(["--url", served.door.address, "--rate", "40", "--num-requests",
                              "5", "--max-tokens", "3", "--max-prompt-tokens", "300",
                              "--progress"])  # fmt: skip
    assert command.run("bench", args) == 0
    captured = capsys.readouterr()
    assert "bench [" in captured.err and "5/5" in captured.err  # the progress bar
    for label in ("TTFT (ms)", "TPOT (ms)", "throughput", "poisson 40 req/s", "ok 5"):
        assert label in captured.out, label
    assert "router       n/a (no --metrics-url)" in captured.out


def test_prompts_over_the_max_length_fail_in_stream(served: Served, capsys) -> None:
    # The engine takes 32768 tokens and its pool 4096: nearly every prompt scaled to 200K
    # tokens is rejected (over the max length, or more KV blocks than the pool has).
    status, report = bench(capsys, "--url", served.door.address, "--concurrency", "4",
                           "--num-requests", "8", "--max-tokens", "2",
                           "--max-prompt-tokens", "200000", "--seed", "1")  # fmt: skip
    assert_counts_add_up(report)
    assert report["num_failed"] > 0 and set(report["failures"]) == {"IN_STREAM_ERROR"}
    reason = report["failure_reasons"]["IN_STREAM_ERROR"]
    assert "exceeds the max length" in reason or "KV blocks" in reason, reason
    assert status == (0 if report["num_ok"] else 1)


def test_duration_caps_sending(served: Served, capsys) -> None:
    started = time.monotonic()
    _, report = bench(capsys, "--url", served.door.address, "--rate", "10", "--num-requests",
                      "1000", "--duration-s", "0.5", "--max-tokens", "2",
                      "--max-prompt-tokens", "64")  # fmt: skip
    assert time.monotonic() - started < 10
    assert_counts_add_up(report)
    assert 1 <= report["num_sent"] < 30 and report["num_not_sent"] > 900


class HangingOrchestrator(Orchestrator):
    """Yields one token, then never finishes until cancelled."""

    model_name = "tensorrt_llm"
    max_seq_len = 4096
    vocab_size = ByteTokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return ByteTokenizer().encode(text)

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        yield TokenChunk([72], "H")
        await asyncio.Event().wait()


@pytest.fixture
def hanging_door() -> Iterator[FrontDoor]:
    with FrontDoor(HangingOrchestrator(), FrontDoorConfig(port=0, shutdown_grace_s=0.1)) as door:
        yield door


def test_stuck_requests_fail_by_their_deadline(hanging_door: FrontDoor, capsys) -> None:
    started = time.monotonic()
    status, report = bench(capsys, "--url", hanging_door.address, "--concurrency", "2",
                           "--num-requests", "2", "--request-timeout-s", "0.5",
                           "--max-prompt-tokens", "64")  # fmt: skip
    assert time.monotonic() - started < 5 and status == 1
    assert report["failures"] == {"DEADLINE_EXCEEDED": 2} and report["num_ok"] == 0
    assert report["ttft_ms"]["mean"] is None  # failed requests are not in the latencies


def test_the_run_deadline_cancels_what_is_in_flight(hanging_door: FrontDoor) -> None:
    config = BenchConfig(
        url=hanging_door.address,
        concurrency=3,
        num_requests=10,
        request_timeout_s=30.0,
        run_timeout_s=0.5,
        max_prompt_tokens=64,
    )
    started = time.monotonic()
    report = asyncio.run(run_bench(config))
    assert time.monotonic() - started < 5
    stats = report.stats
    assert stats.failures == {"CANCELLED": 3} and report.num_not_sent == 7
    assert report.as_dict()["num_requests"] == stats.num_sent + report.num_not_sent


def test_an_unreachable_server_is_a_clear_error(hanging_door: FrontDoor) -> None:
    config = BenchConfig(url=hanging_door.address, model="no_such_model", probe_timeout_s=2.0)
    with pytest.raises(BenchError, match="no_such_model"):
        asyncio.run(run_bench(config))
