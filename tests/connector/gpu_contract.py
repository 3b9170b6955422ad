"""The connector contract on a real CUDA device, runnable without pytest (issue 12, item 7a).

``python -m tests.connector.gpu_contract`` (what ``scripts/gpu_contract.sh`` runs) needs only
what a PyTorch-with-CUDA image has plus the connector's own dependencies (pyzmq, msgspec,
xxhash, structlog, numpy, pyyaml, prometheus-client): no pytest, no TensorRT-LLM. It prints one
line per check and exits non-zero if any failed:

1. device checks of ``connector/device.py`` on CUDA: the pool is a CUDA tensor, staging is
   pinned, copies run on a side stream and their events complete, bytes round-trip exactly, and
   the audit's "first check" 5 (a CPU tensor index-put into a CUDA pool raises);
2. every test of ``tests/connector/test_trtllm_contract.py`` with the fake executor's pools on
   CUDA (``CudaDevice``): staging, streams, events and cross-device copies are then real. The
   test module is imported with a minimal stand-in for the few ``pytest`` names it uses
   (``fixture``, ``mark.parametrize``, ``raises``, ``skip``); a test needing another fixture is
   reported as skipped, never silently dropped.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import re
import shutil
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

CONTRACT_MODULE = "tests.connector.test_trtllm_contract"


class _Skipped(Exception):
    pass


class _Mark:
    @staticmethod
    def parametrize(
        names: str, values: list[Any], indirect: bool = False, ids: list[str] | None = None
    ) -> Callable[[Any], Any]:
        def add(func: Any) -> Any:
            keys = [n.strip() for n in names.split(",")]
            cases = []
            for i, value in enumerate(values):
                row = value if len(keys) > 1 else (value,)
                cases.append((ids[i] if ids else str(i), dict(zip(keys, row, strict=True))))
            func.__gpu_params__ = [cases, *getattr(func, "__gpu_params__", [])]
            return func

        return add


@contextlib.contextmanager
def _raises(kind: Any, match: str | None = None) -> Iterator[None]:
    try:
        yield
    except kind as exc:
        if match is not None and not re.search(match, str(exc)):
            raise AssertionError(f"{exc!r} does not match {match!r}") from exc
        return
    raise AssertionError(f"did not raise {kind}")


def _stand_in_pytest() -> types.ModuleType:
    """The names the contract test module uses, enough to import and drive it."""
    module = types.ModuleType("pytest")
    module.fixture = lambda func=None, **_: func if func else (lambda f: f)  # type: ignore[attr-defined]
    module.mark = _Mark()  # type: ignore[attr-defined]
    module.raises = _raises  # type: ignore[attr-defined]
    module.skip = lambda reason="": (_ for _ in ()).throw(_Skipped(reason))  # type: ignore[attr-defined]
    module.FixtureLookupError = LookupError  # type: ignore[attr-defined]
    module.FixtureRequest = object  # type: ignore[attr-defined]
    return module


class _Request:
    """The ``request`` a fixture sees: its indirect ``param`` and the ``fake_device``."""

    def __init__(self, device: Any, param: Any = None) -> None:
        self.device = device
        if param is not None:
            self.param = param

    def getfixturevalue(self, name: str) -> Any:
        if name == "fake_device":
            return self.device
        raise LookupError(name)


# ---- 1. the device layer on CUDA -------------------------------------------------------------


def _device_checks() -> list[tuple[str, Callable[[], None]]]:
    from trtllm_prfaas.connector.device import backend_for

    def round_trip() -> None:
        pool = torch.randn(16, 3, 2, 512, device="cuda", dtype=torch.bfloat16)
        backend, stream = backend_for(pool), torch.cuda.Stream()
        assert backend.cuda is torch.cuda and backend.is_async
        staged = backend.stage_blocks(pool, 1, [3, 4, 5, 9], stream)
        assert staged.host.is_pinned() and staged.host.device.type == "cpu"
        staged.event.synchronize()
        assert staged.event.query()
        assert torch.equal(staged.host, pool[[3, 4, 5, 9], 1].cpu())
        rows = torch.randn(4, 2, 512, dtype=torch.bfloat16)  # pageable: the backend stages it
        landing = backend.write_blocks(pool, 2, [0, 1, 7, 8], rows, stream)
        assert all(t.is_pinned() for t in landing.keep)
        landing.event.synchronize()
        assert torch.equal(pool[[0, 1, 7, 8], 2].cpu(), rows)

    def copies_on_the_hook_stream() -> None:
        pool = torch.zeros(8, 1, 2, 1 << 20, device="cuda")
        backend, stream = backend_for(pool), torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(50_000_000)  # keep the stream busy: the copy must wait behind it
        staged = backend.stage_blocks(pool, 0, list(range(8)), stream)
        assert not staged.event.query(), "the copy did not wait for the stream's earlier work"
        staged.event.synchronize()
        assert staged.event.query()

    def index_put_across_devices_raises() -> None:  # the audit's first check 5
        try:
            torch.zeros(4, 3, device="cuda")[torch.tensor([0, 1])] = torch.ones(2, 3)
        except RuntimeError:
            return
        raise AssertionError("a CPU value index-put into a CUDA tensor did not raise")

    return [
        ("device: stage and write round trip (pinned, events)", round_trip),
        ("device: copies ordered on the hook's stream", copies_on_the_hook_stream),
        ("device: CPU-to-CUDA index_put raises (audit check 5)", index_put_across_devices_raises),
    ]


# ---- 2. the contract tests on CUDA pools -----------------------------------------------------


def _cases(func: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    groups = getattr(func, "__gpu_params__", [])
    for combo in itertools.product(*groups) if groups else [()]:
        ids = [case_id for case_id, _ in combo]
        args = {k: v for _, values in combo for k, v in values.items()}
        yield (f"[{'-'.join(ids)}]" if ids else ""), args


def _run_contract_case(module: Any, func: Any, args: dict[str, Any], device: Any) -> None:
    names = list(inspect.signature(func).parameters)
    unknown = [n for n in names if n not in args and n not in ("deployments", "tmp_path")]
    if unknown:
        raise _Skipped(f"fixture(s) {unknown} have no stand-in here")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-contract-"))
    fixture = None
    try:
        kwargs = {n: args[n] for n in names if n in args and n != "deployments"}
        if "tmp_path" in names:
            kwargs["tmp_path"] = tmp
        if "deployments" in names:
            fixture = module.deployments(_Request(device, args.get("deployments", 1)), tmp)
            kwargs["deployments"] = next(fixture)
        func(**kwargs)
    finally:
        if fixture is not None:
            with contextlib.suppress(StopIteration):
                next(fixture)
        shutil.rmtree(tmp, ignore_errors=True)


def _contract_checks(device: Any) -> list[tuple[str, Callable[[], None]]]:
    sys.modules["pytest"] = _stand_in_pytest()
    module = importlib.import_module(CONTRACT_MODULE)
    checks = []
    for name, func in vars(module).items():
        if name.startswith("test_") and callable(func):
            for suffix, args in _cases(func):
                run = _bind(module, func, args, device)
                checks.append((f"contract: {name}{suffix}", run))
    return checks


def _bind(module: Any, func: Any, args: dict[str, Any], device: Any) -> Callable[[], None]:
    return lambda: _run_contract_case(module, func, args, device)


def main(argv: list[str] | None = None) -> int:
    """``--device strict`` runs the contract part on the CPU shim (how CI tests this runner)."""
    from tests.connector.strict_device import CudaDevice, StrictDevice

    args = sys.argv[1:] if argv is None else argv
    if args == ["--device", "strict"]:
        checks = _contract_checks(StrictDevice())
    elif args:
        print(f"usage: python -m {__spec__.name if __spec__ else 'gpu_contract'} [--device strict]")
        return 2
    elif not torch.cuda.is_available():
        print("SKIP  no CUDA device (torch.cuda.is_available() is False)")
        return 2
    else:
        print(f"INFO  torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
        checks = _device_checks() + _contract_checks(CudaDevice())
    failed = 0
    for name, check in checks:
        start = time.perf_counter()
        try:
            check()
            status, detail = "PASS", ""
        except _Skipped as exc:
            status, detail = "SKIP", str(exc)
        except Exception as exc:
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            failed += 1
            traceback.print_exc(file=sys.stderr)
        print(f"{status}  {name} ({time.perf_counter() - start:.2f}s) {detail}".rstrip())
        sys.stdout.flush()
    print(f"DONE  {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
