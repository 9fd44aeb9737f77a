"""Frontends: each turns one checkpoint format into a `Checkpoint` or directly into IR."""
