"""Prompt lengths for the bench: the paper's truncated log-normal, scaled to the served model.

The paper's workload (section 3.4) draws input lengths from ``ln L ~ Normal(9.90, 1.00)``
truncated to ``[128, 131072]`` tokens (mean about 27.5K). A served model usually takes far
less, so ``LengthSampler`` scales the distribution multiplicatively: a paper length ``L`` becomes
``round(L * max_prompt_tokens / 131072)``, clamped to ``[min_prompt_tokens, max_prompt_tokens]``.
Multiplying a log-normal by a constant only shifts ``mu`` by ``ln(scale)``, so the shape (the
share of long prompts, the ratio of mean to max) is the paper's at any scale.

Sampling is inverse-CDF with a private ``random.Random(seed)``: the same seed gives the same
lengths on every machine and Python version, independent of anything else the bench draws.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.workload import TruncatedLogNormal

__all__ = ["MIN_PROMPT_TOKENS", "PAPER_LENGTHS", "LengthSampler"]

PAPER_LENGTHS = TruncatedLogNormal(mu=9.90, sigma=1.00, lo=128.0, hi=131072.0)
# BOS plus one byte: the shortest prompt whose text_input is not empty.
MIN_PROMPT_TOKENS = 2
_STD_NORMAL = NormalDist()


@dataclass(frozen=True)
class LengthSampler:
    """Draws prompt lengths (tokens) from ``distribution`` scaled so ``hi`` maps to
    ``max_prompt_tokens``. Validated on construction; ``sample`` is deterministic per seed."""

    max_prompt_tokens: int
    seed: int = 0
    distribution: TruncatedLogNormal = PAPER_LENGTHS
    min_prompt_tokens: int = MIN_PROMPT_TOKENS

    def __post_init__(self) -> None:
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise ConfigError(
                f"max_prompt_tokens {self.max_prompt_tokens} must be >= min_prompt_tokens "
                f"{self.min_prompt_tokens} >= 1"
            )

    @property
    def scale(self) -> float:
        """Served tokens per paper token."""
        return self.max_prompt_tokens / self.distribution.hi

    @property
    def scaled_low(self) -> int:
        """The shortest length drawn: the paper's ``lo`` after scaling and clamping."""
        return self._clamp(self.distribution.lo * self.scale)

    def expected_mean(self) -> float:
        """The analytic mean of the scaled distribution before rounding and clamping."""
        return self.distribution.mean * self.scale

    def sample(self, num: int) -> list[int]:
        """``num`` lengths; the same ``(seed, num)`` always gives the same list, and a longer
        draw extends a shorter one (the stream is consumed in order)."""
        d, rng = self.distribution, random.Random(self.seed)
        # Inverse CDF of the truncated law: a uniform on the kept normal mass [p_lo, p_hi].
        p_lo = _STD_NORMAL.cdf((math.log(d.lo) - d.mu) / d.sigma)
        p_hi = _STD_NORMAL.cdf((math.log(d.hi) - d.mu) / d.sigma)
        lengths = []
        for _ in range(num):
            p = min(max(p_lo + rng.random() * (p_hi - p_lo), 1e-300), 1 - 1e-16)
            paper = min(max(math.exp(d.mu + d.sigma * _STD_NORMAL.inv_cdf(p)), d.lo), d.hi)
            lengths.append(self._clamp(paper * self.scale))
        return lengths

    def _clamp(self, tokens: float) -> int:
        return min(max(round(tokens), self.min_prompt_tokens), self.max_prompt_tokens)
