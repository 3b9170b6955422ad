"""``prfaas router``'s flags: each one parsed by the same function that parses its ``--config``
key (``router/settings.py``), so a bad flag exits 2 (argparse) with the message a bad key gets.
A flag left out is None, so the file's value or the default applies.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trtllm_prfaas.discovery.membership import DEFAULT_NAMESPACE, parse_discovery
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router.settings import (
    DEFAULT_GRACE_S,
    DEFAULT_LISTEN,
    parse_listen,
    parse_namespace,
    parse_worker,
)

__all__ = ["add_arguments"]


def _argparse_type(parse: Any) -> Any:
    """Turn a ConfigError-raising parser into an argparse ``type`` (bad flags exit 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = parse.__name__
    return convert


# ---------------------------------------------------------------------------- flags
def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="router YAML file")
    listen = _argparse_type(parse_listen)
    _optional(parser, "--listen", listen, f"KServe v2 gRPC (default {DEFAULT_LISTEN})", "HOST:PORT")
    _optional(
        parser, "--metrics-listen", listen, "Prometheus /metrics (default: none)", "HOST:PORT"
    )
    _optional(parser, "--http-listen", listen, "KServe v2 REST (default: none)", "HOST:PORT")
    _optional(
        parser, "--openai-listen", listen, "OpenAI-compatible API (default: none)", "HOST:PORT"
    )
    parser.add_argument(
        "--worker",
        action="append",
        default=None,
        type=_argparse_type(parse_worker),
        metavar="CLUSTER/ROLE=HOST:PORT",
        help="a worker's control endpoint; repeat for each worker (ROLE: prefill or decode)",
    )
    parser.add_argument(
        "--discovery",
        type=_argparse_type(parse_discovery),
        default=None,
        metavar="etcd://HOST:PORT[,HOST:PORT]",
        help="also route to the workers registered in etcd, as they come and go",
    )
    parser.add_argument(
        "--namespace",
        type=_argparse_type(parse_namespace),
        default=None,
        help=f"membership namespace (keys /NS/workers/...; default {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--prfaas-cluster",
        action="append",
        default=None,
        metavar="CLUSTER",
        help="a PrfaaS (remote prefill) cluster; repeatable (default: dc-remote)",
    )
    parser.add_argument("--model-name", default=None, help="served model (default tensorrt_llm)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="DIR",
        help="the served model's Hugging Face directory (default: the reference byte tokenizer)",
    )
    parser.add_argument(
        "--curve-keys",
        type=Path,
        default=None,
        metavar="FILE",
        help="control-plane Curve keys: this router's pair and the workers' public key",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        default=None,
        help="control sockets without encryption or authentication (warned)",
    )
    parser.add_argument(
        "--prefix-routing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="route by the prefixes workers hold (default); --no-prefix-routing: cache-blind, "
        "as if no node held any (their caches stay on)",
    )
    positive = _above(0.0)
    _optional(parser, "--threshold-tokens", _at_least(int, 0), "initial t (default 1024)")
    _optional(parser, "--link-gbps", positive, "PrfaaS egress capacity (default: measured)")
    parser.add_argument(
        "--fixed-threshold", action="store_true", default=None, help="keep t (no control loop)"
    )
    _optional(parser, "--connect-timeout-s", positive, "each worker must answer by then (30)")
    _optional(parser, "--announce-timeout-s", positive, "decode waits this for its transfer (30)")
    _optional(parser, "--prefill-timeout-s", positive, "no t1 by then: decode runs it all (120)")
    _optional(parser, "--worker-silence-s", positive, "a silent prefill worker is given up (10)")
    _optional(parser, "--worker-lost-s", positive, "a dead connection is noticed within this (3)")
    _optional(parser, "--request-timeout-s", positive, "deadline when the client sets none (300)")
    _optional(
        parser,
        "--grace-s",
        _at_least(float, 0.0),
        f"SIGTERM: requests in flight get this ({DEFAULT_GRACE_S:g})",
    )


def _optional(
    parser: argparse.ArgumentParser, flag: str, kind: Any, help_text: str, metavar: str = "N"
) -> None:
    """A flag whose absence is None (so a ``--config`` value or the default applies)."""
    parser.add_argument(flag, type=kind, default=None, help=help_text, metavar=metavar)


def _above(low: float) -> Any:
    """An argparse type: a float > ``low`` (anything else exits 2 naming the flag)."""

    def number_above(text: str) -> float:
        value = float(text)
        if not value > low:
            raise argparse.ArgumentTypeError(f"must be > {low:g}, got {text}")
        return value

    return number_above


def _at_least(kind: Any, low: float) -> Any:
    """An argparse type: a ``kind`` number >= ``low``."""

    def number_at_least(text: str) -> Any:
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    number_at_least.__name__ = kind.__name__
    return number_at_least
