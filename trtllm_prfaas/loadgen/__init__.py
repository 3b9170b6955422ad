"""``prfaas bench``: a load generator for the front door over stock ``tritonclient.grpc``.

Modules, along the data path of a run:

- ``lengths``: the paper's truncated log-normal prompt lengths, scaled to the model;
- ``prompts``: deterministic text or token-id prompts of an exact length;
- ``client``: the server probe and one streamed request -> ``RequestRecord``;
- ``runner``: ``BenchConfig`` and ``run_bench`` (Poisson or closed-loop arrivals, deadlines);
- ``scrape``: the router's Prometheus counters before and after;
- ``stats`` / ``report``: percentiles, throughput, failures; text or one JSON line;
- ``command``: the ``prfaas bench`` CLI edge.

Example::

    import asyncio
    from trtllm_prfaas.loadgen import BenchConfig, run_bench

    report = asyncio.run(run_bench(BenchConfig(url="127.0.0.1:8001", rate_rps=2.0,
                                               concurrency=None, num_requests=20)))
    print(report.format_text())
"""

from __future__ import annotations

from trtllm_prfaas.loadgen.lengths import PAPER_LENGTHS, LengthSampler
from trtllm_prfaas.loadgen.report import BenchReport
from trtllm_prfaas.loadgen.runner import BenchConfig, BenchError, PromptKind, run_bench
from trtllm_prfaas.loadgen.stats import RequestRecord, percentile

__all__ = [
    "PAPER_LENGTHS",
    "BenchConfig",
    "BenchError",
    "BenchReport",
    "LengthSampler",
    "PromptKind",
    "RequestRecord",
    "percentile",
    "run_bench",
]
