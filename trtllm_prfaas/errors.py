"""The project's exception tree.

    PrfaasError
     ├── ConfigError          bad configuration (file, flags, dataclass validation)
     ├── InvalidRequestError  bad input from a client: empty prompt, too long, bad token ids
     ├── ModelNotFound        the request names a model (or version) this server does not serve
     ├── AdmissionRejected    the system cannot take the request now (pool exhausted, no slot)
     │    └── NotReady        the server is not serving yet (or any more)
     ├── EngineError          an engine failed while running a request
     ├── DeadlineExceeded     a request or one of its legs ran past its deadline
     ├── ConnectorError       a KV cache connector broke its contract or failed a transfer
     ├── TransportError       the KV relay failed (peer gone, corrupt chunk, deadline)
     │    ├── TransferTimeout a transfer missed its deadline
     │    └── WorkerLost      a worker's connection died (process killed, host silent)
     └── DependencyMissing    an optional dependency is not installed (says what to install)

Low-level errors (zmq, torch, OS) are translated at one boundary with ``raise ... from exc``.
How each one crosses the wire (its kind name) and which gRPC and HTTP status it ends with is
one table, ``vocabulary.ERROR_KINDS``.
"""

from __future__ import annotations

__all__ = [
    "AdmissionRejected",
    "ConfigError",
    "ConnectorError",
    "DeadlineExceeded",
    "DependencyMissing",
    "EngineError",
    "InvalidRequestError",
    "ModelNotFound",
    "NotReady",
    "PrfaasError",
    "TransferTimeout",
    "TransportError",
    "WorkerLost",
]


class PrfaasError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(PrfaasError):
    """A configuration value is missing, ill-typed or out of range."""


class InvalidRequestError(PrfaasError):
    """A request is malformed; the message names what was wrong."""


class ModelNotFound(PrfaasError):
    """The request names a model (or version) this server does not serve."""


class AdmissionRejected(PrfaasError):
    """The request is valid but cannot be admitted now (no blocks, no slot)."""


class NotReady(AdmissionRejected):
    """The server is not serving yet (or any more): the OpenAI door's 503, not the 429 of a
    full one."""


class EngineError(PrfaasError):
    """An engine failed while running a request."""


class DeadlineExceeded(PrfaasError):
    """A request, or one leg of it, did not finish before its deadline."""


class ConnectorError(PrfaasError):
    """A KV cache connector failed or broke its contract."""


class TransportError(PrfaasError):
    """The KV relay failed: peer unreachable, corrupt chunk, cancelled transfer."""


class TransferTimeout(TransportError):
    """A transfer did not finish before its deadline."""


class WorkerLost(TransportError):
    """A worker's connection died (its process was killed, or its host stopped answering
    heartbeats): the requests it was running cannot finish there."""


class DependencyMissing(PrfaasError):
    """An optional dependency is absent; the message says which ``pip install`` to run."""

    def __init__(self, module: str, pip_hint: str) -> None:
        super().__init__(
            f"optional dependency {module!r} is not installed; run: pip install {pip_hint}"
        )
        self.module = module
        self.pip_hint = pip_hint
