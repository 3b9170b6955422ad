"""The bench scripts import each other as top-level modules (they run as ``python bench/X.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = str(Path(__file__).resolve().parents[2] / "bench")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
