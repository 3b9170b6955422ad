"""A plain-text progress bar on a text stream (stderr), redrawn in place with ``\\r``.

``update`` redraws at most every ``min_interval_s`` seconds; ``finish`` draws the last state
and ends the line. A disabled bar writes nothing. No dependency beyond the standard library.
"""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Counts of a run: ``done`` of ``total`` (ok + failed), and how many are in flight."""

    def __init__(
        self, total: int, stream: TextIO, enabled: bool = True, min_interval_s: float = 0.1,
        width: int = 30,
    ) -> None:  # fmt: skip
        self.total, self.stream, self.enabled = total, stream, enabled
        self.min_interval_s, self.width = min_interval_s, width
        self.started_at = time.monotonic()
        self._drawn_at = 0.0
        self._drawn_len = 0  # pad a shorter redraw over the previous one
        self.num_ok = self.num_failed = self.num_in_flight = 0

    def sent(self) -> None:
        self.num_in_flight += 1
        self._maybe_draw()

    def finished(self, is_ok: bool) -> None:
        self.num_in_flight -= 1
        if is_ok:
            self.num_ok += 1
        else:
            self.num_failed += 1
        self._maybe_draw()

    def finish(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self.stream.write(self.render() + "\n")
            self.stream.flush()

    def render(self) -> str:
        done = self.num_ok + self.num_failed
        filled = self.width * done // self.total if self.total else self.width
        elapsed_s = time.monotonic() - self.started_at
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        line = (
            f"bench [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
            f"ok {self.num_ok} failed {self.num_failed} in flight {self.num_in_flight} "
            f"{rate:.1f} req/s {elapsed_s:.1f}s"
        )
        self._drawn_len = max(self._drawn_len, len(line))
        return "\r" + line.ljust(self._drawn_len)

    def _maybe_draw(self) -> None:
        now = time.monotonic()
        if self.enabled and now - self._drawn_at >= self.min_interval_s:
            self._drawn_at = now
            self.stream.write(self.render())
            self.stream.flush()
