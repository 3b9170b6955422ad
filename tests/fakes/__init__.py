"""Fakes of external systems, each written from that system's source (see each module)."""
