"""Benchmark: the (t, Np/Nd) solver on the case-study workload and on a live 64-bin histogram.

Prints one JSON line. Absolute times are noisy on shared machines, so each solver time is also
given as a ratio to an anchor measured in the same run: one evaluation of the throughput model
(Eqs 3-6 at a single threshold) on the same workload.

    python bench/solver.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtllm_prfaas.policy.model import Deployment, Workload, evaluate
from trtllm_prfaas.policy.solver import solve
from trtllm_prfaas.policy.workload import HistogramLengths
from trtllm_prfaas.sim.fluid import case_study_system, case_study_workload

__all__ = ["main"]


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches and imports
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _histogram_workload(num_bins: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(9.90, 1.00, 50_000))
    hist = HistogramLengths.from_samples(lengths, lo=128, hi=131072, num_bins=num_bins)
    return Workload(hist, output_tokens=1024)


def measure(repeats: int) -> dict[str, float]:
    """Median seconds of each operation and the ratios to the anchor."""
    system = case_study_system()
    parametric, histogram = case_study_workload(), _histogram_workload(64, seed=0)
    dep = Deployment(4, 3, 5)
    anchor = _median_s(lambda: evaluate(system, histogram, dep, 19400.0), repeats * 10)
    solve_param = _median_s(lambda: solve(system, parametric, 4, 8), repeats)
    solve_hist = _median_s(lambda: solve(system, histogram, 4, 8), repeats)
    return {
        "solve_parametric_ms": solve_param * 1e3,
        "solve_histogram64_ms": solve_hist * 1e3,
        "anchor_evaluate_ms": anchor * 1e3,
        "solve_parametric_over_anchor": solve_param / anchor,
        "solve_histogram64_over_anchor": solve_hist / anchor,
        "budget_ms": 50.0,
        "repeats": float(repeats),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; ``--json`` prints one JSON line, otherwise a short table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<32}{value:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
