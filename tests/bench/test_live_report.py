"""``bench/_live_report.py``: the live drop's figures from records and scrapes (pure).

Checked: the worst window's P90 is the window where the slow requests arrived, and a failed
request counts as an infinite TTFT there; goodput counts SLO-met requests over the span and a
failure misses the SLO; the per-second series take the offload share from the routed counters
over their window, the egress from tc's byte counter, and NaN where the router has no gauge.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _live_report import SHARE_WINDOW_S, outcome, series, worst_window_p90
from _live_run import Sample


def test_the_worst_window_is_where_the_slow_requests_arrived() -> None:
    arrivals = np.arange(0.0, 100.0, 1.0)
    ttft = np.where((arrivals >= 40) & (arrivals < 60), 9.0, 1.0)
    p90, start = worst_window_p90(arrivals, ttft, window_s=10.0, span_s=100.0)
    assert (p90, start) == (9.0, 40.0)
    ttft[5] = math.inf  # a failure: the one window holding it is the worst
    p90, start = worst_window_p90(arrivals, ttft, window_s=100.0, span_s=100.0)
    assert p90 == 9.0 and start == 0.0  # P90 of 100 values: one inf does not reach it


def test_goodput_counts_slo_met_requests_and_a_failure_misses() -> None:
    figures = outcome([0.0, 1.0, 2.0, 3.0], [0.5, 2.0, None, 0.9], [1.0, 1.0, 1.0, 1.0],
                      window_s=4.0, span_s=4.0, is_remote=[True, False, False, False])  # fmt: skip
    assert (figures.num_requests, figures.num_ok, figures.num_slo_met) == (4, 3, 2)
    assert figures.goodput_rps == pytest.approx(0.5)
    assert figures.offload_share == pytest.approx(0.25)
    assert figures.worst_window_p90_tt2t_s == math.inf  # the failure is in the top 10%
    assert figures.as_json()["worst_window_p90_tt2t_s"] is None  # inf -> null in JSON
    assert figures.p90_ttft_s is None  # no t1 given (the simulator's case)


def test_the_slo_is_on_the_second_token_a_stalled_relay_misses_it() -> None:
    """t1 comes from the prefill leg before the KV crosses the link: a request whose KV stalls
    has a fast TTFT and a slow second token, and misses the SLO."""
    ttft, tt2t = [0.5, 0.6], [0.7, 30.0]  # the second one's KV waited ~30 s on the link
    figures = outcome([0.0, 1.0], tt2t, [2.0, 2.0], window_s=2.0, span_s=2.0, ttft_s=ttft)
    assert figures.num_slo_met == 1
    assert figures.p90_ttft_s == 0.6 and figures.p90_tt2t_s == 30.0


def sample(time_s: float, routed: float, remote: float, wan_bytes: int, **gauges: float) -> Sample:
    return Sample(time_s=time_s, gauges=gauges, num_routed=routed, num_remote=remote,
                  wan_bytes=wan_bytes, wan_rate_bps=20e6, wan_drops=0)  # fmt: skip


def test_series_from_the_scrapes() -> None:
    lag = int(SHARE_WINDOW_S)
    samples = [sample(float(i), routed=2.0 * i, remote=float(i // 2), wan_bytes=125_000 * i,
                      prfaas_threshold_tokens=1000.0 + i, prfaas_link_estimate_gbps=0.02)
               for i in range(lag + 5)]  # fmt: skip
    out = series(samples)
    assert out["time_s"][-1] == lag + 4
    assert out["threshold_tokens"][-1] == 1000.0 + lag + 4
    assert math.isnan(out["threshold_min_tokens"][-1])  # no such gauge on this router
    assert out["wan_egress_mbps"][-1] == pytest.approx(1.0)  # 125 kB/s
    assert out["wan_rate_mbps"][-1] == 20.0 and out["link_estimate_mbps"][-1] == 20.0
    last, first = samples[-1], samples[-1 - lag]
    share = (last.num_remote - first.num_remote) / (last.num_routed - first.num_routed)
    assert out["offload_share"][-1] == pytest.approx(share, abs=1e-3)
    assert math.isnan(out["offload_share"][0])  # nothing routed yet
