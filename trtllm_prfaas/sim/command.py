"""``prfaas simulate ...``: the fluid-model case study (Table 6) and the discrete-event runs.

- ``case-study [--json]``: Table 6 beside the paper's values (one JSON line with ``--json``:
  ``{"prfaas_pd": {...}, "homogeneous": {...}, "naive": {...}}``).
- ``des [options] [--plots DIR]``: one discrete-event scenario; prints TTFT statistics.
- ``beyond [--json] [--plots DIR]``: ``dynamic_over_static_goodput`` and ``scale_1m_requests_s``.
- ``prefix [--json]``: cache-aware against cache-blind routing with modelled prefix caches.
"""

from __future__ import annotations

import argparse
import json

from trtllm_prfaas.policy.profile import Interpolation
from trtllm_prfaas.sim.experiments import (
    add_beyond_arguments,
    add_des_arguments,
    run_beyond,
    run_des,
)
from trtllm_prfaas.sim.fluid import (
    COLUMNS,
    PAPER_HEADLINES,
    PAPER_TABLE6,
    CaseStudyColumn,
    case_study,
    headlines,
)
from trtllm_prfaas.sim.prefix_figures import add_prefix_arguments, run_prefix

__all__ = ["add_arguments", "run"]


def add_arguments(command_name: str, parser: argparse.ArgumentParser) -> None:
    """Register the ``simulate`` scenarios on ``parser``."""
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO", required=True)
    case = sub.add_parser("case-study", help="the paper's Table 6 from the throughput model")
    case.add_argument("--json", action="store_true", help="print one JSON line")
    case.add_argument(
        "--interpolation",
        choices=[i.value for i in Interpolation],
        default=Interpolation.LOGLOG.value,
        help="how the H200 Table 5 points are interpolated (default loglog)",
    )

    add_des_arguments(sub.add_parser("des", help="one discrete-event simulation"))
    add_beyond_arguments(sub.add_parser("beyond", help="dynamic vs static t; 1M-request scale"))
    add_prefix_arguments(sub.add_parser("prefix", help="cache-aware vs cache-blind routing"))


def run(command_name: str, args: argparse.Namespace) -> int:
    """Run the chosen scenario; returns the exit status."""
    if args.scenario == "des":
        return run_des(args)
    if args.scenario == "beyond":
        return run_beyond(args)
    if args.scenario == "prefix":
        return run_prefix(args)
    columns = case_study(Interpolation(args.interpolation))
    if args.json:
        print(json.dumps({k: columns[k].as_dict() for k in COLUMNS}, sort_keys=False))
        return 0
    print(format_table(columns, headlines(columns, Interpolation(args.interpolation))))
    return 0


def _diff(ours: float | int | None, paper: float | int | None) -> str:
    if ours is None or paper is None:
        return "" if ours is None and paper is None else "n/a"
    return f"{(ours - paper) / paper:+.1%}" if paper else ""


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3f}"


def format_table(columns: dict[str, CaseStudyColumn], heads: dict[str, float]) -> str:
    """Human-readable side-by-side table: ours, paper, relative difference."""
    lines = [f"{'figure':<16}{'column':<13}{'ours':>10}{'paper':>10}{'diff':>9}"]
    for key in PAPER_TABLE6["prfaas_pd"]:
        for col in COLUMNS:
            ours = columns[col].as_dict()[key]
            paper = PAPER_TABLE6[col][key]
            if ours is None and paper is None:
                continue
            row = f"{key:<16}{col:<13}{_fmt(ours):>10}{_fmt(paper):>10}{_diff(ours, paper):>9}"
            lines.append(row)
    lines.append("")
    lines.append(f"{'headline':<28}{'ours':>10}{'paper':>10}{'diff':>9}")
    for key, ours in heads.items():
        paper = PAPER_HEADLINES.get(key)
        lines.append(f"{key:<28}{_fmt(ours):>10}{_fmt(paper):>10}{_diff(ours, paper):>9}")
    return "\n".join(lines)
