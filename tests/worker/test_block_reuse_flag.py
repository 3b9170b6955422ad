"""The switch for prefix caches: ``prfaas worker --enable-block-reuse`` (and ``prfaas up``'s
``enable_block_reuse`` key) reaches the engine config; off by default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.testbed.spec import load_testbed_config
from trtllm_prfaas.worker import command
from trtllm_prfaas.worker.server import WorkerServer


def _worker_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments("worker", parser)
    return parser.parse_args(["--role", "prefill", "--cluster", "dc", "--plaintext", *extra])


def test_worker_flag_turns_block_reuse_on() -> None:
    assert not command.build_config(_worker_args()).engine.enable_block_reuse
    config = command.build_config(_worker_args("--enable-block-reuse", "--max-cached-blocks", "9"))
    assert config.engine.enable_block_reuse and config.engine.max_cached_blocks == 9


def test_triton_worker_refuses_the_reference_engines_flag() -> None:
    with pytest.raises(ConfigError, match="TensorRT-LLM's"):
        command.build_config(
            _worker_args("--engine", "triton", "--triton-url", "h:1", "--enable-block-reuse")
        )


def test_testbed_key_passes_the_flag_to_every_worker(tmp_path: Path) -> None:
    assert all(
        "--enable-block-reuse" not in args
        for args in load_testbed_config(None).worker_args().values()
    )
    path = tmp_path / "testbed.yaml"
    path.write_text("enable_block_reuse: true\n")
    workers = load_testbed_config(path).worker_args()
    assert workers and all("--enable-block-reuse" in args for args in workers.values())


def test_worker_flag_accepts_cache_moves() -> None:
    """``--accept-cache-moves`` (issue 15 item 5): a prefill worker binds a relay receiver and
    says where in its ``WorkerInfo``; off by default (a prefill worker has none)."""
    plain = command.build_config(_worker_args("--model-preset", "tiny"))
    assert not plain.accept_cache_moves
    config = command.build_config(_worker_args("--model-preset", "tiny", "--accept-cache-moves"))
    assert config.accept_cache_moves
    for built, has_receiver in ((plain, False), (config, True)):
        with WorkerServer(built) as server:
            assert bool(server.info().relay_endpoint) is has_receiver


def test_triton_worker_refuses_cache_moves() -> None:
    """Accepted silently, the flag would do nothing there (no receiver in Triton's connector)."""
    with pytest.raises(ConfigError, match="--accept-cache-moves needs --engine reference"):
        command.build_config(
            _worker_args("--engine", "triton", "--triton-url", "h:1", "--accept-cache-moves")
        )
