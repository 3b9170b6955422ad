"""Pure helpers of bench/transport_shaped.py: goodput windows, settle time, the skipped report."""

from __future__ import annotations

import json

import pytest
import transport_shaped as ts


def trace(rates_gbps: list[tuple[float, float]], period_s: float = 0.05) -> list[tuple[float, int]]:
    """Samples ``(t, bytes)`` every ``period_s`` of a link running at piecewise-constant rates:
    ``rates_gbps`` = [(until_t, gbps), ...] from t = 0."""
    samples, received, t = [(0.0, 0)], 0.0, 0.0
    for until_t, gbps in rates_gbps:
        while t + period_s <= until_t + 1e-9:
            t = round(t + period_s, 6)
            received += gbps * 1e9 / 8 * period_s
            samples.append((t, int(received)))
    return samples


def test_windowed_gbps_of_a_constant_rate_is_that_rate() -> None:
    rates = ts.windowed_gbps(trace([(2.0, 0.8)]), window_s=0.3)
    assert rates[0][0] == pytest.approx(0.3)  # the first point with a full window behind it
    assert all(gbps == pytest.approx(0.8, rel=1e-6) for _, gbps in rates)


def test_settle_after_a_step_down_is_about_one_window() -> None:
    samples = trace([(3.0, 1.0), (6.0, 0.2)])
    rates = ts.windowed_gbps(samples, window_s=0.3)
    settle = ts.settle_time_s(rates, change_t=3.0, end_t=6.0, target_gbps=0.2)
    # The window must hold under 2.5 % old-rate time to read within 10 % of 0.2: ~0.3 s.
    assert settle == pytest.approx(0.3, abs=0.051)


def test_settle_after_a_step_up_and_a_slow_ramp() -> None:
    steps = [(2.0, 0.2), *[(2.0 + 0.1 * k, 0.2 + 0.08 * k) for k in range(1, 11)], (6.0, 1.0)]
    rates = ts.windowed_gbps(trace(steps), window_s=0.3)
    settle = ts.settle_time_s(rates, change_t=2.0, end_t=6.0, target_gbps=1.0)
    assert settle == pytest.approx(1.0, abs=0.051)  # at 0.92 Gbit/s of ramp the window reads 0.92


def test_a_late_excursion_restarts_the_settle_time() -> None:
    rates = [(t / 10, 0.2) for t in range(1, 40)]
    rates[30] = (3.1, 0.1)  # one point outside +-10 % at t = 3.1 s
    assert ts.settle_time_s(rates, 0.0, 4.0, 0.2) == pytest.approx(3.2)


def test_never_settling_or_settling_too_late_gives_none() -> None:
    rates = [(t / 10, 0.5) for t in range(1, 40)]
    assert ts.settle_time_s(rates, 0.0, 4.0, 0.2) is None
    late = [*rates[:-3], (3.7, 0.2), (3.8, 0.2), (3.9, 0.2)]
    assert ts.settle_time_s(late, 0.0, 4.0, 0.2, min_hold_s=0.5) is None
    assert ts.settle_time_s([], 0.0, 4.0, 0.2) is None


def test_span_gbps_uses_the_samples_inside_the_span() -> None:
    samples = trace([(1.0, 2.0), (3.0, 0.5)])
    assert ts.span_gbps(samples, 1.0, 3.0) == pytest.approx(0.5)
    assert ts.span_gbps(samples, 5.0, 6.0) is None


def test_link_names_fit_the_interface_name_limit() -> None:
    link = ts.Link.for_pid(4194304)  # the largest Linux PID
    assert max(len(link.dev_a), len(link.dev_b)) <= 15  # IFNAMSIZ - 1
    assert link.ns_a == "prfaas-a-4194304" and link.ns_b == "prfaas-b-4194304"
    argv = link.tbf("change", 200)
    assert argv[:4] == ["ip", "netns", "exec", link.ns_a]
    assert argv[4:] == ["tc", "qdisc", "change", "dev", link.dev_a, "root", "tbf",
                        "rate", "200mbit", *ts.TBF_SHAPE]  # fmt: skip


def test_without_root_it_prints_a_skipped_json_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ts.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(ts.signal, "signal", lambda *args: None)  # leave pytest's handlers
    assert ts.main(["--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["shaped_over_iperf3"] is None and report["rate_change_tracked_s"] is None
    assert "not root" in report["skipped"]
