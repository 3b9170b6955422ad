"""A fake TensorRT-LLM 1.2 PyTorch executor that drives a KV cache connector as upstream does.

Written from a reading of upstream's source (no code copied; ids are stored copies readable with
the ``read_file`` tool, commits where known). Each module's docstring names the file and symbol
behind each of its behaviours.

Modules, one concept each (an iteration runs schedule, ``prepare_resources``, start batch,
forward, sampling and responses, ``get_finished``):
  ``model``              the fake dense model: deterministic KV (``kv_rows``, ``shard``) and its
                         greedy ``next_token``
  ``requests``           the request views the connector sees (C++ and Python), upstream's
                         ``RequestData``/``SchedulerOutput``, the client's ``Result``
  ``blocks``             the block manager with reuse and the prefix match; ``TllmCheckError``
  ``ranks``              the fake ``tensorrt_llm._utils`` (simulated MPI rank), broadcast, each
                         rank's connector-manager state
  ``state``              the fields the loop keeps between iterations
  ``connector_manager``  the connector calls of ``prepare_resources``, start batch, ``get_finished``
  ``forward``            the forward pass writing KV on every rank, sampling, responses
  ``executor``           ``FakeExecutor``: construction, client side, the plain and overlap loops,
                         scheduling; ``drive``

Only upstream's hooks are called: no ``register_recurrent_states``, ``get_failed_loads``,
``cancel_*``; ``llm_args`` has no ``connector_options``.

Versions: the stored copies span several upstream versions, some without a commit. Where they
differ the fake keeps what they share (a saving request's blocks: ``forward``; the prepopulated
check: ``connector_manager``).

Not modelled: eviction order beyond "never-stored blocks first, then least recently freed",
token budgets across requests, beam > 1, speculative decoding, pipeline parallelism, and a
connector thread calling ``mpi_rank()`` (it raises: the fake cannot tell which simulated rank a
background thread serves).
"""

from __future__ import annotations

from tests.connector.trtllm_fake.blocks import TllmCheckError
from tests.connector.trtllm_fake.executor import (
    PRFAAS_CONNECTOR,
    ConnectorSpec,
    FakeExecutor,
    drive,
)
from tests.connector.trtllm_fake.model import FakeModel, kv_rows, next_token, shard
from tests.connector.trtllm_fake.requests import RequestData, SchedulerOutput, State

__all__ = [
    "PRFAAS_CONNECTOR",
    "ConnectorSpec",
    "FakeExecutor",
    "FakeModel",
    "RequestData",
    "SchedulerOutput",
    "State",
    "TllmCheckError",
    "drive",
    "kv_rows",
    "next_token",
    "shard",
]
