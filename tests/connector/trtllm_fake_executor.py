"""Where tests import the fake TensorRT-LLM executor from. It lives in the package
``tests/connector/trtllm_fake/``, whose docstring maps its modules and whose modules cite the
upstream file and symbol behind each behaviour."""

from __future__ import annotations

from tests.connector.trtllm_fake import (
    PRFAAS_CONNECTOR,
    ConnectorSpec,
    FakeExecutor,
    FakeModel,
    RequestData,
    SchedulerOutput,
    State,
    TllmCheckError,
    drive,
    kv_rows,
    next_token,
    shard,
)
from tests.connector.trtllm_fake.blocks import BlockManager
from tests.connector.trtllm_fake.ranks import Rank
from tests.connector.trtllm_fake.requests import CppRequestView, FakeLlmRequest, Result

__all__ = [
    "PRFAAS_CONNECTOR",
    "BlockManager",
    "ConnectorSpec",
    "CppRequestView",
    "FakeExecutor",
    "FakeLlmRequest",
    "FakeModel",
    "Rank",
    "RequestData",
    "Result",
    "SchedulerOutput",
    "State",
    "TllmCheckError",
    "drive",
    "kv_rows",
    "next_token",
    "shard",
]
