"""Passes over the IR, one per file, each a `Pass` (manager.py) with the facts it requires and provides; the phased
list lives in `bitsmith.pipeline`."""
