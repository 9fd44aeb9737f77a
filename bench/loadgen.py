"""Closed-loop load for the serving benches: `concurrency` clients, each starting a new request as soon as its
last one finishes, until `total` requests have started."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


def closed_loop(concurrency: int, total: int, send: Callable[[int], Any], errors: tuple[type[BaseException], ...],
                stop_on_error: bool = False) -> tuple[list[Any], list[str], float]:
    """(results of send(1..total) in finishing order, error texts of those raising one of `errors`, wall seconds).
    A client whose request fails goes on to the next one, or stops when `stop_on_error`."""
    lock, started = threading.Lock(), [0]
    done: list[Any] = []
    failed: list[str] = []

    def client() -> None:
        while True:
            with lock:
                if started[0] >= total:
                    return
                started[0] += 1
                index = started[0]
            try:
                result = send(index)
            except errors as exc:  # reported by the caller, not lost in a thread
                with lock:
                    failed.append(f"{type(exc).__name__}: {exc}")
                if stop_on_error:
                    return
                continue
            with lock:
                done.append(result)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, failed, time.perf_counter() - t0
