"""Percentiles, summaries of request records, and Poisson inter-arrival gaps."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from trtllm_prfaas.loadgen.runner import poisson_gaps
from trtllm_prfaas.loadgen.stats import OK, RequestRecord, percentile, summarize


def record(index: int, status: str = OK, **overrides: float | int | None) -> RequestRecord:
    fields: dict[str, object] = dict(
        num_prompt_tokens=10,
        sent_at=float(index),
        finished_at=index + 1.0,
        num_output_tokens=5,
        first_token_at=index + 0.1,
        last_token_at=index + 0.5,
    )
    fields.update(overrides)
    return RequestRecord(index=index, status=status, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("q", [0, 1, 37.5, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    rng = random.Random(q)
    values = [rng.expovariate(1.0) for _ in range(101)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_counts_latencies_and_throughput() -> None:
    records = [record(0), record(1), record(2, first_token_at=2.3, last_token_at=2.3,
                                           num_output_tokens=1),
               record(3, "DEADLINE_EXCEEDED", first_token_at=None, last_token_at=None,
                      num_output_tokens=0)]  # fmt: skip
    stats = summarize(records)
    assert (stats.num_sent, stats.num_ok, stats.num_failed) == (4, 3, 1)
    assert stats.elapsed_s == pytest.approx(4.0)
    assert stats.ttft.num == 3 and stats.ttft.mean_ms == pytest.approx((100 + 100 + 300) / 3)
    assert stats.tpot.num == 2 and stats.tpot.p50_ms == pytest.approx(100.0)  # 0.4 s / 4 tokens
    assert stats.request_throughput_rps == pytest.approx(3 / 4)
    assert stats.output_tokens_per_s == pytest.approx(11 / 4)
    assert stats.failures == {"DEADLINE_EXCEEDED": 1}


def test_empty_summary_has_no_latencies() -> None:
    stats = summarize([])
    assert stats.num_sent == 0 and stats.ttft.mean_ms is None and stats.tpot.p90_ms is None


def test_poisson_gaps_have_the_right_mean_and_are_seeded() -> None:
    gaps = poisson_gaps(rate_rps=20.0, seed=1, num=20_000)
    # Exponential: mean 1/rate, std 1/rate; the sample mean is within 4 standard errors.
    assert abs(statistics.fmean(gaps) - 0.05) < 4 * 0.05 / math.sqrt(len(gaps))
    assert statistics.pstdev(gaps) == pytest.approx(0.05, rel=0.05)
    assert gaps[:50] == poisson_gaps(20.0, 1, 50) and gaps[:50] != poisson_gaps(20.0, 2, 50)
