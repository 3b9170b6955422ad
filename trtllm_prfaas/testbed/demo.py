"""``prfaas up --demo``: a real workload through stock tritonclient, checked and reported.

Sends a mix of short prompts (prefilled on the local PD-P node) and long ones (prefilled in the
PrfaaS cluster, KV relayed to the decode node) concurrently on one decoupled gRPC stream, the
way a Triton + TensorRT-LLM client streams. Each answer's token ids are compared with a
single-engine run of the same prompt and seed; the report gives per-request route, TTFT and
tokens, and the relay figures scraped from the router's /metrics.
"""

from __future__ import annotations

import queue
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.engines.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    model_vocabulary,
)
from trtllm_prfaas.errors import EngineError
from trtllm_prfaas.loadgen.prompts import text_of_tokens
from trtllm_prfaas.testbed.spec import TestbedConfig

__all__ = ["DemoResult", "demo_prompts", "run_demo"]

_SENTENCE = (
    "Prefill-as-a-Service moves long prefills to a compute-dense cluster and streams "
    "their KV cache layer by layer over commodity Ethernet. "
)


@dataclass
class DemoResult:
    name: str
    prompt: str
    seed: int
    max_tokens: int
    sent_at: float = 0.0
    first_at: float | None = None
    done_at: float | None = None
    token_ids: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent_at


def demo_prompts(threshold_tokens: int, tokenizer: Tokenizer | None = None) -> list[DemoResult]:
    """Short prompts under the threshold and long ones over it, sized in tokens of ``tokenizer``
    (the served model's; default the reference byte tokenizer: bytes + BOS = tokens)."""
    tokenizer = tokenizer or ByteTokenizer()
    lengths = [
        ("short-1", 60),
        ("short-2", threshold_tokens // 2),
        ("long-1", threshold_tokens * 2),
        ("short-3", max(8, threshold_tokens // 4)),
        ("long-2", threshold_tokens * 4),
        ("long-3", threshold_tokens + 50),
    ]
    results = []
    for i, (name, num_tokens) in enumerate(lengths):
        text = text_of_tokens(tokenizer, _SENTENCE, num_tokens)
        results.append(DemoResult(name, text, seed=100 + i, max_tokens=24))
    return results


def _inputs(result: DemoResult) -> list[Any]:
    import tritonclient.grpc as grpcclient

    def tensor(name: str, datatype: str, value: Any, dtype: Any) -> Any:
        array = np.array([value], dtype=dtype)
        item = grpcclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        return item

    return [
        tensor("text_input", "BYTES", result.prompt.encode(), object),
        tensor("sampling_param_max_tokens", "INT32", result.max_tokens, np.int32),
        tensor("sampling_param_temperature", "FP32", 0.8, np.float32),
        tensor("sampling_param_seed", "UINT64", result.seed, np.uint64),
        tensor("streaming", "BOOL", True, bool),
    ]


def run_demo(address: str, results: list[DemoResult], timeout_s: float = 120.0) -> None:
    """Send every request at once on one stream; fill ``results`` as responses arrive."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    received: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
    client.start_stream(
        callback=lambda result, error: received.put((result, error, time.monotonic()))
    )
    try:
        by_id = {r.name: r for r in results}
        for result in results:
            result.sent_at = time.monotonic()
            client.async_stream_infer("tensorrt_llm", _inputs(result), request_id=result.name)
        _collect(received, by_id, time.monotonic() + timeout_s)
    finally:
        client.stop_stream()
        client.close()


def _collect(
    received: queue.Queue[tuple[Any, Any, float]], by_id: dict[str, DemoResult], deadline: float
) -> None:
    pending = set(by_id)
    while pending:
        try:
            res, err, at = received.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty as exc:
            raise EngineError(f"demo requests {sorted(pending)} got no final answer") from exc
        if err is not None:  # stream errors carry no request id: fail what is pending
            for name in pending:
                by_id[name].error = str(err)
            return
        response = res.get_response()
        result = by_id[response.id]
        ids = [int(t) for t in res.as_numpy("output_ids")]
        if ids and result.first_at is None:
            result.first_at = at
        result.token_ids += ids
        if response.parameters["triton_final_response"].bool_param:
            result.done_at = at
            pending.discard(response.id)


def reference_tokens(config: TestbedConfig, results: list[DemoResult]) -> list[list[int]]:
    """What one engine produces for each prompt and seed: the bit-exact ground truth."""
    vocabulary = model_vocabulary(config.tokenizer_dir)
    model = model_preset(config.model_preset, seed=config.model_seed, **vocabulary)
    engine = ReferenceEngine(EngineConfig(model=model, num_blocks=config.num_blocks))
    tokenizer = load_tokenizer(config.tokenizer_dir)
    out = []
    for result in results:
        sampling = SamplingParams(result.max_tokens, 0.8, result.seed)
        out.append(engine.generate([tokenizer.encode(result.prompt)], sampling)[0])
    return out


def scrape(metrics_url: str) -> dict[str, float]:
    """Sum each prfaas_* sample over its labels (a tiny Prometheus text-format reader)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        body = response.read().decode()
    sums: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("prfaas_") and " " in line:
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            if "{" in name_labels:  # one labelled sample, and its family's sum
                sums[name + "|" + name_labels.split("{", 1)[1]] = float(value)
            sums[name] = sums.get(name, 0.0) + float(value)
    return sums
