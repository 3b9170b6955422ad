"""NvmlSampler: a fake pynvml (injected through sys.modules) for the GPU path; the real library
(no GPU on CI machines) for the no-GPU path."""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from trtllm_prfaas.telemetry import nvml as nvml_module
from trtllm_prfaas.telemetry.nvml import NvmlSampler


class FakeNVMLError(Exception):
    def __init__(self, value: int = 999) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNotSupported(FakeNVMLError):
    pass


@dataclass
class FakeGpu:
    util_percent: int = 50
    used: int = 10 << 30
    total: int = 80 << 30
    milliwatts: int = 350_000
    pcie_kb: tuple[int, int] = (1000, 2000)
    nvlink_kib: list[int] = field(default_factory=lambda: [0, 0])
    has_power: bool = True


def fake_pynvml(gpus: list[FakeGpu], calls: list[str]) -> types.ModuleType:
    """A pynvml stand-in with the names NvmlSampler uses."""
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    m.NVML_SUCCESS = 0  # type: ignore[attr-defined]
    m.NVML_PCIE_UTIL_TX_BYTES, m.NVML_PCIE_UTIL_RX_BYTES = 0, 1  # type: ignore[attr-defined]
    m.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138  # type: ignore[attr-defined]
    m.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139  # type: ignore[attr-defined]

    def power(h: FakeGpu) -> int:
        if not h.has_power:
            raise FakeNotSupported(3)
        return h.milliwatts

    def fields(h: FakeGpu, ids: list[tuple[int, int]]) -> list[Any]:
        assert [scope for _, scope in ids] == [0xFFFFFFFF, 0xFFFFFFFF]
        return [types.SimpleNamespace(nvmlReturn=0, value=types.SimpleNamespace(ullVal=v))
                for v in h.nvlink_kib]  # fmt: skip

    functions = dict(
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetUUID=lambda h: f"GPU-{gpus.index(h)}".encode(),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=h.util_percent),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=h.used, total=h.total),
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetPcieThroughput=lambda h, counter: h.pcie_kb[counter],
        nvmlDeviceGetFieldValues=fields,
    )
    for name, fn in functions.items():
        setattr(m, name, fn)
    return m


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def value(registry: CollectorRegistry, name: str, gpu: str = "0") -> float | None:
    return registry.get_sample_value(name, {"gpu": gpu, "uuid": f"GPU-{gpu}"})


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> tuple[list[FakeGpu], list[str]]:
    devices, calls = [FakeGpu(), FakeGpu(util_percent=100, has_power=False)], []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices, calls))
    return devices, calls


def test_exports_every_metric_per_gpu(gpus: tuple[list[FakeGpu], list[str]]) -> None:
    devices, calls = gpus
    registry, clock = CollectorRegistry(), Clock()
    sampler = NvmlSampler(registry, interval_s=60, clock=clock)
    with sampler:
        assert sampler.is_available
        assert value(registry, "prfaas_gpu_utilization_ratio") == 0.5
        assert value(registry, "prfaas_gpu_utilization_ratio", "1") == 1.0
        assert value(registry, "prfaas_gpu_memory_used_bytes") == 10 << 30
        assert value(registry, "prfaas_gpu_memory_total_bytes") == 80 << 30
        assert value(registry, "prfaas_gpu_power_watts") == 350.0
        assert value(registry, "prfaas_gpu_power_watts", "1") is None  # not supported: skipped
        assert value(registry, "prfaas_gpu_pcie_tx_bytes_per_second") == 1000 * 1024
        assert value(registry, "prfaas_gpu_pcie_rx_bytes_per_second") == 2000 * 1024
        assert value(registry, "prfaas_gpu_nvlink_tx_bytes_per_second") is None  # one sample
        devices[0].nvlink_kib = [2 * 1024 * 1024, 1024 * 1024]  # KiB after 2 s
        clock.now += 2.0
        assert sampler.sample_once() == 2
        assert value(registry, "prfaas_gpu_nvlink_tx_bytes_per_second") == 1 << 30
        assert value(registry, "prfaas_gpu_nvlink_rx_bytes_per_second") == 1 << 29
    assert calls == ["init", "shutdown"]
    assert not sampler.is_available
    sampler.close()  # idempotent
    assert calls == ["init", "shutdown"]


def test_sampling_thread_runs_and_stops_cleanly(gpus: tuple[list[FakeGpu], list[str]]) -> None:
    devices, _ = gpus
    registry = CollectorRegistry()
    with NvmlSampler(registry, interval_s=0.01, join_timeout_s=2.0):
        names = {t.name for t in threading.enumerate()}
        assert "nvml-sampler" in names
        devices[0].util_percent = 25
        for _ in range(200):
            if value(registry, "prfaas_gpu_utilization_ratio") == 0.25:
                break
            threading.Event().wait(0.01)
        assert value(registry, "prfaas_gpu_utilization_ratio") == 0.25
    assert "nvml-sampler" not in {t.name for t in threading.enumerate()}


def test_without_a_gpu_it_says_so_once_and_stays_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)  # the real nvidia-ml-py
    events: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def __getattr__(self, level: str) -> Any:
            return lambda event, **kw: events.append((event, kw))

    monkeypatch.setattr(nvml_module, "log", Recorder())
    registry = CollectorRegistry()
    sampler = NvmlSampler(registry, interval_s=0.01)
    with sampler:
        assert not sampler.is_available
        assert sampler.sample_once() == 0
        sampler.start()  # again: no second message
    assert [e for e, _ in events] == ["nvml_unavailable"]
    assert "no GPU" in (sampler.unavailable_reason or "")
    assert "nvml-sampler" not in {t.name for t in threading.enumerate()}
    assert value(registry, "prfaas_gpu_utilization_ratio") is None


def test_nvml_without_devices_counts_as_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], calls))
    with NvmlSampler(CollectorRegistry()) as sampler:
        assert not sampler.is_available
        assert sampler.unavailable_reason == "no GPU: NVML lists no device"
    assert calls == ["init", "shutdown"]


def test_missing_pynvml_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    with NvmlSampler(CollectorRegistry()) as sampler:
        assert "nvidia-ml-py" in (sampler.unavailable_reason or "")
