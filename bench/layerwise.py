"""Layer-wise pipelining: how much KV transfer is left exposed after a prefill ends.

    python bench/layerwise.py --json

Two reference engines in one process (the reference model with 8 KV heads, so that the KV is
big enough to time), over the real relay on loopback (a link faster than the engine produces
KV). The prefill engine exports with the PrfaaS connector; the
decode engine claims the transfer and loads it layer by layer on its loader thread.

- ``exposed_s``: from the end of the prefill (the forward pass that completes the prompt ends,
  i.e. its ``wait_for_save``) to "decode can start": the transfer whole in the decode node's
  host memory (``arrival_ms``), then the decode request (prompt + t1) admitted and its claimed
  KV copied into the pool (``load_ms``). The decode is submitted only once its transfer is whole
  (loads cannot fail after a claim), so the copy into the pool is not overlapped with the
  transfer: on this CPU engine it is a memcpy of the whole prompt's KV on the same two cores; on
  a GPU it is a host-to-device copy from pinned memory.
- ``bulk_send_s``: the time to send and load the same bytes if they were sent only after the
  prefill ended (the same relay, same item sizes, a consumer copying each layer out).
- ``layerwise_exposed_fraction`` = exposed_s / bulk_send_s; target <= 1/num_layers + 0.05.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from trtllm_prfaas.connector.base import ConnectorPair
from trtllm_prfaas.connector.plans import Plan, tokens_digest
from trtllm_prfaas.connector.prfaas import PrfaasConnectorScheduler, PrfaasConnectorWorker
from trtllm_prfaas.connector.prfaas_runtime import (
    PrfaasConnectorConfig,
    PrfaasRuntime,
    Role,
    transfer_id_for,
)
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import RequestState, SamplingParams
from trtllm_prfaas.kv.hashing import CacheKey
from trtllm_prfaas.telemetry.logging import configure_logging
from trtllm_prfaas.transport import InboundStatus, Kind, RelayConfig, RelaySecurity, RelaySender


def _engine(model: ModelConfig, role: Role) -> tuple[ReferenceEngine, PrfaasRuntime]:
    relay = RelayConfig(security=RelaySecurity.insecure_plaintext())
    runtime = PrfaasRuntime.start(
        PrfaasConnectorConfig(role, relay), CacheKey(model.model_id, "HND", model.dtype, 0)
    )
    args = ReferenceEngine.llm_args_for(model, prfaas_runtime=runtime)
    pair = ConnectorPair(PrfaasConnectorScheduler(args), PrfaasConnectorWorker(args))
    engine = ReferenceEngine(EngineConfig(model=model, num_threads=2), pair, runtime.plans)
    return engine, runtime


def _timed_forwards(engine: ReferenceEngine) -> list[float]:
    """Instrument the prefill connector: note when each forward pass ends (wait_for_save)."""
    assert engine.connector is not None
    worker = engine.connector.worker
    ends: list[float] = []
    wait_for_save = worker.wait_for_save

    def timed(stream: Any) -> None:
        ends.append(time.perf_counter())
        wait_for_save(stream)

    worker.wait_for_save = timed
    return ends


def bench_model(kv_heads: int) -> ModelConfig:
    """The reference model with ``kv_heads`` KV heads (and as many query heads): its KV is large
    enough that sending it takes well over Python's 5 ms thread switch interval."""
    return ModelConfig(num_heads=kv_heads, num_kv_heads=kv_heads)


