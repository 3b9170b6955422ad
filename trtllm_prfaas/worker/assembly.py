"""A worker's config, and how its engine and connector runtime are built for one role (at start
and on a role change).

Both halves of the PrfaaS connector share one :class:`PrfaasRuntime`; a decode-role runtime binds
a relay receiver, a prefill-role runtime opens senders on demand. The relay security (Curve keys
or plaintext) and pacing come from the worker's ``RelayConfig`` unchanged, so a converted worker
keeps the security it was started with.

A worker whose engine is a remote Triton server (``WorkerConfig.triton`` set) has no runtime in
this process: the connector runs inside that Triton (TensorRT-LLM loads it from ``model.yaml``)
and does the relay itself. Such a worker's engine is a :class:`TritonEngine` (text in and out with
the served model's tokenizer, ``TritonEngineConfig.tokenizer_dir``; each request's plan posted to
the connector's plan servers inside Triton, ``plan_endpoints``), and a decode worker advertises
its Triton connector's relay receiver (``advertise_relay``) instead of binding one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from trtllm_prfaas.connector.base import ConnectorPair
from trtllm_prfaas.connector.prfaas import PrfaasConnectorScheduler, PrfaasConnectorWorker
from trtllm_prfaas.connector.prfaas_runtime import PrfaasConnectorConfig, PrfaasRuntime
from trtllm_prfaas.engines.base import Engine
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.triton import TritonEngine, TritonEngineConfig
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.hashing import CacheKey
from trtllm_prfaas.transport import RelayConfig, RelaySecurity
from trtllm_prfaas.vocabulary import Role

__all__ = ["Assembly", "WorkerConfig", "WorkerRole", "assemble", "assemble_triton"]


WorkerRole = Role  # one vocabulary (``vocabulary.Role``): prefill is a PrfaaS-cluster or local
# PD-P node, decode a local PD-D node


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    role: WorkerRole
    cluster: str
    relay: RelayConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    control_endpoint: str = "tcp://127.0.0.1:0"
    relay_endpoint: str = "tcp://127.0.0.1:0"  # decode role: where the relay receiver binds
    transfer_timeout_s: float = 120.0
    load_timeout_s: float = 120.0
    fallback: str = "recompute"  # relayed KV missing or failed: "recompute" locally, or "fail"
    load_report_interval_s: float = 0.1
    idle_poll_s: float = 0.02
    triton: TritonEngineConfig | None = None  # set: the engine is this remote Triton server
    # decode role: the relay receiver as prefill peers reach it (Triton: its connector's; a
    # reference worker's own when it binds a wildcard, tcp://0.0.0.0:7100, behind a DNS name)
    advertise_relay: str = ""
    # The control socket: Curve server keys and the routers allowed (worker/server.py). None:
    # plaintext, logged as a warning when the socket binds (prfaas worker needs --plaintext).
    control_security: RelaySecurity | None = None
    # prefill role: bind a relay receiver too and take cached prefixes moved here from other
    # nodes (``Submit.fills_cache``; issue 15 item 5); its endpoint is in ``WorkerInfo``
    accept_cache_moves: bool = False

    def __post_init__(self) -> None:
        if self.fallback not in ("recompute", "fail"):
            raise ConfigError(f"fallback: 'recompute' or 'fail', not {self.fallback!r}")
        if self.triton is not None and self.role is WorkerRole.DECODE and not self.advertise_relay:
            raise ConfigError(
                "a decode worker over Triton needs advertise_relay: the relay endpoint of "
                "its Triton's connector (TRTLLM_PRFAAS_RELAY_BIND, as prefill nodes reach it)"
            )


@dataclass(frozen=True)
class Assembly:
    """One role's runtime and engine; ``relay_endpoint`` is empty unless the role is decode.

    ``runtime`` is None when the connector runs elsewhere (inside a remote Triton)."""

    runtime: PrfaasRuntime | None
    engine: Engine
    relay_endpoint: str

    def close(self) -> None:
        """Close the runtime (relay sockets) and a remote engine's channel. Idempotent."""
        if self.runtime is not None:
            self.runtime.close()
        if isinstance(self.engine, TritonEngine):
            self.engine.close()


def assemble(
    engine_config: EngineConfig,
    connector_config: PrfaasConnectorConfig,
    fallback: str,
) -> Assembly:
    """Start the runtime (binding a receiver for the decode role), then the engine around it.

    On failure the runtime is closed before the error propagates (nothing is left bound).
    """
    model = engine_config.model
    key = CacheKey(model.model_id, "HND", model.dtype, tp_rank=0)
    runtime = PrfaasRuntime.start(connector_config, key)
    try:
        args = ReferenceEngine.llm_args_for(model, prfaas_runtime=runtime)
        pair = ConnectorPair(PrfaasConnectorScheduler(args), PrfaasConnectorWorker(args))
        config = replace(engine_config, on_load_failure=fallback)
        engine = ReferenceEngine(config, pair, runtime.plans)
    except BaseException:
        runtime.close()
        raise
    relay = runtime.receiver_endpoint if runtime.receiver is not None else ""
    return Assembly(runtime, engine, relay)


def assemble_triton(config: TritonEngineConfig, role: WorkerRole, advertise_relay: str) -> Assembly:
    """Connect to the Triton server (``EngineError`` if it is not ready in time); no runtime."""
    relay = advertise_relay if role is WorkerRole.DECODE else ""
    return Assembly(None, TritonEngine(config), relay)
