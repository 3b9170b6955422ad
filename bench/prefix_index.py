"""Prefix-index benchmark: lookup time for a 128K-token prompt against an anchor.

    python bench/prefix_index.py --json

Builds a :class:`~trtllm_prfaas.router.prefix_index.PrefixIndex` of two clusters of
``--nodes`` nodes each, fed by KV cache events as engines record them: every node holds a
different-length prefix of the probe prompt plus ``--noise-blocks`` blocks of other prompts, and
half of the second cluster's nodes are approximate (fed from routing history). It then times the
questions the router asks per request: how much node N holds (``match``) and the best node of
each cluster (``best_in_cluster``), medians over ``--repeats``. The anchor, measured in the same
run, is hashing the prompt's blocks (``index.hashes_for``), which the router does once per
request anyway. Target: a cluster lookup well under a millisecond (``lookup_ok``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from trtllm_prfaas.kv.events import KvEventLog
from trtllm_prfaas.kv.hashing import CacheKey, block_hashes
from trtllm_prfaas.router.prefix_index import PrefixIndex

TOKENS_PER_BLOCK = 32
KEY = CacheKey("prfaas-reference-hybrid", "HND", "float32", 0)


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _feed(
    index: PrefixIndex, node_id: str, hashes: list[int], chain: int, with_state: bool = True
) -> None:
    """Store ``hashes`` on an exact node as an engine does: chains of ``chain`` blocks, and a
    state snapshot where the last chain ends (a hybrid engine keeps one there)."""
    log = KvEventLog(max_events=1 << 20)
    for start in range(0, len(hashes), chain):
        parent = hashes[start - 1] if start else None
        log.record_stored(parent, hashes[start : start + chain], TOKENS_PER_BLOCK)
    if hashes and with_state:
        log.record_state_stored(hashes[-1], len(hashes) * TOKENS_PER_BLOCK)
    index.apply(node_id, log.drain())


def build(
    num_tokens: int, num_nodes: int, noise_blocks: int, seed: int, requires_states: bool = False
) -> tuple[PrefixIndex, list[int]]:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 50_000, num_tokens).tolist()
    index = PrefixIndex(KEY, TOKENS_PER_BLOCK, requires_states=requires_states)
    hashes = index.hashes_for(prompt)
    for cluster in ("prfaas", "pd"):
        for i in range(num_nodes):
            node_id = f"{cluster}-{i}"
            approximate = cluster == "pd" and i % 2 == 1
            index.add_node(node_id, cluster, approximate=approximate)
            held = hashes[: int(len(hashes) * (i + 1) / num_nodes)]
            noise = block_hashes(
                rng.integers(0, 50_000, noise_blocks * TOKENS_PER_BLOCK).tolist(),
                TOKENS_PER_BLOCK,
                KEY,
            )
            if approximate:
                index.record_routed(node_id, noise, now=0.0)
                index.record_routed(node_id, held, now=0.0)
            else:
                _feed(index, node_id, noise, chain=64)
                _feed(index, node_id, held, chain=64)
    return index, prompt


def run(num_tokens: int, num_nodes: int, noise_blocks: int, repeats: int) -> dict[str, object]:
    index, prompt = build(num_tokens, num_nodes, noise_blocks, seed=0)
    hashes = index.hashes_for(prompt)
    hash_us = _median_us(lambda: index.hashes_for(prompt), max(5, repeats // 20))
    node_us = _median_us(lambda: index.match("prfaas-0", hashes, 1.0), repeats)
    cluster_us = _median_us(lambda: index.best_in_cluster("prfaas", hashes, 1.0), repeats)
    mixed_us = _median_us(lambda: index.best_in_cluster("pd", hashes, 1.0), repeats)
    best = index.best_in_cluster("pd", hashes, 1.0)
    assert best is not None and best.num_blocks == len(hashes), best  # the last node holds all
    hybrid, _ = build(num_tokens, num_nodes, noise_blocks, seed=0, requires_states=True)
    hybrid_us = _median_us(lambda: hybrid.best_in_cluster("prfaas", hashes, 1.0), repeats)
    # Worst case: the node holds every block but no snapshot, so the match steps back to 0.
    worst = PrefixIndex(KEY, TOKENS_PER_BLOCK, requires_states=True)
    worst.add_node("n", "c")
    _feed(worst, "n", hashes, chain=64, with_state=False)
    worst_us = _median_us(lambda: worst.match("n", hashes, 1.0), max(5, repeats // 20))
    return {
        "num_tokens": num_tokens,
        "num_blocks": len(hashes),
        "nodes_per_cluster": num_nodes,
        "noise_blocks_per_node": noise_blocks,
        "anchor_hash_prompt_us": round(hash_us, 1),
        "match_node_us": round(node_us, 2),
        "best_in_cluster_exact_us": round(cluster_us, 2),
        "best_in_cluster_mixed_us": round(mixed_us, 2),
        "best_in_cluster_hybrid_us": round(hybrid_us, 2),
        "match_hybrid_no_snapshot_worst_us": round(worst_us, 1),
        "cluster_lookup_over_hash": round(max(cluster_us, mixed_us) / hash_us, 4),
        "lookup_ok": max(cluster_us, mixed_us) < 1000.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--nodes", type=int, default=8, help="nodes per cluster")
    parser.add_argument("--noise-blocks", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    result = run(args.tokens, args.nodes, args.noise_blocks, args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        for name, value in result.items():
            print(f"{name:>28}: {value}")
    return 0 if result["lookup_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