def measure_exposed(model: ModelConfig, length: int) -> dict[str, float]:
    """Relay one prefill of ``length`` tokens; seconds from prefill end to "decode can start":
    the transfer whole on the decode node, the decode request (prompt + t1) submitted, its
    claimed KV loaded into the pool (as a decode worker does it)."""
    prefill, prefill_rt = _engine(model, Role.PREFILL)
    decode, decode_rt = _engine(model, Role.DECODE)
    receiver = decode_rt.receiver
    assert receiver is not None
    try:
        prompt = [(i * 7919) % 256 for i in range(length)]
        transfer, digest = f"lw{length}", tokens_digest(prompt)
        export = Plan(transfer, length, digest, [decode_rt.receiver_endpoint])
        sampling = SamplingParams(max_tokens=1, ignore_eos=True)
        pid = prefill.add_request(prompt, sampling, plan=export)
        forward_ends = _timed_forwards(prefill)
        t1 = 0
        while not t1:
            for out in prefill.step():
                t1 = out.new_token_ids[0] if out.request_id == pid else t1
        prefill_end = forward_ends[-1]  # the forward pass that completed the prompt
        tid = transfer_id_for(transfer, prompt, decode_rt.key)
        while receiver.status(tid) is not InboundStatus.COMPLETE:
            time.sleep(0.0002)  # the decode worker submits once the transfer is whole
        whole_at = time.perf_counter()
        follow = SamplingParams(max_tokens=2, ignore_eos=True, num_skipped_draws=1)
        did = decode.add_request([*prompt, t1], follow, plan=Plan(transfer, length, digest))
        decode.step()  # admitted: the connector claims the transfer and starts its load
        assert decode.running[did].num_connector_tokens == length, "transfer was not claimed"
        while decode.running[did].state is RequestState.LOADING:
            decode.step()
        exposed = time.perf_counter() - prefill_end
        while prefill.has_unfinished() or decode.has_unfinished():
            prefill.step()
            decode.step()
        return {"exposed_s": exposed, "arrival_s": whole_at - prefill_end}
    finally:
        prefill_rt.close()
        decode_rt.close()


def measure_bulk(model: ModelConfig, length: int) -> float:
    """Seconds to send (and copy out) the same KV only after the prefill ended."""
    spec = model.kv_spec
    num_blocks = -(-length // model.tokens_per_block)
    layer_bytes = num_blocks * spec.block_bytes // model.num_full_layers
    state_bytes = spec.state_bytes // model.num_linear_layers
    items = [
        torch.zeros(layer_bytes if kind.value == "F" else state_bytes, dtype=torch.uint8)
        for kind in model.layer_kinds
    ]
    relay = RelayConfig(security=RelaySecurity.insecure_plaintext())
    runtime = PrfaasRuntime.start(
        PrfaasConnectorConfig(Role.DECODE, relay), CacheKey(model.model_id, "HND", model.dtype, 0)
    )
    receiver = runtime.receiver
    assert receiver is not None
    destination = [torch.empty_like(item) for item in items]
    try:
        with RelaySender(receiver.endpoint, relay) as sender:
            sender.wait_ready(5.0)
            start = time.perf_counter()
            handle = sender.open_transfer("bulk", "bulk", 30.0)
            for layer, item in enumerate(items):
                kind = Kind.FULL_BLOCK if model.layer_kinds[layer].value == "F" else Kind.STATE
                handle.send(kind, layer, (0, num_blocks if kind is Kind.FULL_BLOCK else 0), item)
            handle.finish()
            for layer in range(len(items)):
                for got in receiver.wait_layer("bulk", layer, 30.0):
                    destination[layer].copy_(torch.frombuffer(got.buffer, dtype=torch.uint8))
                receiver.release_layer("bulk", layer)
            elapsed = time.perf_counter() - start
            handle.wait(30.0)
            receiver.release("bulk")
            return elapsed
    finally:
        runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="layer-wise pipelining benchmark")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-heads", type=int, default=8)
    args = parser.parse_args()
    configure_logging("ERROR")
    model = bench_model(args.kv_heads)
    runs = [measure_exposed(model, args.tokens) for _ in range(args.repeats)]
    best = min(runs, key=lambda run: run["exposed_s"])
    exposed = best["exposed_s"]
    bulk = min(measure_bulk(model, args.tokens) for _ in range(args.repeats))
    num_layers = model.num_layers
    result = {
        "layerwise_exposed_fraction": round(exposed / bulk, 4),
        "target_max": round(1 / num_layers + 0.05, 4),
        "exposed_ms": round(exposed * 1000, 2),
        "arrival_ms": round(best["arrival_s"] * 1000, 2),  # prefill end -> transfer whole
        "load_ms": round((exposed - best["arrival_s"]) * 1000, 2),  # submit, claim, copy in
        "bulk_send_ms": round(bulk * 1000, 2),
        "prompt_tokens": args.tokens,
        "num_layers": num_layers,
        "kv_bytes": model.kv_spec.s_kv(args.tokens),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:28} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
