"""``prfaas bench --url HOST:PORT``: a load generator on stock ``tritonclient.grpc``.

Lengths follow the paper's truncated log-normal scaled to ``--max-prompt-tokens`` (default: what
the server announces in its ModelConfig parameters, else 8192); arrivals are Poisson at
``--rate`` or closed-loop at ``--concurrency`` (default: concurrency 1); every request streams.
Prints TTFT/TPOT percentiles, throughput, failures by status and, with ``--metrics-url``, the
router's remote share, bytes relayed and egress Gbps (``--json``: one JSON line, fields in
``report.py``). A progress bar goes to stderr when it is a terminal (``--progress`` forces it).

Exit status: 0 when at least one request succeeded, 1 otherwise (or when the server cannot be
probed). Example::

    prfaas bench --url 127.0.0.1:8001 --rate 4 --num-requests 200 \\
        --metrics-url http://127.0.0.1:8002/metrics --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from trtllm_prfaas.loadgen.runner import BenchConfig, PromptKind, run_bench

__all__ = ["add_arguments", "config_from_args", "run"]


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """Register the ``bench`` flags on ``parser``."""
    parser.add_argument("--url", required=True, help="the front door's gRPC HOST:PORT")
    parser.add_argument("--model", default="tensorrt_llm", help="model name (tensorrt_llm)")
    parser.add_argument("--num-requests", type=int, default=100, help="requests to send (100)")
    arrivals = parser.add_mutually_exclusive_group()
    arrivals.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    arrivals.add_argument("--concurrency", type=int, help="requests kept in flight (default 1)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens (32)")
    parser.add_argument("--max-prompt-tokens", type=int,
                        help="the longest prompt; default from the server, else 8192")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (0)")
    parser.add_argument("--tokenizer", default="", metavar="DIR",
                        help="the served model's Hugging Face directory: prompt lengths in its "
                        "tokens (default: the reference byte tokenizer)")  # fmt: skip
    parser.add_argument("--prompt", choices=[k.value for k in PromptKind], default="text",
                        help="text_input (text) or input_ids (ids) prompts (text)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="lengths, prompts, arrivals (0)")
    parser.add_argument("--duration-s", type=float, help="stop sending after this many seconds")
    parser.add_argument("--request-timeout-s", type=float, default=60.0,
                        help="deadline of each request (60)")  # fmt: skip
    parser.add_argument("--run-timeout-s", type=float,
                        help="deadline of the whole run (duration + request timeout + 5, "
                             "else 3600)")  # fmt: skip
    parser.add_argument("--metrics-url", help="the router's Prometheus endpoint, scraped "
                        "before and after (http://HOST:8002/metrics)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: on a terminal)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The run's config from parsed flags; raises ConfigError on bad values."""
    concurrency = None if args.rate is not None else (args.concurrency or 1)
    if args.concurrency is not None and args.concurrency <= 0:
        concurrency = args.concurrency  # rejected by BenchConfig with its message
    return BenchConfig(
        url=args.url,
        model=args.model,
        num_requests=args.num_requests,
        rate_rps=args.rate,
        concurrency=concurrency,
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature,
        prompt_kind=PromptKind(args.prompt),
        seed=args.seed,
        duration_s=args.duration_s,
        request_timeout_s=args.request_timeout_s,
        run_timeout_s=args.run_timeout_s,
        metrics_url=args.metrics_url,
        tokenizer_dir=args.tokenizer,
    )


def run(command: str, args: argparse.Namespace) -> int:
    """Run the bench and print its report; returns the exit status (see the module docstring)."""
    config = config_from_args(args)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    report = asyncio.run(run_bench(config, sys.stderr if show else None))
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(report.format_text())
    return 0 if report.stats.num_ok > 0 else 1
