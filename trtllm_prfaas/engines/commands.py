"""``prfaas demo`` and ``prfaas generate``: the reference engine from the command line.

The demo runs real work and checks it: a batch of prompts through chunked prefill and batched
decode, the same prompts one at a time (tokens must match bit for bit), and a second pass through
the host-memory KV cache connector that reuses the saved KV and computes only each prompt's last
token (tokens must match again). It prints a report and exits non-zero if anything differs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from trtllm_prfaas.connector.host_memory import host_memory_connector
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import SamplingParams

__all__ = ["add_arguments", "run"]

DEMO_PROMPTS = (
    "Prefill-as-a-Service moves long prefills to a remote cluster. ",
    "The KV cache streams layer by layer over several TCP connections to the decode cluster, "
    "which also prefills short prompts itself, so both clusters stay busy. " * 6,
    "Hybrid models keep a fixed-size recurrent state per request. " * 20,
)


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    if command == "generate":
        parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--model-seed", type=int, default=0, help="weight seed")
    parser.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (tokens)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def run(command: str, args: argparse.Namespace) -> int:
    model = ModelConfig(seed=args.model_seed, dtype=args.dtype)
    config = EngineConfig(model=model, num_blocks=1024, chunk_size=args.chunk_size)
    sampling = SamplingParams(args.max_tokens, args.temperature, args.seed, ignore_eos=True)
    if command == "generate":
        return _generate(config, args.prompt, sampling)
    return _demo(config, sampling)


def _generate(config: EngineConfig, prompt: str, sampling: SamplingParams) -> int:
    engine = ReferenceEngine(config)
    ids = engine.tokenizer.encode(prompt)
    start = time.perf_counter()
    tokens = engine.generate([ids], sampling)[0]
    elapsed = time.perf_counter() - start
    print(f"prompt: {len(ids)} tokens; generated {len(tokens)} tokens in {elapsed:.2f}s")
    print(f"token ids: {tokens}")
    print(f"text: {engine.tokenizer.decode(tokens)!r}")
    return 0


def _demo(config: EngineConfig, sampling: SamplingParams) -> int:
    model = config.model
    connector, store = host_memory_connector(model, num_blocks=512, num_states=64)
    engine = ReferenceEngine(config, connector)
    prompts = [engine.tokenizer.encode(p) for p in DEMO_PROMPTS]
    print(
        f"reference engine: {model.num_layers} layers ({model.layer_pattern} pattern), "
        f"hidden {model.hidden_size}, {model.dtype}, chunk {config.chunk_size} tokens"
    )
    print(f"prompts: {[len(p) for p in prompts]} tokens")

    batched, t_batched = _timed(engine, prompts, sampling)
    print(f"[1/3] batched run, KV saved to host memory: {t_batched:.2f}s")
    one_engine = ReferenceEngine(replace(config, chunk_size=config.model.tokens_per_block * 64))
    single = [one_engine.generate([p], sampling)[0] for p in prompts]
    print(f"[2/3] one at a time, unchunked, no connector: identical={single == batched}")
    reused, t_reused = _timed(engine, prompts, sampling)
    matched = store.pool.stats()
    print(
        f"[3/3] rerun through the host-memory connector: {t_reused:.2f}s, "
        f"identical={reused == batched}, cached blocks={matched.num_cached_unreferenced}"
    )
    for prompt, tokens in zip(DEMO_PROMPTS, batched, strict=True):
        print(f"  {prompt[:40]!r:44} -> {tokens[:12]}")
    leaks = engine.leak_report() + one_engine.leak_report()
    store.pool.assert_no_leaks()
    ok = single == batched and reused == batched and not leaks
    print("demo " + ("passed" if ok else f"FAILED {leaks}"))
    return 0 if ok else 1


def _timed(
    engine: ReferenceEngine, prompts: list[list[int]], sampling: SamplingParams
) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    tokens = engine.generate(prompts, sampling)
    return tokens, time.perf_counter() - start
