from __future__ import annotations

import numpy as np
import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.profile import (
    BYTES_PER_MIB,
    Interpolation,
    KvSize,
    PiecewiseLatency,
    QuadraticLatency,
)

POINTS = ((1024.0, 8192.0, 32768.0, 131072.0), (0.44, 0.72, 1.84, 7.40))


@pytest.mark.parametrize("interp", list(Interpolation))
def test_piecewise_passes_through_points_and_inverts(interp: Interpolation) -> None:
    curve = PiecewiseLatency(*POINTS, interpolation=interp)
    np.testing.assert_allclose(curve.seconds(np.asarray(POINTS[0])), POINTS[1], rtol=1e-12)
    for tokens in (300.0, 5000.0, 45056.0, 140000.0):
        seconds = float(curve.seconds(np.asarray([tokens]))[0])
        assert curve.tokens_for(seconds) == pytest.approx(tokens, rel=1e-9)
    grid = np.geomspace(128, 131072, 200)
    assert np.all(np.diff(curve.seconds(grid)) > 0)


def test_linear_interpolation_is_the_chord() -> None:
    curve = PiecewiseLatency(*POINTS, interpolation=Interpolation.LINEAR)
    mid = (32768 + 131072) / 2
    assert float(curve.seconds(np.asarray([mid]))[0]) == pytest.approx((1.84 + 7.40) / 2)


def test_loglog_is_a_power_law_between_points() -> None:
    curve = PiecewiseLatency(*POINTS, interpolation=Interpolation.LOGLOG)
    geo_mid = float(np.sqrt(8192 * 32768))
    assert float(curve.seconds(np.asarray([geo_mid]))[0]) == pytest.approx(np.sqrt(0.72 * 1.84))


def test_quadratic_matches_formula_and_inverts() -> None:
    curve = QuadraticLatency(0.469, 1.30e-4, 2.94e-10)
    assert float(curve.seconds(np.asarray([27500.0]))[0]) == pytest.approx(
        0.469 + 1.30e-4 * 27500 + 2.94e-10 * 27500**2
    )
    assert curve.tokens_for(4.0) == pytest.approx(
        float(np.roots([2.94e-10, 1.30e-4, 0.469 - 4.0]).max())
    )
    assert QuadraticLatency(1.0, 0.5, 0.0).tokens_for(2.0) == pytest.approx(2.0)


def test_kv_fit_recovers_an_exact_line_and_converts_units() -> None:
    kv = KvSize.fit((0.0, 1000.0, 3000.0), (5.0, 1005.0, 3005.0))
    assert kv.fixed_bytes == pytest.approx(5.0)
    assert kv.per_token_bytes == pytest.approx(1.0)
    one_mib = KvSize(BYTES_PER_MIB, 1.0)
    assert one_mib.gigabits(0) == pytest.approx(2**20 * 8 / 1e9)


@pytest.mark.parametrize(
    "build",
    [
        lambda: PiecewiseLatency((1.0,), (1.0,)),
        lambda: PiecewiseLatency((2.0, 1.0), (1.0, 2.0)),
        lambda: PiecewiseLatency((1.0, 2.0), (2.0, 1.0)),
        lambda: QuadraticLatency(-1.0, 1.0, 0.0),
        lambda: QuadraticLatency(1.0, 0.0, 0.0),
        lambda: KvSize(0.0, 0.0),
    ],
)
def test_invalid_profiles_raise_config_error(build: object) -> None:
    with pytest.raises(ConfigError):
        build()  # type: ignore[operator]
