"""Token sampling: greedy, or Gumbel-max with a per-request seeded generator (deterministic)."""

from __future__ import annotations

import torch

__all__ = ["sample_next", "seeded_generator"]


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """One token from ``logits`` (vocab,). Greedy when temperature is 0 (ties: lowest id).

    Sampling draws one uniform vector per token from the request's own generator, so the result
    depends only on the request's seed and its own logits, never on the rest of the batch.
    """
    if temperature <= 0.0 or generator is None:
        return int(torch.argmax(logits))
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
    return int(torch.argmax(logits.float() / temperature + gumbel))


def seeded_generator(seed: int, vocab_size: int, num_skipped_draws: int = 0) -> torch.Generator:
    """A request's generator, advanced past ``num_skipped_draws`` tokens' draws (one uniform
    vector of ``vocab_size`` per token, as ``sample_next`` draws), so a request that continues
    after tokens sampled elsewhere draws exactly what a single-engine run would."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_skipped_draws):
        torch.rand((vocab_size,), generator=generator, dtype=torch.float32)
    return generator
