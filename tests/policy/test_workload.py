from __future__ import annotations

import numpy as np
import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.profile import QuadraticLatency
from trtllm_prfaas.policy.workload import (
    HistogramLengths,
    TruncatedLogNormal,
    conditional_expectation,
    conditional_means,
    curve_mixture_quantile,
)

DIST = TruncatedLogNormal(mu=9.90, sigma=1.00, lo=128, hi=131072)


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    rng = np.random.default_rng(1234)
    raw = np.exp(rng.normal(9.90, 1.00, 400_000))
    return raw[(raw >= 128) & (raw <= 131072)]


def test_lognormal_moments_match_monte_carlo(samples: np.ndarray) -> None:
    t = 19400.0
    p, l_long, l_short = (float(x[0]) for x in conditional_means(DIST, np.asarray([t])))
    assert DIST.mean == pytest.approx(samples.mean(), rel=5e-3)
    assert p == pytest.approx((samples > t).mean(), abs=3e-3)
    assert l_long == pytest.approx(samples[samples > t].mean(), rel=5e-3)
    assert l_short == pytest.approx(samples[samples <= t].mean(), rel=5e-3)
    assert DIST.quantile(0.9) == pytest.approx(np.quantile(samples, 0.9), rel=1e-2)


def test_lognormal_nonlinear_expectation_matches_monte_carlo(samples: np.ndarray) -> None:
    curve = QuadraticLatency(0.469, 1.30e-4, 2.94e-10)
    ours = conditional_expectation(DIST, curve.seconds, 128, 131072)
    assert ours == pytest.approx(curve.seconds(samples).mean(), rel=5e-3)
    long = conditional_expectation(DIST, curve.seconds, 19400, 131072)
    assert long == pytest.approx(curve.seconds(samples[samples > 19400]).mean(), rel=5e-3)


def test_mixture_quantile_matches_monte_carlo(samples: np.ndarray) -> None:
    slow, fast = QuadraticLatency(0.469, 1.30e-4, 2.94e-10), QuadraticLatency(0.2, 5e-5, 0.0)
    t = 19400.0
    ttft = np.where(samples > t, fast.seconds(samples), slow.seconds(samples))
    ours = curve_mixture_quantile(DIST, 0.9, [(128, t, slow), (t, 131072, fast)])
    assert ours == pytest.approx(np.quantile(ttft, 0.9), rel=1e-2)


def test_histogram_hand_computed() -> None:
    h = HistogramLengths((0.0, 10.0, 20.0), (1.0, 1.0))
    assert float(h.cdf(np.asarray([5.0]))[0]) == pytest.approx(0.25)
    assert h.mean == pytest.approx(10.0)
    assert float(h.partial_mean(np.asarray([0.0]), np.asarray([10.0]))[0]) == pytest.approx(2.5)
    assert float(h.partial_mean(np.asarray([5.0]), np.asarray([15.0]))[0]) == pytest.approx(5.0)
    assert h.quantile(0.75) == pytest.approx(15.0)
    assert h.partial_expectation(lambda x: x**2, 0.0, 20.0) == pytest.approx(400 / 3)
    p, l_long, l_short = (float(x[0]) for x in conditional_means(h, np.asarray([10.0])))
    assert (p, l_long, l_short) == pytest.approx((0.5, 15.0, 5.0))


def test_histogram_empty_sides_report_boundaries() -> None:
    h = HistogramLengths((0.0, 10.0, 20.0), (1.0, 1.0))
    p, l_long, l_short = conditional_means(h, np.asarray([0.0, 20.0]))
    assert p.tolist() == [1.0, 0.0]
    assert l_long[1] == 20.0 and l_short[0] == 0.0


def test_histogram_from_samples_approximates_the_lognormal(samples: np.ndarray) -> None:
    h = HistogramLengths.from_samples(samples, lo=128, hi=131072, num_bins=64)
    t = np.asarray([4000.0, 19400.0, 60000.0])
    for ours, exact in zip(conditional_means(h, t), conditional_means(DIST, t), strict=True):
        np.testing.assert_allclose(ours, exact, rtol=2e-2)


def test_invalid_distributions_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        TruncatedLogNormal(1.0, 0.0, 1.0, 2.0)
    with pytest.raises(ConfigError):
        HistogramLengths((0.0, 1.0), (0.0,))
    with pytest.raises(ConfigError):
        HistogramLengths((0.0, 1.0, 0.5), (1.0, 1.0))
