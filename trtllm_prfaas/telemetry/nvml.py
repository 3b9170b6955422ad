"""GPU telemetry from NVML (``nvidia-ml-py``, module ``pynvml``) as Prometheus gauges.

``NvmlSampler(registry)`` registers these gauges on the registry it is given, labelled by ``gpu``
(the NVML index) and ``uuid``::

    prfaas_gpu_utilization_ratio             SM busy fraction over NVML's last window, 0..1
    prfaas_gpu_memory_used_bytes             framebuffer memory in use
    prfaas_gpu_memory_total_bytes            framebuffer memory installed
    prfaas_gpu_power_watts                   board power draw
    prfaas_gpu_pcie_{tx,rx}_bytes_per_second PCIe throughput (NVML samples it over ~20 ms)
    prfaas_gpu_nvlink_{tx,rx}_bytes_per_second NVLink data throughput summed over links, from the
                                             difference of NVML's cumulative counters between two
                                             samples (absent until the second sample)

Contract:
- Used as a context manager: ``__enter__`` initialises NVML and starts one daemon sampling thread
  (a sample every ``interval_s``); ``__exit__``/``close()`` stops it and joins it with a timeout,
  then shuts NVML down. ``close()`` is idempotent.
- Without a GPU (``NVMLError_LibraryNotFound``, ``NVMLError_DriverNotLoaded``, no device, or no
  ``pynvml`` at all) it logs ``nvml_unavailable`` once, starts no thread, exports nothing and stays
  quiet; ``is_available`` is False and ``unavailable_reason`` says why.
- A metric a GPU does not support (``NVMLError_NotSupported`` and friends) is skipped for that GPU
  and logged once; other GPUs and metrics go on being sampled.
- ``sample_once()`` takes one sample synchronously (tests call it directly).
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from functools import partial
from types import ModuleType, TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from trtllm_prfaas.telemetry.logging import get_logger

__all__ = ["NvmlSampler"]

log = get_logger(__name__)

_ALL_LINKS = 0xFFFFFFFF  # NVML scopeId: sum a per-link field over every link
_KIB = 1024


class NvmlSampler:
    """Samples every GPU NVML sees into Prometheus gauges (see the module docstring)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        interval_s: float = 5.0,
        join_timeout_s: float = 5.0,
        nvml: ModuleType | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s: must be > 0")
        self._interval_s = interval_s
        self._join_timeout_s = join_timeout_s
        self._nvml = nvml
        self._clock = clock
        self._handles: list[tuple[str, str, Any]] = []  # (index, uuid, handle)
        self._nvlink_last: dict[tuple[str, int], tuple[float, int]] = {}
        self._skipped: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._initialised = False
        self.unavailable_reason: str | None = None
        labels = ["gpu", "uuid"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self._util = gauge("prfaas_gpu_utilization_ratio", "GPU busy fraction, 0..1")
        self._mem_used = gauge("prfaas_gpu_memory_used_bytes", "GPU memory in use")
        self._mem_total = gauge("prfaas_gpu_memory_total_bytes", "GPU memory installed")
        self._power = gauge("prfaas_gpu_power_watts", "GPU board power draw")
        self._pcie_tx = gauge("prfaas_gpu_pcie_tx_bytes_per_second", "PCIe transmit throughput")
        self._pcie_rx = gauge("prfaas_gpu_pcie_rx_bytes_per_second", "PCIe receive throughput")
        self._nvlink_tx = gauge(
            "prfaas_gpu_nvlink_tx_bytes_per_second", "NVLink transmit, all links"
        )
        self._nvlink_rx = gauge(
            "prfaas_gpu_nvlink_rx_bytes_per_second", "NVLink receive, all links"
        )

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def is_available(self) -> bool:
        return self._initialised and bool(self._handles)

    def start(self) -> NvmlSampler:
        """Initialise NVML and start the sampling thread; without a GPU, log once and do nothing."""
        if self._initialised or self.unavailable_reason is not None:
            return self
        if not self._open():
            log.info("nvml_unavailable", reason=self.unavailable_reason, note="no GPU telemetry")
            return self
        self.sample_once()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop and join the sampling thread (bounded by ``join_timeout_s``), shut NVML down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._join_timeout_s)
            if self._thread.is_alive():
                log.error("nvml_sampler_join_timeout", timeout_s=self._join_timeout_s)
            self._thread = None
        if self._initialised:
            self._initialised = False
            try:
                self._lib().nvmlShutdown()
            except Exception as exc:  # shutting down: nothing left to protect, report it
                log.warning("nvml_shutdown_failed", error=str(exc))

    def __enter__(self) -> NvmlSampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- sampling --------------------------------------------------------------------------

    def sample_once(self) -> int:
        """Sample every GPU once; returns how many GPUs were sampled (0 without a GPU)."""
        if not self._initialised:
            return 0
        for index, uuid, handle in self._handles:
            self._sample_gpu(index, uuid, handle)
        return len(self._handles)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sample_once()
            except Exception:
                log.exception("nvml_sampler_failed", note="GPU telemetry stopped")
                return

    def _sample_gpu(self, index: str, uuid: str, handle: Any) -> None:
        nvml = self._lib()
        labels = (index, uuid)
        rates = self._try(index, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        if rates is not None:
            self._util.labels(*labels).set(rates.gpu / 100.0)  # percent -> ratio
        memory = self._try(index, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if memory is not None:
            self._mem_used.labels(*labels).set(memory.used)
            self._mem_total.labels(*labels).set(memory.total)
        milliwatts = self._try(index, "power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        if milliwatts is not None:
            self._power.labels(*labels).set(milliwatts / 1000.0)
        pcie = (
            (nvml.NVML_PCIE_UTIL_TX_BYTES, self._pcie_tx),
            (nvml.NVML_PCIE_UTIL_RX_BYTES, self._pcie_rx),
        )
        for counter, gauge in pcie:
            kb_per_s = self._try(
                index, "pcie", partial(nvml.nvmlDeviceGetPcieThroughput, handle, counter)
            )
            if kb_per_s is not None:
                gauge.labels(*labels).set(kb_per_s * _KIB)
        self._try(index, "nvlink", lambda: self._sample_nvlink(labels, handle))

    def _sample_nvlink(self, labels: tuple[str, str], handle: Any) -> None:
        nvml = self._lib()
        fields = [
            (nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS),
            (nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS),
        ]
        values = nvml.nvmlDeviceGetFieldValues(handle, fields)
        now = self._clock()
        for slot, gauge in enumerate((self._nvlink_tx, self._nvlink_rx)):
            value = values[slot]
            if value.nvmlReturn != nvml.NVML_SUCCESS:
                raise nvml.NVMLError(value.nvmlReturn)
            kib = int(value.value.ullVal)  # cumulative KiB since the driver loaded
            last = self._nvlink_last.get((labels[0], slot))
            self._nvlink_last[(labels[0], slot)] = (now, kib)
            if last is not None and now > last[0] and kib >= last[1]:
                gauge.labels(*labels).set((kib - last[1]) * _KIB / (now - last[0]))

    def _try(self, index: str, metric: str, read: Callable[[], Any]) -> Any:
        """Run one NVML read; an NVML error skips the metric for this GPU (logged once)."""
        nvml = self._lib()
        try:
            return read()
        except nvml.NVMLError as exc:
            if (index, metric) not in self._skipped:
                self._skipped.add((index, metric))
                log.info("nvml_metric_unavailable", gpu=index, metric=metric, error=str(exc))
            return None

    # ---- NVML access -----------------------------------------------------------------------

    def _lib(self) -> Any:
        assert self._nvml is not None
        return self._nvml

    def _open(self) -> bool:
        """Import and initialise NVML and list the GPUs; False (with a reason) without a GPU."""
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError:
                self.unavailable_reason = "pynvml not installed (pip install nvidia-ml-py)"
                return False
        nvml = self._lib()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.unavailable_reason = f"no GPU: {type(exc).__name__}: {exc}"
            return False
        self._initialised = True
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                self._handles.append(
                    (str(i), uuid.decode() if isinstance(uuid, bytes) else uuid, handle)
                )
        except nvml.NVMLError as exc:
            self.unavailable_reason = f"no GPU: {type(exc).__name__}: {exc}"
        if not self._handles:
            self.unavailable_reason = self.unavailable_reason or "no GPU: NVML lists no device"
            self.close()
            return False
        return True
