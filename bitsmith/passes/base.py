"""The pass interface: a named object whose `run(module, ctx)` returns a new module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bitsmith.compiler.ir import Module


@dataclass
class PassContext:
    """Mutable state passes share: the weight arrays (name -> array) and notes for the manifest."""

    weights: dict[str, np.ndarray]
    calibration: np.ndarray | None = None  # int64 [samples, seqlen] token ids, when a pass needs them
    notes: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def run(self, module: Module, ctx: PassContext) -> Module: ...
