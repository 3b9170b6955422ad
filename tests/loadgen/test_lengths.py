"""The prompt-length sampler: truncation, scaling, seeded determinism, moments."""

from __future__ import annotations

import math
import statistics
from statistics import NormalDist

import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.loadgen.lengths import PAPER_LENGTHS, LengthSampler
from trtllm_prfaas.loadgen.prompts import prompt_ids, prompt_text

_PHI = NormalDist().cdf


def truncated_lognormal_moment(k: int, mu: float, sigma: float, lo: float, hi: float) -> float:
    """``E[L^k | lo <= L <= hi]`` for ``ln L ~ N(mu, sigma)``, in closed form (scipy-free)."""
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    mass = _PHI(b) - _PHI(a)
    shifted = _PHI(b - k * sigma) - _PHI(a - k * sigma)
    return math.exp(k * mu + (k * sigma) ** 2 / 2) * shifted / mass


def test_paper_mean_is_27_5k() -> None:
    mean = truncated_lognormal_moment(1, 9.90, 1.00, 128, 131072)
    assert mean == pytest.approx(27.5e3, rel=0.01)
    assert PAPER_LENGTHS.mean == pytest.approx(mean, rel=1e-9)


def test_unscaled_samples_match_analytic_moments() -> None:
    sampler = LengthSampler(max_prompt_tokens=131072, seed=3, min_prompt_tokens=128)
    xs = sampler.sample(40_000)
    assert min(xs) >= 128 and max(xs) <= 131072
    mean = truncated_lognormal_moment(1, 9.90, 1.00, 128, 131072)
    second = truncated_lognormal_moment(2, 9.90, 1.00, 128, 131072)
    std = math.sqrt(second - mean**2)
    # Monte Carlo: the sample mean is within 4 standard errors, the std within 3 %.
    assert abs(statistics.fmean(xs) - mean) < 4 * std / math.sqrt(len(xs))
    assert statistics.pstdev(xs) == pytest.approx(std, rel=0.03)
    # The median of the truncated law: exp(mu + sigma * inv_cdf(mid of the kept mass)).
    a, b = _PHI(math.log(128) - 9.9), _PHI(math.log(131072) - 9.9)
    median = math.exp(9.9 + NormalDist().inv_cdf((a + b) / 2))
    assert statistics.median(xs) == pytest.approx(median, rel=0.03)


@pytest.mark.parametrize("max_prompt_tokens", [256, 8192])
def test_scaling_maps_the_range_and_keeps_the_shape(max_prompt_tokens: int) -> None:
    sampler = LengthSampler(max_prompt_tokens, seed=11)
    xs = sampler.sample(20_000)
    assert sampler.scale == max_prompt_tokens / 131072
    assert min(xs) >= sampler.scaled_low >= 2 and max(xs) <= max_prompt_tokens
    assert statistics.fmean(xs) == pytest.approx(sampler.expected_mean(), rel=0.03)
    share_long = sum(x > max_prompt_tokens / 4 for x in xs) / len(xs)
    unscaled = LengthSampler(131072, seed=11, min_prompt_tokens=128).sample(20_000)
    assert share_long == pytest.approx(sum(x > 32768 for x in unscaled) / len(unscaled), abs=0.01)


def test_truncation_clamps_to_the_bounds() -> None:
    xs = LengthSampler(max_prompt_tokens=64, seed=0).sample(5000)
    assert set(xs) <= set(range(2, 65)) and 2 in xs  # 128 * 64 / 131072 rounds below 2


def test_seeded_determinism() -> None:
    first = LengthSampler(4096, seed=5).sample(100)
    assert first == LengthSampler(4096, seed=5).sample(100)
    assert first[:10] == LengthSampler(4096, seed=5).sample(10)  # a prefix of the same stream
    assert first != LengthSampler(4096, seed=6).sample(100)


def test_bad_bounds_are_rejected() -> None:
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        LengthSampler(max_prompt_tokens=1)


@pytest.mark.parametrize("num_tokens", [2, 3, 17, 500])
def test_prompts_have_the_exact_length_and_are_deterministic(num_tokens: int) -> None:
    text = prompt_text(num_tokens, index=4, seed=9)
    assert len(text.encode()) == num_tokens - 1 and text.isascii()
    ids = prompt_ids(num_tokens, index=4, seed=9)
    assert len(ids) == num_tokens and ids[0] == 256
    assert prompt_text(num_tokens, 4, 9) == text and prompt_text(num_tokens, 5, 9) != text
