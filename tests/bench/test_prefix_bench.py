"""bench/prefix.py --quick: both traces, cache-aware and cache-blind, on fresh testbeds (tiny
model). Checks the JSON's shape and what must hold whatever the machine's speed: every request
answered, the same tokens for the same request in both runs, counts taken from the workers (the
prompt tokens the prefill nodes were asked for are the client's), and on the multi-turn trace
the cache-aware router computes no more prefill tokens than the blind one. No timing is
asserted."""

from __future__ import annotations

import json
import os

import prefix as bench
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("PRFAAS_BENCH_TEST") != "1",
    reason="~40 s, four testbeds: `make bench-test` (PRFAAS_BENCH_TEST=1; CI runs it)",
)

SIDE_KEYS = {
    "num_requests", "num_failed", "ttft_mean_ms", "ttft_p90_ms", "prompt_tokens",
    "prefill_tokens_computed", "prefill_tokens_reused", "prefill_hit_rate", "decode_hit_rate",
    "wan_bytes", "local_relay_bytes", "prefill_nodes", "decode_nodes", "fallbacks",
}  # fmt: skip
RATIOS = {"prefill_tokens_computed", "wan_bytes", "ttft_mean_ms", "ttft_p90_ms"}


def test_quick_run_aware_against_blind(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    settings = bench.QUICK
    expected = {
        "multi_turn": settings.num_conversations * settings.num_turns,
        "shared_document": settings.num_questions,
    }
    for trace, num_requests in expected.items():
        t = result[trace]
        assert set(t["ratios"]) == RATIOS
        assert t["bit_exact"] is True and t["mismatched"] == []
        assert t["num_compared"] == num_requests
        for side in ("aware", "blind"):
            s = t[side]
            assert set(s) >= SIDE_KEYS, SIDE_KEYS - set(s)
            assert (s["num_requests"], s["num_failed"]) == (num_requests, 0), s["errors"]
            assert sum(s["prefill_nodes"].values()) == num_requests
            assert s["fallbacks"] == {"prefill_fallback": 0, "relay_recomputed": 0}
            # every prompt token was asked of a prefill node once: computed + reused
            assert s["prefill_tokens_computed"] + s["prefill_tokens_reused"] == s["prompt_tokens"]
            assert s["prefill_tokens_computed"] > 0 and s["wan_bytes"] > 0
            assert 0.0 <= s["prefill_hit_rate"] <= 1.0
        assert t["blind"]["router_prefix_tokens"] == 0  # the blind router saw no prefix
    multi = result["multi_turn"]
    aware, blind = multi["aware"], multi["blind"]
    assert aware["prefill_tokens_computed"] <= blind["prefill_tokens_computed"]
    assert aware["prefill_tokens_reused"] > 0  # later turns reuse their history
    assert set(result["targets_multi_turn"]) == {
        "prefill_tokens_le_half", "wan_bytes_le_half", "p90_ttft_lower",
    }  # fmt: skip
    index = result["index_lookup"]
    assert index["num_tokens"] == settings.index_tokens and index["lookup_ok"] is True
    assert len(result["load_average_1m"]) == 2
