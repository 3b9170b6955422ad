"""The server probe (what the model accepts, its announced max length) and config checks."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.loadgen import command
from trtllm_prfaas.loadgen.client import probe
from trtllm_prfaas.loadgen.runner import BenchConfig


class FakeClient:
    """Answers the two metadata calls the probe makes, as ``as_json=True`` dicts."""

    def __init__(self, parameters: dict[str, Any], outputs: tuple[str, ...]) -> None:
        self.parameters, self.outputs = parameters, outputs

    async def get_model_metadata(self, model: str, **_: Any) -> dict[str, Any]:
        return {"inputs": [{"name": "text_input"}, {"name": "input_ids"}],
                "outputs": [{"name": n} for n in self.outputs]}  # fmt: skip

    async def get_model_config(self, model: str, **_: Any) -> dict[str, Any]:
        return {"config": {"name": model, "parameters": self.parameters}}


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({}, None),
        ({"max_input_len": {"string_value": "6000"}}, 6000),
        ({"max_seq_len": {"string_value": "8192"}}, 8192 - 32),  # room for the output
        ({"max_seq_len": {"string_value": "${max_seq_len}"}}, None),  # an unfilled template
    ],
)
def test_probe_reads_the_announced_max_length(parameters: dict[str, Any], expected: int) -> None:
    info = asyncio.run(probe(FakeClient(parameters, ("text_output",)), "m", 32, 1.0))
    assert info.max_prompt_tokens == expected
    assert info.has_input_ids and not info.has_output_ids


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments("bench", parser)
    return parser.parse_args(["--url", "127.0.0.1:1", *argv])


def test_flags_make_a_config() -> None:
    assert command.config_from_args(parse()).concurrency == 1
    config = command.config_from_args(parse("--rate", "2.5", "--duration-s", "10"))
    assert (config.rate_rps, config.concurrency) == (2.5, None)
    assert config.effective_run_timeout_s == 10 + 60 + 5
    with pytest.raises(SystemExit):  # argparse: not both
        parse("--rate", "1", "--concurrency", "2")
    with pytest.raises(ConfigError, match="concurrency"):
        command.config_from_args(parse("--concurrency", "0"))
    with pytest.raises(ConfigError, match="max_tokens"):
        command.config_from_args(parse("--max-tokens", "0"))
    with pytest.raises(ConfigError, match="exactly one"):
        BenchConfig(url="x:1", rate_rps=1.0, concurrency=2)
