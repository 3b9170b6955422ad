"""``prfaas simulate prefix``: cache-aware against cache-blind routing in the DES (small runs)."""

from __future__ import annotations

import json

import pytest

from trtllm_prfaas.cli import main

SMALL = ["--conversations", "60", "--rate", "0.1", "--questions", "150", "--question-rate", "1"]


def test_prefix_figures_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "prefix", "--json", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    chat, docs = out["multi_turn"], out["shared_documents"]
    assert chat["num_requests"] == 240 and docs["num_requests"] == 150
    for trace in (chat, docs):
        assert trace["no_cache"]["prefill_tokens"] == trace["prompt_tokens"]
        assert trace["no_cache"]["reused_share"] == 0
        assert trace["blind"]["prefill_tokens_vs_blind"] == 1.0
        assert trace["aware"]["prefill_tokens"] < trace["blind"]["prefill_tokens"]
    # Multi-turn: with t solved for the incremental lengths, cache-aware routing computes far
    # less than no caches at all and its P90 TTFT is below the cache-blind router's.
    assert chat["aware"]["prefill_tokens"] <= 0.5 * chat["no_cache"]["prefill_tokens"]
    assert chat["aware"]["p90_ttft_s"] < chat["blind"]["p90_ttft_s"]
    assert chat["aware"]["threshold_tokens"] < chat["blind"]["threshold_tokens"]
    longest = chat["aware_longest_prefix"]  # the node choice before the hotspot rule
    assert longest["busiest_node_share"] >= chat["aware"]["busiest_node_share"]


def test_prefix_figures_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "prefix", *SMALL, "--policy", "abundant"]) == 0
    text = capsys.readouterr().out
    assert "multi_turn: 240 requests" in text and "aware_prompt_t" in text
