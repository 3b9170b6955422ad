"""The GPU check's serving side: ``prfaas worker --engine triton`` processes, a router, requests.

Pure part (tested on CPU): ``worker_args`` gives each worker's flags (the test parses them with
the real ``prfaas worker`` parser, so they stay in step with it); ``warm_prefix_prompts`` the
prompts of the warm-prefix check.

Runtime part (GPU only): ``Serving`` starts both workers and an in-process ``RouterService``
whose threshold sends every prompt to the PrfaaS prefill (so each request is relayed), and
closes them (a context manager). ``generate_local`` asks the decode Triton directly (a local
prefill: the baseline), ``generate_relayed`` goes through the router. Both are greedy (no
sampling inputs: TensorRT-LLM's default sampling is greedy) and bounded by a deadline.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtllm_prfaas.deploy.env import DeployRole
from trtllm_prfaas.deploy.gpu_stack import MODEL_NAME, StackPlan
from trtllm_prfaas.errors import DeadlineExceeded, EngineError

__all__ = [
    "RelayCounts",
    "Serving",
    "generate_local",
    "generate_relayed",
    "stream_text",
    "warm_prefix_prompts",
    "worker_args",
]

_CLUSTERS = {DeployRole.PREFILL: "dc-remote", DeployRole.DECODE: "dc-local"}


def worker_args(plan: StackPlan, role: DeployRole) -> list[str]:
    """``prfaas worker`` flags for the worker in front of ``role``'s Triton."""
    layout = plan.layout
    config = plan.repo_configs[role].llm
    args = [
        "--role", role.value,
        "--cluster", _CLUSTERS[role],
        "--engine", "triton",
        "--triton-url", plan.tritons[role].grpc_url,
        "--control", layout.control(role),
        "--triton-max-batch-size", str(config.max_batch_size),
        "--triton-max-seq-len", str(config.max_seq_len),
        "--triton-tokens-per-block", str(config.tokens_per_block),
        "--triton-connect-timeout-s", "60",
        "--tokenizer", str(layout.model),
        "--triton-plan-endpoint", layout.plan_bind(role),
        "--triton-tp-size", str(layout.tensor_parallel_size),
        "--triton-plan-keys", str(layout.key_dir),
    ]  # fmt: skip
    if role is DeployRole.DECODE:
        args += ["--advertise-relay", layout.relay_bind]
    return args


def warm_prefix_prompts(num_facts: int = 40) -> tuple[str, str]:
    """Two prompts sharing a long prefix (hundreds of tokens: several 32-token blocks)."""
    facts = " ".join(f"Fact {i}: {i} squared is {i * i}." for i in range(num_facts))
    return (
        f"{facts}\nQuestion: what is 7 squared?\nAnswer:",
        f"{facts}\nQuestion: what is 12 squared?\nAnswer:",
    )


@dataclass(frozen=True)
class RelayCounts:
    """The router's ``prfaas_relay_outcomes_total`` counters."""

    relayed: float
    recomputed: float


class Serving:
    """Both workers (subprocesses) and the router (this process) of one running ``Stack``."""

    def __init__(self, plan: StackPlan, timeout_s: float) -> None:
        from trtllm_prfaas.router.orchestrator import RouterConfig, WorkerSpec
        from trtllm_prfaas.router.service import RouterService
        from trtllm_prfaas.router.servicer import FrontDoorConfig
        from trtllm_prfaas.testbed.processes import start_workers

        specs = {_CLUSTERS[r] + "-" + r.value: worker_args(plan, r) for r in plan.tritons}
        self.workers = start_workers(specs, timeout_s=timeout_s, log_level="WARNING")
        try:
            router = RouterConfig(
                tuple(
                    WorkerSpec(n, w.control, n.startswith("dc-remote"))
                    for n, w in self.workers.items()
                ),
                threshold_tokens=0,  # every prompt prefills in the PrfaaS cluster: relayed
                control=None,
            )
            door = FrontDoorConfig(host="127.0.0.1", port=plan.layout.router_port)
            self.router = RouterService(router, door, metrics_port=None)
            self.router.start(timeout_s)
        except BaseException:
            self._stop_workers()
            raise
        self.url = f"127.0.0.1:{plan.layout.router_port}"

    def relay_counts(self) -> RelayCounts:
        def value(outcome: str) -> float:
            sample = self.router.registry.get_sample_value(
                "prfaas_relay_outcomes_total", {"outcome": outcome}
            )
            return float(sample or 0.0)

        return RelayCounts(value("relayed"), value("recomputed"))

    def _stop_workers(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    def close(self) -> None:
        try:
            self.router.close()
        finally:
            self._stop_workers()

    def __enter__(self) -> Serving:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bytes_input(name: str, value: str) -> Any:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value.encode("utf-8")], dtype=object))
    return tensor


def _scalar_input(name: str, value: Any, datatype: str, dtype: Any) -> Any:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(np.array([value], dtype=dtype))
    return tensor


def generate_local(plan: StackPlan, prompt: str, max_tokens: int, timeout_s: float) -> str:
    """The decode Triton's own answer (it prefills locally): the baseline of a relayed request.

    The decode model is decoupled, so this uses ModelStreamInfer with ``streaming`` false: one
    response carrying the whole text, then the final flag (upstream llmapi ``model.py``).
    """
    url = plan.tritons[DeployRole.DECODE].grpc_url
    return stream_text(url, prompt, max_tokens, streaming=False, timeout_s=timeout_s)


def stream_text(url: str, prompt: str, max_tokens: int, streaming: bool, timeout_s: float) -> str:
    """``text_output`` of the last response of one ModelStreamInfer request to the ``llmapi``
    model at ``url`` (its text is cumulative, so the last one is the whole answer).

    Raises EngineError with Triton's message when the model answers with an error (for example
    the non-decoupled prefill refusing ``streaming``), DeadlineExceeded after ``timeout_s``.
    """
    import tritonclient.grpc as grpcclient

    inputs = [
        _bytes_input("text_input", prompt),
        _scalar_input("sampling_param_max_tokens", max_tokens, "INT32", np.int32),
        _scalar_input("streaming", streaming, "BOOL", np.bool_),
    ]
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    text = ""
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(MODEL_NAME, inputs, enable_empty_final_response=True)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"{url}: no final response in {timeout_s:g} s")
            try:
                result, error = results.get(timeout=remaining)
            except queue.Empty:
                continue
            if error is not None:
                raise EngineError(f"{url}: {error}")
            output = result.as_numpy("text_output")
            if output is not None and output.size:
                text = output.reshape(-1)[0].decode("utf-8")
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return text
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def generate_relayed(
    url: str, prompt_ids: list[int], max_tokens: int, timeout_s: float
) -> list[int]:
    """Token ids the router returns for ``prompt_ids`` (unary ModelInfer, ``input_ids`` in)."""
    import tritonclient.grpc as grpcclient

    ids = grpcclient.InferInput("input_ids", [len(prompt_ids)], "INT32")
    ids.set_data_from_numpy(np.asarray(prompt_ids, dtype=np.int32))
    inputs = [ids, _scalar_input("sampling_param_max_tokens", max_tokens, "INT32", np.int32)]
    outputs = [grpcclient.InferRequestedOutput("output_ids")]
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(MODEL_NAME, inputs, outputs=outputs, client_timeout=timeout_s)
    finally:
        client.close()
    return [int(t) for t in result.as_numpy("output_ids").reshape(-1)]
