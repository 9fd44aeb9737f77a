"""Auto-search of per-layer bit widths under memory and latency budgets."""
