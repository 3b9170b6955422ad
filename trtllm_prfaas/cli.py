"""The ``prfaas`` command line: the edge where configuration is read and logging is set up.

Each subcommand lives in its own module that exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``prfaas --help``
stays fast and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from trtllm_prfaas.errors import PrfaasError
from trtllm_prfaas.telemetry.logging import configure_logging

__all__ = ["console", "main"]

# name -> (module implementing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("trtllm_prfaas.engines.commands", "run a short generation with the reference engine"),
    "generate": (
        "trtllm_prfaas.engines.commands",
        "generate text from a prompt with the reference engine",
    ),
    "simulate": ("trtllm_prfaas.sim.command", "throughput model and discrete-event simulations"),
    "worker": ("trtllm_prfaas.worker.command", "run a prefill or decode worker"),
    "router": ("trtllm_prfaas.router.command", "run the router in front of a list of workers"),
    "netns": (
        "trtllm_prfaas.testbed.netns_command",
        "datacenters as network namespaces joined by a shaped WAN (root)",
    ),
    "up": ("trtllm_prfaas.testbed.up", "start the embedded two-datacenter testbed"),
    "bench": ("trtllm_prfaas.loadgen.command", "load generator over tritonclient"),
    "triton-repo": ("trtllm_prfaas.deploy.command", "write a PrfaaS Triton model repository"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prfaas", description="Prefill-as-a-Service for TensorRT-LLM"
    )
    parser.add_argument("--log-level", default="WARNING", help="structlog level (default WARNING)")
    parser.add_argument("--log-json", action="store_true", help="emit logs as JSON lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (callable from tests)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    top, rest = parser.parse_known_args(args_list)
    if top.command is None:
        parser.print_help()
        return 2
    configure_logging(top.log_level, json=top.log_json)
    module = importlib.import_module(COMMANDS[top.command][0])
    sub = argparse.ArgumentParser(
        prog=f"prfaas {top.command}", description=COMMANDS[top.command][1]
    )
    module.add_arguments(top.command, sub)
    args = sub.parse_args(rest)
    try:
        return int(module.run(top.command, args))
    except PrfaasError as exc:
        print(f"prfaas {top.command}: error: {exc}", file=sys.stderr)
        return 1


def console() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
