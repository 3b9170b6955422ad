"""``prfaas simulate prefix``: cache-aware against cache-blind routing in the discrete-event model.

The case-study cluster profiles (H200 PrfaaS, H20 PD) and split with modelled per-node prefix
caches (``sim/caches.py``) on two token-level traces (``sim/conversations.py``): multi-turn
conversations (shared system prompts, histories that grow each turn) and shared documents (many
questions over a few long documents). Routers on the same trace (same seed):

- ``no_cache``: no prefix caches at all (every prompt computed whole);
- ``blind``: caches on, the router blind to them (every prefix counts 0 in routing; the node
  that prefills still reuses what it holds), the live ``prefix_routing: false``;
- ``aware_prompt_t``: the router sees every node's prefix through the index fed by the caches'
  events, with ``t`` solved for the prompt lengths (as the blind router's);
- ``aware``: the same with ``t`` solved for the incremental lengths it routes (those of the
  ``aware_prompt_t`` run): routing compares the incremental length with ``t``, so ``t`` must be
  solved on that distribution (the live control loop's profiles take the incremental length);
- ``aware_longest_prefix``: ``aware`` with the node choice of before 2026-12-06, the longest
  prefix however loaded (``DesConfig.prefix_weight`` huge): the hotspot a shared prefix makes.

Each ``t`` is the fixed-split optimum (``solve_fixed_split``) for a histogram of the lengths.

Printed per trace and router: prefill tokens computed (and over ``blind``), mean and P90 TTFT,
the reuse ratio, the offload share, cache moves and evicted blocks. The decode tier is a pool
of slots in the DES, so a remote request's KV crosses the link whole (the decode nodes' own
caches are not modelled).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace

import numpy as np

from trtllm_prfaas.policy.controller import CachePolicy
from trtllm_prfaas.policy.model import Deployment, Workload
from trtllm_prfaas.policy.profile import SystemProfile
from trtllm_prfaas.policy.solver import solve_fixed_split
from trtllm_prfaas.policy.workload import HistogramLengths
from trtllm_prfaas.sim.caches import CacheModel
from trtllm_prfaas.sim.conversations import ConversationModel, make_conversations, shared_documents
from trtllm_prfaas.sim.des import DesConfig, DesResult, simulate
from trtllm_prfaas.sim.fluid import case_study_system
from trtllm_prfaas.sim.link import LinkSchedule
from trtllm_prfaas.sim.traffic import Trace

__all__ = ["add_prefix_arguments", "prefix_figures", "run_prefix"]

ROUTERS = ("no_cache", "blind", "aware_prompt_t", "aware", "aware_longest_prefix")


def add_prefix_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``prfaas simulate prefix``."""
    p.add_argument("--conversations", type=int, default=400, help="multi-turn conversations")
    p.add_argument("--rate", type=float, default=0.1, help="conversation starts per second")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=8192, help="shared system prompt")
    p.add_argument("--user-tokens", type=int, default=6000, help="mean user message")
    p.add_argument("--output-tokens", type=int, default=500)
    p.add_argument("--questions", type=int, default=1500, help="shared-document questions")
    p.add_argument("--question-rate", type=float, default=1.0, help="questions per second")
    p.add_argument("--split", default="4,3,5", help="N_prfaas,N_p,N_d")
    p.add_argument("--cache-tokens", type=int, default=1 << 20, help="prefix cache per node")
    p.add_argument("--policy", choices=[c.value for c in CachePolicy], default="scarce")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def _row(result: DesResult, trace: Trace, blind_tokens: float | None, t: float) -> dict[str, float]:
    computed = float(result.computed_tokens.sum())
    ids = result.prefill_node_ids
    return {
        "threshold_tokens": round(t, 1),
        "prefill_tokens": computed,
        "prefill_tokens_vs_blind": round(computed / blind_tokens, 4) if blind_tokens else 1.0,
        "reused_share": round(float(result.prefix_tokens.sum() / trace.prompt_tokens.sum()), 4),
        "mean_ttft_s": round(float(np.mean(result.ttft_s)), 4),
        "p90_ttft_s": round(float(np.percentile(result.ttft_s, 90)), 4),
        "offload_share": round(float(np.mean(result.is_remote)), 4),
        "busiest_node_share": round(max(Counter(ids).values()) / len(ids), 4) if ids else 0.0,
        "num_cache_moves": float(result.num_cache_moves),
    }


