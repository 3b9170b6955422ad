"""The simulated tensor-parallel ranks: the fake ``tensorrt_llm._utils``, the MPI collectives,
and each rank's connector-manager state.

``tensorrt_llm._utils.mpi_rank()`` (what the connector reads its rank from) is a fake module here
whose value is the simulated rank of the call in progress (a context variable); a connector thread
calling it raises, as the fake cannot tell which simulated rank a background thread serves.
``mpi_broadcast`` (and the allgather of ``get_finished``) is a pickle round trip per rank. The
``TRTLLM_PRFAAS_*`` environment given to the executor is set while its halves are built
(``environment``).

Upstream behind it: ``tensorrt_llm/_utils.py`` ``mpi_rank`` (the rank a connector half reads);
``py_executor.py`` ``KvCacheConnectorManager`` / ``_kv_connector_start_batch`` (the leader's meta
``mpi_broadcast`` to every rank, ``get_finished`` results gathered; stored copies 736889464,
3542389387, cited in ``connector_manager``); ``tensorrt_llm/llmapi/mpi_session.py``
``MpiPoolSession._start_mpi_pool`` (stored copy 57451790670: only ``TRTLLM*``/``TLLM*``
variables reach spawned workers, hence configuration by ``TRTLLM_PRFAAS_*`` only).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tests.connector.trtllm_fake.requests import FakeLlmRequest

_RANK: contextvars.ContextVar[int] = contextvars.ContextVar("fake_mpi_rank")


@contextlib.contextmanager
def as_rank(rank: int) -> Iterator[None]:
    token = _RANK.set(rank)
    try:
        yield
    finally:
        _RANK.reset(token)


def _mpi_rank() -> int:
    try:
        return _RANK.get()
    except LookupError:
        raise RuntimeError(
            "fake tensorrt_llm._utils.mpi_rank() called outside a simulated rank's call (from a "
            "connector thread?): read the rank when the half is constructed"
        ) from None


_installed: list[int] = [0]  # how many live executors need the fake tensorrt_llm modules


def install_fake_tensorrt_llm(world_size: int) -> None:
    if _installed[0] == 0:
        if "tensorrt_llm" in sys.modules:
            raise RuntimeError("a real tensorrt_llm is loaded: the fake executor cannot run")
        package, utils = types.ModuleType("tensorrt_llm"), types.ModuleType("tensorrt_llm._utils")
        package.__path__ = []  # a package, so `import tensorrt_llm._utils` works
        for module in (package, utils):
            module.mpi_rank = _mpi_rank  # type: ignore[attr-defined]
            module.mpi_world_size = lambda: world_size  # type: ignore[attr-defined]
        package._utils = utils  # type: ignore[attr-defined]
        sys.modules["tensorrt_llm"], sys.modules["tensorrt_llm._utils"] = package, utils
    _installed[0] += 1


def uninstall_fake_tensorrt_llm() -> None:
    _installed[0] -= 1
    if _installed[0] == 0:
        sys.modules.pop("tensorrt_llm._utils", None)
        sys.modules.pop("tensorrt_llm", None)


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def broadcast(obj: Any) -> Any:
    """``mpi_broadcast``: what every rank receives is a pickle round trip of the root's object."""
    return pickle.loads(pickle.dumps(obj))


def build_in_rank(rank: int, cls: type, llm_args: Any) -> Any:
    with as_rank(rank):
        return cls(llm_args)


@dataclass
class _Async:
    """``AsyncRequests``: ids being saved / loaded."""

    saving: dict[int, FakeLlmRequest] = field(default_factory=dict)
    loading: dict[int, FakeLlmRequest] = field(default_factory=dict)

    def move_to(self, other: _Async) -> None:
        other.saving.update(self.saving)
        other.loading.update(self.loading)
        self.saving, self.loading = {}, {}

    def extract(self, saving: list[int], loading: list[int]) -> _Async:
        """KeyError for an id that is not here (upstream ``extract_by_id``)."""
        out = _Async()
        for rid in saving:
            out.saving[rid] = self.saving.pop(rid)
        for rid in loading:
            out.loading[rid] = self.loading.pop(rid)
        return out


@dataclass
class Rank:
    """One tensor-parallel rank: its worker half, pool, stream and connector-manager state."""

    rank: int
    worker: Any
    pool: torch.Tensor
    stream: Any
    log: list[str] = field(default_factory=list)  # the connector calls made on this rank
    new: _Async = field(default_factory=_Async)  # not yet passed to get_finished
    pending: _Async = field(default_factory=_Async)  # passed in, not yet returned
    local_done: _Async = field(default_factory=_Async)  # returned here, not yet by all ranks
