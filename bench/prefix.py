"""Cache-aware against cache-blind routing on the embedded testbed (issue 15's benchmark).

    python bench/prefix.py --json        # ~2 minutes on a 2-core host
    python bench/prefix.py --quick       # the tiny model and small traces (the test)

Each trace (``bench/_prefix_traces.py``: multi-turn conversations with shared system prompts
and growing histories; many questions over a few long documents) is played twice from the same
seed through the in-process testbed (``testbed.up.Testbed``: worker processes on loopback, the
router in this process): once with the router cache-aware (``prefix_routing: true``, the
default) and once cache-blind (``prefix_routing: false``: the router routes as if no node held
any prefix). Every worker keeps its prefix cache in both runs (block reuse on), as workers do
behind a cache-blind router, and each run gets fresh workers, so caches start cold. Topology:
``--prfaas-prefill`` (3) PrfaaS prefill nodes, 1 PD-P, 2 PD-D, so placement has choices.

Two settings differ from ``prfaas up``'s defaults, both so that routing matters and the runs
compare: the threshold is fixed (``--threshold-tokens``, no control loop: the loop's choices
would follow each run's own timing), and prefill workers admit ``--prefill-max-num-seqs``
requests at once (default 2; a worker reports as queued only what it has not admitted, and at
the default 16 nothing ever queues here, so the least-loaded choice would always be the first
node, cache-aware or not: docs/design/cache_routing.md, "Measured").

Per run, from the workers' own load reports (counters since the engine started, read after the
last request, once every worker has reported again): prefill tokens computed (prompt tokens
the prefill nodes' engines were asked for minus those their caches served), hit rates, KV bytes
over the WAN (relay bytes the PrfaaS nodes' senders had acknowledged; PD-P's relay is local and
reported apart), and the client's TTFT (mean and P90). Then the ratios aware/blind, whether the
same request got the same tokens in both runs (``bit_exact``), and the targets of issue 15 on
the multi-turn trace: prefill tokens and WAN bytes <= 0.5x of blind, P90 TTFT lower. Also the
prefix index's lookup time at 128K tokens (``bench/prefix_index.py``'s ``run``). Times on a
shared machine are indicative: compare ``load_average_1m`` with ``cpu_count``; token and byte
counts are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = str(Path(__file__).resolve().parent)  # bench/ is not a package
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import _prefix_traces as traces  # noqa: E402
import prefix_index  # noqa: E402

from trtllm_prfaas.router.orchestrator import RouterConfig  # noqa: E402
from trtllm_prfaas.telemetry.logging import configure_logging  # noqa: E402
from trtllm_prfaas.testbed.spec import TestbedConfig  # noqa: E402
from trtllm_prfaas.testbed.up import Testbed  # noqa: E402
from trtllm_prfaas.vocabulary import Role  # noqa: E402

REPORT_WAIT_S = 10.0  # every worker reports every 0.1 s: this is a deadline, not a pause
TARGET_PREFILL_RATIO = 0.5
TARGET_WAN_RATIO = 0.5


@dataclass(frozen=True)
class Settings:
    model_preset: str = "default"
    num_prfaas_prefill: int = 3
    threshold_tokens: int = 1024
    prefill_max_num_seqs: int = 2
    chunk_size: int = 2048  # prefill chunk: a hybrid model snapshots its state at chunk ends
    max_tokens: int = 6
    seed: int = 0
    timeout_s: float = 300.0
    # multi-turn
    num_conversations: int = 16
    num_turns: int = 8
    num_system_prompts: int = 2
    # Not a multiple of chunk_size: a hybrid engine snapshots its state at chunk ends and at a
    # prompt's last full block only, so conversations cannot share it (only their own history)
    system_tokens: int = 1536
    user_tokens: int = 256
    stagger_s: float = 0.25
    think_s: float = 0.2  # a user reads the answer (longer than the 0.1 s report interval)
    # shared-document
    num_documents: int = 2
    document_tokens: int = 3072
    num_questions: int = 12
    question_tokens: int = 64
    question_rate_rps: float = 3.0
    # the prefix index
    index_tokens: int = 131072
    index_nodes: int = 8
    index_noise_blocks: int = 20_000
    index_repeats: int = 2000


QUICK = Settings(
    model_preset="tiny",
    num_prfaas_prefill=2,
    threshold_tokens=128,
    max_tokens=4,
    chunk_size=128,
    timeout_s=120.0,
    num_conversations=3,
    num_turns=3,
    num_system_prompts=1,
    system_tokens=256,
    user_tokens=48,
    stagger_s=0.1,
    think_s=0.3,
    num_documents=1,
    document_tokens=384,
    num_questions=4,
    question_tokens=32,
    question_rate_rps=4.0,
    index_tokens=8192,
    index_nodes=3,
    index_noise_blocks=100,
    index_repeats=50,
)


class _BenchTestbed(Testbed):
    """The testbed with a fixed threshold and prefill workers that admit few requests at once
    (see the module doc)."""

    def __init__(self, config: TestbedConfig, prefill_max_num_seqs: int) -> None:
        super().__init__(config)
        self.prefill_max_num_seqs = prefill_max_num_seqs

    def _worker_specs(self) -> dict[str, list[str]]:
        seqs = ["--max-num-seqs", str(self.prefill_max_num_seqs)]
        return {
            name: [*args, *seqs] if "-prefill-" in name else args
            for name, args in super()._worker_specs().items()
        }

    def _router_config(self) -> RouterConfig:
        return dataclasses.replace(super()._router_config(), control=None)


# ---- one run -----------------------------------------------------------------------------------


def run_once(
    s: Settings, trace: str, is_aware: bool, loop: asyncio.AbstractEventLoop
) -> dict[str, Any]:
    """One trace on fresh workers: the client's outcomes and what the workers counted during
    it (their counters after it less those before: a worker's start-up runs a request too)."""
    config = TestbedConfig(
        model_preset=s.model_preset,
        num_prfaas_prefill=s.num_prfaas_prefill,
        num_pd_prefill=1,
        num_pd_decode=2,
        grpc_port=0,
        metrics_port=0,
        threshold_tokens=s.threshold_tokens,
        chunk_size=s.chunk_size,
        enable_block_reuse=True,
        prefix_routing=is_aware,
    )
    with _BenchTestbed(config, s.prefill_max_num_seqs) as testbed:
        assert testbed.router is not None
        started = time.monotonic()
        before = _worker_counters(testbed, after=started)
        outcomes = loop.run_until_complete(_play(s, trace, testbed.router.address))
        wall_s = time.monotonic() - started
        after = _worker_counters(testbed, after=time.monotonic())
        workers = {name: _less(counts, before[name]) for name, counts in after.items()}
        orchestrator = testbed.router.orchestrator
        decisions = list(orchestrator.decisions)
        counters = dict(orchestrator.counters)
    return {
        "outcomes": outcomes,
        "workers": workers,
        "counters": counters,
        "prefill_nodes": _count(d.prefill_node_id for d in decisions),
        "decode_nodes": _count(str(d.decode_node_id) for d in decisions),
        "routed_prefix_tokens": sum(d.prefix_tokens for d in decisions),
        "wall_s": wall_s,
    }


async def _play(s: Settings, trace: str, address: str) -> list[traces.Outcome]:
    if trace == "multi_turn":
        conversations = traces.multi_turn_trace(
            s.seed, s.num_conversations, s.num_turns, s.num_system_prompts, s.system_tokens,
            s.user_tokens, s.stagger_s, s.think_s,
        )  # fmt: skip
        return await traces.play_conversations(
            address, conversations, s.max_tokens, s.seed, s.timeout_s
        )
    questions = traces.shared_document_trace(
        s.seed, s.num_documents, s.document_tokens, s.num_questions, s.question_tokens,
        s.question_rate_rps,
    )  # fmt: skip
    return await traces.play_questions(address, questions, s.max_tokens, s.seed, s.timeout_s)


def _worker_counters(testbed: Testbed, after: float) -> dict[str, dict[str, Any]]:
    """Each worker's last load report, once every worker has reported after ``after``."""
    assert testbed.router is not None
    workers = testbed.router.orchestrator.cluster.workers
    deadline = time.monotonic() + REPORT_WAIT_S
    while any(w.reported_at <= after or w.report is None for w in workers.values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every worker reported within {REPORT_WAIT_S} s")
        time.sleep(0.05)
    out = {}
    for name, w in workers.items():
        r = w.report
        assert r is not None
        out[name] = {
            "role": str(w.info.role),
            "is_prfaas": w.is_prfaas,
            "query_tokens": r.num_prefix_query_tokens,
            "reused_tokens": r.num_prefix_reused_tokens,
            "relay_bytes_sent": r.relay_bytes_sent,
            "evictions": r.num_block_evictions,
        }
    return out


def _less(counts: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: v - before[k] if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in counts.items()}  # fmt: skip


def _count(names: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# ---- figures -----------------------------------------------------------------------------------


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    outcomes: list[traces.Outcome] = result["outcomes"]
    ttfts = [o.ttft_s * 1000 for o in outcomes if o.ttft_s is not None and not o.error]
    workers = result["workers"].values()
    prefill = [w for w in workers if w["role"] == Role.PREFILL]
    decode = [w for w in workers if w["role"] == Role.DECODE]
    asked = sum(w["query_tokens"] for w in prefill)
    reused = sum(w["reused_tokens"] for w in prefill)
    decode_asked = sum(w["query_tokens"] for w in decode)
    decode_reused = sum(w["reused_tokens"] for w in decode)
    return {
        "num_requests": len(outcomes),
        "num_failed": sum(1 for o in outcomes if o.error),
        "errors": sorted({o.error for o in outcomes if o.error})[:3],
        "ttft_mean_ms": round(float(np.mean(ttfts)), 1) if ttfts else None,
        "ttft_p90_ms": round(float(np.percentile(ttfts, 90)), 1) if ttfts else None,
        "prompt_tokens": sum(o.num_prompt_tokens for o in outcomes),
        "prefill_tokens_computed": asked - reused,
        "prefill_tokens_reused": reused,
        "prefill_hit_rate": round(reused / asked, 4) if asked else 0.0,
        "decode_reused_tokens": decode_reused,
        "decode_hit_rate": round(decode_reused / decode_asked, 4) if decode_asked else 0.0,
        "wan_bytes": sum(w["relay_bytes_sent"] for w in prefill if w["is_prfaas"]),
        "local_relay_bytes": sum(w["relay_bytes_sent"] for w in prefill if not w["is_prfaas"]),
        "evictions": sum(w["evictions"] for w in workers),
        "router_prefix_tokens": result["routed_prefix_tokens"],
        "prefill_nodes": result["prefill_nodes"],
        "decode_nodes": result["decode_nodes"],
        "fallbacks": {k: result["counters"][k] for k in ("prefill_fallback", "relay_recomputed")},
        "per_worker": {name: _per_worker(w) for name, w in result["workers"].items()},
        "wall_s": round(result["wall_s"], 1),
    }


def _per_worker(w: dict[str, Any]) -> dict[str, int]:
    reused = w["reused_tokens"]
    return {"computed": w["query_tokens"] - reused, "reused": reused,
            "relay_bytes": w["relay_bytes_sent"]}  # fmt: skip


def _ratio(aware: float | None, blind: float | None) -> float | None:
    if aware is None or blind is None or blind == 0:
        return None
    return round(aware / blind, 4)


def compare(aware: dict[str, Any], blind: dict[str, Any]) -> dict[str, Any]:
    """The two runs of one trace side by side: ratios and bit-exactness."""
    a, b = summarize(aware), summarize(blind)
    tokens_a = {o.key: o.token_ids for o in aware["outcomes"] if not o.error}
    tokens_b = {o.key: o.token_ids for o in blind["outcomes"] if not o.error}
    both = sorted(tokens_a.keys() & tokens_b.keys())
    mismatched = [list(k) for k in both if tokens_a[k] != tokens_b[k]]
    metrics = ("prefill_tokens_computed", "wan_bytes", "ttft_mean_ms", "ttft_p90_ms")
    return {
        "aware": a,
        "blind": b,
        "ratios": {name: _ratio(a[name], b[name]) for name in metrics},
        "num_compared": len(both),
        "mismatched": mismatched,
        "bit_exact": bool(both) and not mismatched and a["num_failed"] == b["num_failed"] == 0,
    }


def targets(multi_turn: dict[str, Any]) -> dict[str, bool]:
    ratios = multi_turn["ratios"]
    return {
        "prefill_tokens_le_half": (ratios["prefill_tokens_computed"] or 1.0)
        <= TARGET_PREFILL_RATIO,
        "wan_bytes_le_half": (ratios["wan_bytes"] or 1.0) <= TARGET_WAN_RATIO,
        "p90_ttft_lower": (ratios["ttft_p90_ms"] or 1.0) < 1.0,
    }


def run(s: Settings) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"settings": dataclasses.asdict(s), "cpu_count": os.cpu_count()}
    loop = asyncio.new_event_loop()  # one loop for every run (grpc.aio binds to its first)
    try:
        for trace in ("multi_turn", "shared_document"):
            aware = run_once(s, trace, True, loop)
            blind = run_once(s, trace, False, loop)
            result[trace] = compare(aware, blind)
    finally:
        loop.close()
    result["targets_multi_turn"] = targets(result["multi_turn"])
    index = prefix_index.run(s.index_tokens, s.index_nodes, s.index_noise_blocks, s.index_repeats)
    result["index_lookup"] = {
        k: index[k]
        for k in ("num_tokens", "best_in_cluster_exact_us", "best_in_cluster_mixed_us",
                  "best_in_cluster_hybrid_us", "anchor_hash_prompt_us", "lookup_ok")
    }  # fmt: skip
    result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


# ---- output ------------------------------------------------------------------------------------

_ROWS = (
    ("TTFT mean (ms)", "ttft_mean_ms"),
    ("TTFT P90 (ms)", "ttft_p90_ms"),
    ("prompt tokens", "prompt_tokens"),
    ("prefill tokens computed", "prefill_tokens_computed"),
    ("prefill hit rate", "prefill_hit_rate"),
    ("decode hit rate", "decode_hit_rate"),
    ("KV bytes over the WAN", "wan_bytes"),
    ("local relay bytes", "local_relay_bytes"),
    ("failed requests", "num_failed"),
    ("wall (s)", "wall_s"),
)


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for trace in ("multi_turn", "shared_document"):
        t = result[trace]
        lines.append(f"{trace}  (bit-exact aware vs blind: {t['bit_exact']}, "
                     f"{t['num_compared']} requests)")  # fmt: skip
        lines.append(f"  {'':26}{'aware':>14}{'blind':>14}{'aware/blind':>13}")
        for label, key in _ROWS:
            ratio = t["ratios"].get(key)
            shown = "" if ratio is None else f"{ratio:.3f}"
            lines.append(f"  {label:26}{t['aware'][key]!s:>14}{t['blind'][key]!s:>14}{shown:>13}")
        for side in ("aware", "blind"):
            lines.append(f"  {side} prefill nodes {t[side]['prefill_nodes']}, "
                         f"decode nodes {t[side]['decode_nodes']}")  # fmt: skip
    lines.append(f"targets (multi-turn): {result['targets_multi_turn']}")
    index = result["index_lookup"]
    lines.append(
        f"prefix index at {index['num_tokens']} tokens: best_in_cluster "
        f"{index['best_in_cluster_exact_us']} us exact, {index['best_in_cluster_mixed_us']} us "
        f"mixed, {index['best_in_cluster_hybrid_us']} us hybrid (hashing the prompt: "
        f"{index['anchor_hash_prompt_us']} us)"
    )
    lines.append(f"load average 1m before/after: {result['load_average_1m']}, "
                 f"cpus {result['cpu_count']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--quick", action="store_true", help="tiny model, small traces")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threshold-tokens", type=int, default=None)
    parser.add_argument("--prefill-max-num-seqs", type=int, default=None)
    parser.add_argument("--model-preset", default=None)
    parser.add_argument("--system-tokens", type=int, default=None, help="multi-turn system prompt")
    parser.add_argument("--num-turns", type=int, default=None)
    parser.add_argument("--num-conversations", type=int, default=None)
    parser.add_argument("--prfaas-prefill", type=int, default=None, help="PrfaaS prefill nodes")
    parser.add_argument("--think-s", type=float, default=None, help="pause between turns")
    args = parser.parse_args(argv)
    configure_logging("WARNING")  # the router runs in this process: no per-request lines
    s = QUICK if args.quick else Settings()
    overrides = {
        "seed": args.seed,
        "threshold_tokens": args.threshold_tokens,
        "prefill_max_num_seqs": args.prefill_max_num_seqs,
        "model_preset": args.model_preset,
        "system_tokens": args.system_tokens,
        "num_turns": args.num_turns,
        "num_conversations": args.num_conversations,
        "num_prfaas_prefill": args.prfaas_prefill,
        "think_s": args.think_s,
    }
    s = dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})
    result = run(s)
    print(json.dumps(result) if args.json else format_table(result))
    return 0 if result["multi_turn"]["bit_exact"] and result["shared_document"]["bit_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
