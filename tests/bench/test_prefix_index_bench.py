"""bench/prefix_index.py at a small size: it builds the index, checks the best node holds the
whole prompt, and prints one JSON line with the lookup and anchor times."""

from __future__ import annotations

import json

import prefix_index as bench
import pytest


def test_bench_prints_lookup_against_anchor(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--json",
        "--tokens",
        "8192",
        "--nodes",
        "3",
        "--noise-blocks",
        "100",
        "--repeats",
        "50",
    ]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_blocks"] == 8191 // 32
    assert 0 < result["match_node_us"] < result["anchor_hash_prompt_us"] * 10
    assert result["lookup_ok"] is True
