"""Passes over the IR, one per file; the ordered list lives in `bitsmith.pipeline`."""
