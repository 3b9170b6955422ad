"""Reference-engine benchmark: prefill and decode throughput, and the connector hooks' share.

    python bench/engine.py --json

Prints one JSON line. Absolute speeds depend on the (shared, noisy) machine, so it also prints an
anchor measured in the same run (a float32 GEMM's GFLOP/s) and ratios against it; the targets
are ratios: ``connector_hook_share`` (share of a prefill step spent in KV cache connector hooks,
host-memory connector, must stay < 0.05) and ``prefill_s_16k`` (about 2 s or less).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trtllm_prfaas.connector.host_memory import host_memory_connector
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import RequestState, SamplingParams


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(0, 256, (length,), generator=gen)]


def gemm_anchor_gflops(repeats: int = 20) -> float:
    """GFLOP/s of a 1024^3 float32 GEMM on this machine, now."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 1024**3 * repeats / (time.perf_counter() - start) / 1e9


def prefill_seconds(engine: ReferenceEngine, length: int) -> float:
    """Time to first token of one request of ``length`` prompt tokens (median of 3 for short)."""
    runs = 3 if length <= 4096 else 1
    times = []
    for seed in range(runs):
        start = time.perf_counter()
        engine.generate([_prompt(length, seed)], SamplingParams(max_tokens=1, ignore_eos=True))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def decode_tok_s(engine: ReferenceEngine, batch: int, num_tokens: int = 64) -> float:
    """Decode tokens per second with ``batch`` requests decoding together (prefill excluded)."""
    sampling = SamplingParams(max_tokens=num_tokens, ignore_eos=True)
    ids = [engine.add_request(_prompt(200, seed), sampling) for seed in range(batch)]
    while any(engine.running.get(i) is None or
              engine.running[i].state is not RequestState.GENERATION for i in ids):  # fmt: skip
        engine.step()
    produced, start = 0, time.perf_counter()
    while engine.has_unfinished():
        produced += sum(len(out.new_token_ids) for out in engine.step())
    return produced / (time.perf_counter() - start)


def connector_hook_share(model: ModelConfig, length: int = 4096) -> float:
    """Share of prefill wall time spent inside host-memory connector calls (saving all KV)."""
    pair, _store = host_memory_connector(model, num_blocks=length // model.tokens_per_block + 8)
    engine = ReferenceEngine(EngineConfig(model=model), pair)
    engine.generate([_prompt(64, 99)], SamplingParams(max_tokens=1))  # warm-up
    engine.hook_seconds = 0.0
    start = time.perf_counter()
    engine.generate([_prompt(length, 7)], SamplingParams(max_tokens=1, ignore_eos=True))
    return engine.hook_seconds / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description="reference-engine benchmark")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--quick", action="store_true", help="skip the 16K prefill")
    args = parser.parse_args()
    model = ModelConfig()
    engine = ReferenceEngine(EngineConfig(model=model))
    anchor = gemm_anchor_gflops()
    figures: dict[str, float] = {"anchor_gemm_gflops": round(anchor, 1)}
    for label, length in (("1k", 1024), ("4k", 4096), ("16k", 16384)):
        if args.quick and length > 4096:
            continue
        seconds = prefill_seconds(engine, length)
        figures[f"prefill_s_{label}"] = round(seconds, 3)
        figures[f"prefill_tok_s_{label}"] = round(length / seconds, 1)
    for batch in (1, 8):
        figures[f"decode_tok_s_batch{batch}"] = round(decode_tok_s(engine, batch), 1)
    batch_gain = figures["decode_tok_s_batch8"] / figures["decode_tok_s_batch1"]
    figures["decode_batch8_over_batch1"] = round(batch_gain, 2)
    figures["prefill_tok_s_4k_per_anchor_gflop"] = round(figures["prefill_tok_s_4k"] / anchor, 2)
    figures["connector_hook_share"] = round(connector_hook_share(model), 4)
    result: dict[str, object] = dict(figures)
    result["model"] = f"{model.num_layers} layers {model.layer_pattern} hidden {model.hidden_size}"
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:36} {value}")


if __name__ == "__main__":
    main()
