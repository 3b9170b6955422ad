"""The embedded testbed's shape, from one YAML file or the built-in default.

Default: a PrfaaS cluster ``dc-remote`` with one prefill worker, and a local PD cluster
``dc-local`` with one PD-P (prefill) and one PD-D (decode) worker, all on loopback with the
reference engine, plus the router (KServe gRPC on 8001, metrics on 8002). Example file::

    threshold_tokens: 1024      # l > t prefills in dc-remote
    link_gbps: 10               # emulate the inter-datacenter link (sender pacing)
    model_preset: default       # or tiny
    clusters: {prfaas_prefill: 1, pd_prefill: 1, pd_decode: 2}
    tokenizer_dir: /models/hf  # serve a Hugging Face tokenizer: the router tokenizes with it
                               # and the reference model takes its vocabulary ("": bytes)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from trtllm_prfaas.config import MODEL_PRESETS, load_yaml
from trtllm_prfaas.errors import ConfigError

__all__ = ["TestbedConfig", "load_testbed_config"]


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest test class, despite the name

    prfaas_cluster: str = "dc-remote"
    local_cluster: str = "dc-local"
    num_prfaas_prefill: int = 1
    num_pd_prefill: int = 1
    num_pd_decode: int = 1
    model_preset: str = "default"
    model_seed: int = 0
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = 8002
    # KServe v2 REST (Triton's 8000). None here: no REST door (tests built from this dataclass
    # bind no fixed HTTP port); ``prfaas up`` serves UP_HTTP_PORT unless --http-port or the YAML
    # file's http_port says otherwise (0: a free port).
    http_port: int | None = None
    # The OpenAI-compatible API (Triton's OpenAI frontend: 9000). As http_port: None here, and
    # ``prfaas up`` serves UP_OPENAI_PORT unless --openai-port or the file's openai_port says.
    openai_port: int | None = None
    threshold_tokens: int = 1024
    link_gbps: float | None = None  # emulated PrfaaS -> local link rate (None: unpaced)
    curve: bool = True  # encrypt and authenticate the KV relay and the control plane
    num_streams: int = 4
    chunk_size: int = 2048
    num_blocks: int = 2048
    fallback: str = "recompute"
    num_threads: int = 1  # torch threads per worker: 3+ workers share these 2 cores
    tokenizer_dir: str = ""  # a Hugging Face model directory; "": the reference byte tokenizer
    # Workers keep prefix caches (block reuse) and publish their KV cache events: the router
    # routes cache-aware (docs/design/prefix_cache.md). Off: as TensorRT-LLM ships hybrid models.
    enable_block_reuse: bool = False
    # The router routes by the prefixes workers hold. False: cache-blind (their caches stay on),
    # the baseline bench/prefix.py measures cache-aware routing against.
    prefix_routing: bool = True

    def __post_init__(self) -> None:
        if self.model_preset not in MODEL_PRESETS:
            raise ConfigError(f"model_preset {self.model_preset!r}: one of {sorted(MODEL_PRESETS)}")
        if min(self.num_prfaas_prefill + self.num_pd_prefill, self.num_pd_decode) < 1:
            raise ConfigError("the testbed needs a decode worker and at least one prefill worker")
        if self.link_gbps is not None and self.link_gbps <= 0:
            raise ConfigError("link_gbps must be > 0")
        if not isinstance(self.prefix_routing, bool):
            raise ConfigError(f"prefix_routing {self.prefix_routing!r}: true or false")

    def worker_args(self) -> dict[str, list[str]]:
        """``prfaas worker`` arguments by worker name (without security flags)."""
        common = [
            "--model-preset",
            self.model_preset,
            "--model-seed",
            str(self.model_seed),
            "--num-streams",
            str(self.num_streams),
            "--chunk-size",
            str(self.chunk_size),
            "--num-blocks",
            str(self.num_blocks),
            "--fallback",
            self.fallback,
            "--num-threads",
            str(self.num_threads),
        ]
        if self.tokenizer_dir:
            common += ["--tokenizer", self.tokenizer_dir]
        if self.enable_block_reuse:
            common.append("--enable-block-reuse")
        pacing = ["--link-gbps", str(self.link_gbps)] if self.link_gbps else []
        specs: dict[str, list[str]] = {}
        for i in range(self.num_pd_decode):
            specs[f"{self.local_cluster}-decode-{i}"] = [
                "--role",
                "decode",
                "--cluster",
                self.local_cluster,
                *common,
            ]
        for i in range(self.num_pd_prefill):
            specs[f"{self.local_cluster}-prefill-{i}"] = [
                "--role",
                "prefill",
                "--cluster",
                self.local_cluster,
                *common,
            ]
        for i in range(self.num_prfaas_prefill):
            specs[f"{self.prfaas_cluster}-prefill-{i}"] = [
                "--role",
                "prefill",
                "--cluster",
                self.prfaas_cluster,
                *common,
                *pacing,
            ]
        return specs


_CLUSTER_KEYS = {
    "prfaas_prefill": "num_prfaas_prefill",
    "pd_prefill": "num_pd_prefill",
    "pd_decode": "num_pd_decode",
}


def load_testbed_config(path: Path | None, **overrides: Any) -> TestbedConfig:
    """The default config, updated from ``path`` (YAML) and then ``overrides`` (CLI flags)."""
    data = load_yaml(path) if path is not None else {}
    flat = dict(data)
    for key, value in dict(flat.pop("clusters", {}) or {}).items():
        if key not in _CLUSTER_KEYS:
            raise ConfigError(f"{path}: clusters.{key} is unknown; use {sorted(_CLUSTER_KEYS)}")
        flat[_CLUSTER_KEYS[key]] = value
    known = {f.name for f in fields(TestbedConfig)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}")
    flat.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TestbedConfig(**flat)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
