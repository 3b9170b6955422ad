"""Base-class resolution: TensorRT-LLM's connector bases when TensorRT-LLM is loaded (1.1/1.2
module path, else the 2026 one), the project's ABCs otherwise; tensorrt_llm is never imported
by the project on its own."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from trtllm_prfaas.connector import base


def _fake_trtllm(monkeypatch: pytest.MonkeyPatch, module_path: str) -> tuple[type, type]:
    worker = type("KvCacheConnectorWorker", (), {})
    scheduler = type("KvCacheConnectorScheduler", (), {})
    parts = module_path.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    leaf = sys.modules[module_path]
    leaf.KvCacheConnectorWorker = worker  # type: ignore[attr-defined]
    leaf.KvCacheConnectorScheduler = scheduler  # type: ignore[attr-defined]
    return worker, scheduler


@pytest.mark.parametrize("path", base.TRTLLM_CONNECTOR_MODULES)
def test_uses_tensorrt_llm_bases_when_loaded(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    worker, scheduler = _fake_trtllm(monkeypatch, path)
    assert base.resolve_base_classes() == (worker, scheduler)


def test_falls_back_to_project_abcs_without_tensorrt_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    worker, scheduler = base.resolve_base_classes()
    assert worker.__module__ == base.__name__ and scheduler.__module__ == base.__name__
    assert {"start_load_kv", "save_kv_layer", "get_finished"} <= worker.__abstractmethods__
    assert {"get_num_new_matched_tokens", "request_finished"} <= scheduler.__abstractmethods__


def test_importing_the_package_never_imports_tensorrt_llm() -> None:
    code = (
        "import sys, trtllm_prfaas.connector.prfaas, trtllm_prfaas.worker.server, "
        "trtllm_prfaas.cli; print('tensorrt_llm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
