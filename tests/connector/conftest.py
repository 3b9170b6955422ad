"""The ``fake_device`` fixture: the device under the fake executor's pools (``--device``)."""

from __future__ import annotations

import pytest

from tests.connector.fake_device import CpuDevice, Device
from tests.connector.strict_device import CudaDevice, StrictDevice


@pytest.fixture
def fake_device(request: pytest.FixtureRequest) -> Device:
    name = request.config.getoption("--device")
    if name == "strict":
        return StrictDevice()  # type: ignore[return-value]
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
        return CudaDevice()  # type: ignore[return-value]
    return CpuDevice()