def _solved(system: SystemProfile, base: DesConfig, lengths: np.ndarray) -> DesConfig:
    """``base`` with its workload and ``t`` for these prefill lengths (a histogram)."""
    hist = HistogramLengths.from_samples(lengths, 1.0, float(lengths.max()) + 1.0)
    workload = Workload(hist, base.workload.output_tokens)
    t = solve_fixed_split(system, workload, base.deployment).threshold_tokens
    return replace(base, workload=workload, threshold_tokens=t)


def _runs(base: DesConfig, caches: CacheModel, trace: Trace) -> dict[str, dict[str, float]]:
    prompt_t = _solved(base.system, base, trace.prompt_tokens)
    configs = {
        "no_cache": prompt_t,
        "blind": replace(prompt_t, caches=caches, cache_blind=True),
        "aware_prompt_t": replace(prompt_t, caches=caches),
    }
    results = {name: simulate(config, trace) for name, config in configs.items()}
    computed = results["aware_prompt_t"].computed_tokens
    configs["aware"] = replace(_solved(base.system, base, computed), caches=caches)
    configs["aware_longest_prefix"] = replace(configs["aware"], prefix_weight=1e9)
    for name in ("aware", "aware_longest_prefix"):
        results[name] = simulate(configs[name], trace)
    blind = float(results["blind"].computed_tokens.sum())
    return {
        name: _row(results[name], trace, blind, configs[name].threshold_tokens) for name in ROUTERS
    }


def prefix_figures(args: argparse.Namespace) -> dict[str, object]:
    """The figures for both traces (see the module doc)."""
    system = case_study_system()
    n_prfaas, n_p, n_d = (int(x) for x in args.split.split(","))
    caches = CacheModel(max_blocks=args.cache_tokens // 32, tokens_per_block=32)
    chat = ConversationModel(
        args.conversations, args.rate, num_turns=args.turns,
        system_prompt_tokens=args.system_tokens, user_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
    )  # fmt: skip
    docs = shared_documents(args.questions, args.question_rate)
    traces = {
        "multi_turn": (make_conversations(chat, args.seed).trace(32), chat.output_tokens),
        "shared_documents": (make_conversations(docs, args.seed).trace(32), docs.output_tokens),
    }
    out: dict[str, object] = {
        "split": args.split,
        "cache_tokens_per_node": args.cache_tokens,
        "cache_policy": args.policy,
    }
    for name, (trace, output_tokens) in traces.items():
        base = DesConfig(
            system,
            Workload(HistogramLengths((1.0, 2.0), (1.0,)), max(output_tokens, 1)),
            Deployment(n_prfaas, n_p, n_d),
            LinkSchedule.constant(system.link_gbps),
            0.0,
            cache_policy=CachePolicy(args.policy),
        )  # fmt: skip  (workload and t are solved per router in _runs)
        out[name] = {
            "num_requests": trace.num_requests,
            "prompt_tokens": int(trace.prompt_tokens.sum()),
            **_runs(base, caches, trace),
        }
    return out


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def run_prefix(args: argparse.Namespace) -> int:
    """Print the figures (one JSON line with ``--json``)."""
    out = prefix_figures(args)
    if args.json:
        print(json.dumps(out))
        return 0
    for key, value in out.items():
        if not isinstance(value, dict):
            print(f"{key:<24}{value}")
            continue
        print(f"\n{key}: {value['num_requests']} requests, {value['prompt_tokens']} prompt tokens")
        cols = list(value["aware"])
        widths = [max(len(c), 10) + 2 for c in cols]
        print(f"{'router':<22}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
        for router in ROUTERS:
            row = value[router]
            cells = "".join(f"{_fmt(row[c]):>{w}}" for c, w in zip(cols, widths, strict=True))
            print(f"{router:<22}{cells}")
    return 0
