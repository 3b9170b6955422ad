"""bench/transport_mooncake.py: the report's shape, the install preflight, the peer helper."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transport_mooncake as tm
from _relay_peer import Peer, PeerError, peer_argv


def relay_run(gbps: float) -> dict[str, object]:
    return {"gbps": gbps, "tcp_total_retrans": 0}


def test_report_divides_the_best_runs() -> None:
    report = tm.report([relay_run(5.0), relay_run(6.0)], {"sync": 2.0, "batch": 3.0}, None, 1, 2)
    assert report["relay_over_mooncake"] == 2.0
    assert report["relay_gbps"] == 6.0 and report["mooncake_gbps"] == 3.0
    assert report["mooncake_error"] is None


def test_report_without_mooncake_says_why() -> None:
    report = tm.report([relay_run(6.0)], {}, "libibverbs.so.1 missing", 1, 1)
    assert report["relay_over_mooncake"] is None and report["mooncake_gbps"] is None
    assert report["mooncake_error"] == "libibverbs.so.1 missing"
    assert report["relay_gbps"] == 6.0


def test_missing_libibverbs_without_root_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tm.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(tm.os, "geteuid", lambda: 1000)
    error = tm.ensure_mooncake(tmp_path)
    assert error is not None and "apt-get install -y libibverbs1" in error


def test_peer_argv_spells_options_and_drops_none() -> None:
    argv = peer_argv("send", endpoint="tcp://x:1", chunk_bytes=4, seconds=None)
    assert argv[2:] == ["send", "--endpoint", "tcp://x:1", "--chunk-bytes", "4"]


def test_peer_reads_json_lines_and_stops_on_stdin_close() -> None:
    code = "import sys; print('{\"a\": 1}', flush=True); sys.stdin.read(); print('{\"b\": 2}')"
    with Peer("echo", [sys.executable, "-c", code]) as peer:
        assert peer.expect("a", 10.0) == {"a": 1}
        peer.stop_input()
        assert peer.expect("b", 10.0) == {"b": 2}
    assert peer.proc.returncode == 0


def test_peer_that_dies_raises_with_its_stderr() -> None:
    code = "import sys; sys.stderr.write('boom'); sys.exit(3)"
    with Peer("dying", [sys.executable, "-c", code]) as peer, pytest.raises(PeerError) as caught:
        peer.expect("never", 10.0)
    assert "boom" in str(caught.value) and "rc=3" in str(caught.value)


def test_peer_close_terminates_a_child_that_ignores_stdin() -> None:
    peer = Peer("stubborn", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert peer.close(timeout_s=0.2) != 0  # SIGTERM after the timeout
