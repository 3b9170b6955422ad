"""Simulations driven by ``policy/``: the fluid-model case study (``fluid``) and its CLI."""

from __future__ import annotations

__all__: list[str] = []
