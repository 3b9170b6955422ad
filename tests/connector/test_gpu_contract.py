"""The CPU-side parts of the GPU contract script (scripts/gpu_contract.sh, issue 12 item 7a): it
runs without pytest, imports only what the GPU image has, and prints one line per check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the PyTorch CUDA image offers: torch (and what torch itself imports), plus the
# connector's own dependencies. Anything else (pytest, tokenizers, grpc, tritonclient, ...)
# would make the script fail there.
TORCH_OWN = {"torch", "torchgen", "typing_extensions", "pynvml", "tqdm", "sympy", "mpmath"}
CONNECTOR = {"numpy", "zmq", "msgspec", "xxhash", "structlog", "yaml", "prometheus_client"}
# Imported only when installed, with a fallback: structlog.threadlocal uses greenlet if present
# (tritonclient[http]'s geventhttpclient brings it here), else threading.local.
OPTIONAL = {"greenlet"}
ALLOWED = TORCH_OWN | CONNECTOR | OPTIONAL | {"trtllm_prfaas", "tests"}
_AUDIT = """
import contextlib, io, json, sys
sys.modules["pytest"] = None  # the GPU image has no pytest
from tests.connector.gpu_contract import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(["--device", "strict"])
real = lambda m: getattr(m, "__file__", None) is not None or m.__name__ != "pytest"
loaded = {m.split(".")[0] for m, mod in list(sys.modules.items()) if mod is not None and real(mod)}
print(json.dumps({"rc": rc, "modules": sorted(loaded - set(sys.stdlib_module_names))}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}


def test_the_runner_needs_only_what_the_gpu_image_has() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _AUDIT], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0
    modules = {m for m in result["modules"] if not m.startswith(("_", "__"))}
    modules -= {"cython_runtime"}
    assert modules <= ALLOWED, modules - ALLOWED
    assert "pytest" not in modules and "tensorrt_llm" not in modules


def test_the_script_prints_one_line_per_check_and_its_status() -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_contract.sh"), "--device", "strict"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(line.split()[0] in ("PASS", "DONE") for line in lines), lines
    checks = [line for line in lines if line.startswith("PASS  contract: test_")]
    assert len(checks) >= 8 and any("[tp2" in line for line in checks)
    assert lines[-1] == "DONE  0 failed"
