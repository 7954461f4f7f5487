"""Reporting: the per-rank timeline (Chrome trace)."""
