"""The plan that minimises predicted KLD under byte and latency budgets: a 0/1 integer linear program."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.errors import BitsmithError

# Why an ILP: each tensor takes exactly one scheme (a multiple-choice knapsack) under two budgets
# (bytes and latency). A DP would need both budgets discretised, and its table grows with their
# product; scipy's HiGHS MILP solves the exact problem for SmolLM2 (210 tensors x 7 choices) in well
# under a second, and reports infeasibility precisely, which gives the "smallest feasible" budget.


@dataclass(frozen=True)
class Choice:
    scheme: str
    bytes: int
    seconds: float
    kld: float


def solve(options: dict[str, list[Choice]], max_bytes: float, max_seconds: float | None) -> dict[str, Choice] | None:
    """One choice per tensor minimising sum(kld) with sum(bytes) <= max_bytes (and seconds); None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # heavy: scipy

    names = sorted(options)
    flat = [(name, c) for name in names for c in options[name]]
    n = len(flat)
    cost = np.array([c.kld for _, c in flat])
    rows, lo, hi = [], [], []
    for name in names:  # exactly one choice per tensor
        rows.append([1.0 if t == name else 0.0 for t, _ in flat])
        lo.append(1.0)
        hi.append(1.0)
    rows.append([float(c.bytes) for _, c in flat])
    lo.append(0.0)
    hi.append(float(max_bytes))
    if max_seconds is not None:
        rows.append([c.seconds for _, c in flat])
        lo.append(0.0)
        hi.append(float(max_seconds))
    result = milp(cost, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(n),
                  bounds=Bounds(0, 1), options={"time_limit": 60})
    if result.x is None or result.status not in (0, 1):
        return None
    picked = {name: c for (name, c), x in zip(flat, result.x) if x > 0.5}
    if len(picked) != len(names):
        raise BitsmithError("the solver returned a partial plan", where="search solver", fix="report this as a bug")
    return picked


def minimum_bytes(options: dict[str, list[Choice]]) -> int:
    return sum(min(c.bytes for c in choices) for choices in options.values())


def minimum_seconds(options: dict[str, list[Choice]]) -> float:
    return sum(min(c.seconds for c in choices) for choices in options.values())
