"""Fixtures of the membership tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import WorkerProcess


@pytest.fixture
def procs() -> Iterator[dict[str, WorkerProcess]]:
    """Worker processes a test starts, by name; each stopped by PID after the test, and each
    must exit 0 (a clean SIGTERM shutdown: deregistered, engine stopped)."""
    started: dict[str, WorkerProcess] = {}
    try:
        yield started
    finally:
        codes = {name: proc.stop() for name, proc in started.items()}
        assert all(code == 0 for code in codes.values()), codes
