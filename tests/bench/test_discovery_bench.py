"""``bench/discovery.py --quick --json`` end to end: real etcd, ``prfaas worker`` and ``prfaas
router`` processes. Its one JSON line has every figure, positive, consistent with its samples
and targets; the membership, lost-worker and failover figures hold their targets on this machine
(the latency ratio is reported, not asserted: a shared machine's p99 is noise at 40 requests);
and no process it started outlives it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("join_to_routable_s", "death_to_unroutable_s", "death_to_deregistered_s",
           "leader_failover_s", "worker_lost_to_client_error_s", "frozen_to_client_error_s",
           "frozen_to_unroutable_s", "frozen_to_deregistered_s")  # fmt: skip

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("PRFAAS_BENCH_TEST") != "1",
        reason="~30 s of real processes: `make bench-test` (PRFAAS_BENCH_TEST=1; CI runs it)",
    ),
    pytest.mark.skipif(
        shutil.which("etcd") is None and not Path("/usr/bin/etcd").exists(),
        reason="bench/discovery.py needs etcd (Debian: apt-get install etcd-server; make does)",
    ),
]


def _processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and text in cmdline:
            found.append(cmdline)
    return found


def test_quick_run_reports_every_figure_within_its_target(tmp_path: Path) -> None:
    # TMPDIR: the run's directory (etcd's data, the Curve key files the discovered workers and
    # replicas are started with) lies under tmp_path, so their command lines name it.
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, "bench/discovery.py", "--quick", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout  # one JSON line, nothing else on stdout
    result = json.loads(lines[0])
    assert _processes_naming(str(tmp_path)) == []

    for name in FIGURES:
        samples = result["samples"][name]
        assert all(v > 0 for v in samples["samples"]), (name, samples)
        assert result[name] == samples["max"] >= samples["median"] > 0, (name, samples)
    # the first start, and a restart after the SIGKILL and after the SIGSTOP
    assert len(result["samples"]["join_to_routable_s"]["samples"]) == 3
    assert result["static_p99_ms"] > 0 and result["discovered_p99_ms"] > 0
    ratio = result["discovered_p99_ms"] / result["static_p99_ms"]
    assert result["p99_ratio"] == pytest.approx(ratio, abs=2e-3)
    added = result["discovered_p99_ms"] - result["static_p99_ms"]
    assert result["p99_added_ms"] == pytest.approx(added, abs=2e-3)
    assert result["static_p50_ms"] <= result["static_p99_ms"]
    requests = result["settings"]["num_requests"]
    assert result["num_requests"] == {"static": requests, "discovered": requests}

    ttl, leader_ttl, lost = result["lease_ttl_s"], result["leader_ttl_s"], result["worker_lost_s"]
    assert result["targets"] == {
        "join_to_routable_s": 1.0, "death_to_unroutable_s": ttl + 1.0,
        "death_to_deregistered_s": ttl + 1.0, "leader_failover_s": leader_ttl + 1.0,
        "worker_lost_to_client_error_s": lost + 1.0, "frozen_to_client_error_s": lost + 1.0,
        "frozen_to_unroutable_s": min(ttl, lost) + 1.0, "frozen_to_deregistered_s": ttl + 1.0,
        "p99_ratio": 1.1,
    }  # fmt: skip
    figures = {**{name: result[name] for name in FIGURES}, "p99_ratio": result["p99_ratio"]}
    assert result["meets_targets"] == {
        name: figures[name] <= limit for name, limit in result["targets"].items()
    }
    # Unroutable is the first of lost (the connection) and deregistered (the lease), so never
    # after the latter; a SIGKILLed leader's lease runs out by itself (renewed every TTL / 3).
    assert result["death_to_unroutable_s"] <= result["death_to_deregistered_s"]
    assert result["frozen_to_unroutable_s"] <= result["frozen_to_deregistered_s"]
    assert result["leader_failover_s"] >= leader_ttl / 3
    for name in FIGURES:  # the targets this machine must hold, loaded or not
        assert result["meets_targets"][name], (name, result[name], result["targets"][name])
    assert result["cpu_count"] >= 1 and result["load_average_1m"] >= 0
    assert set(result["phase_s"]) == {"start", "latency", "worker_kills", "failovers"}
