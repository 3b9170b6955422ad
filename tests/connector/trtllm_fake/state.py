"""What one deployment's executor loop keeps between iterations.

``FakeExecutor`` is one class built in layers, one module each, every layer calling only the
layers below it: ``ExecutorState`` (here: the fields) <- ``ConnectorManagerSteps``
(``connector_manager``: every call into the connector) <- ``ForwardSteps`` (``forward``: the
forward pass, sampling, responses) <- ``FakeExecutor`` (``executor``: construction, client side,
the loop and its scheduling).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from tests.connector.fake_device import Device
from tests.connector.trtllm_fake.blocks import BlockManager
from tests.connector.trtllm_fake.model import FakeModel
from tests.connector.trtllm_fake.ranks import Rank
from tests.connector.trtllm_fake.requests import FakeLlmRequest, Result


class ExecutorState:
    """The executor's fields: the ones below are set by ``FakeExecutor.__init__``, the rest by
    ``_init_state``."""

    model: FakeModel
    tp_size: int
    chunk_size: int
    overlap: bool  # the overlap scheduler is on
    max_batch_size: int
    device: Device
    llm_args: Any
    blocks: BlockManager
    scheduler: Any  # the connector's scheduler half (rank 0)
    ranks: list[Rank]

    def _init_state(self) -> None:
        self._ids = itertools.count(1)
        self.waiting: list[FakeLlmRequest] = []
        self.active: list[FakeLlmRequest] = []
        self.requests: dict[int, FakeLlmRequest] = {}
        self.results: dict[int, Result] = {}
        self.claims: dict[int, tuple[int, int, bool]] = {}  # rid -> (device match, claimed, async)
        self.computed: dict[int, list[tuple[int, int]]] = {}  # rid -> positions it computed
        self.loaded_snapshots: dict[int, list[torch.Tensor]] = {}  # rid -> per rank blocks
        self.parked_at: dict[int, float] = {}  # rid -> when its async load parked it (live)
        self.ever_parked: set[int] = set()  # requests an async load parked at some point
        self.ever_pinned: set[int] = set()  # requests whose save pinned their blocks
        self.errors: list[str] = []
        self.iterations: list[list[list[str]]] = []  # per iteration, per rank: connector calls
        self.dead: BaseException | None = None
        self._finished_loading: set[int] = set()
        self._external_loads: dict[int, int] = {}
        self._reported: dict[int, tuple[int, int]] = {}
        self._seq_tokens: dict[int, int] = {}
        self._kv_len: dict[int, int] = {}
        self._pending_token: dict[int, int] = {}
        self._previous: list[tuple[FakeLlmRequest, int | None]] | None = None
        self._previous_batch: list[FakeLlmRequest] = []
