"""What passes share: the context a pass reads and writes besides the module, with one typed field per result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitsmith.passes.kv_plan import KVPlan
from bitsmith.passes.quant.scheme import QuantizedWeight
from bitsmith.runtime.schedule import Schedule


@dataclass(frozen=True)
class Lowered:
    """What lower_to_kernels produces: the kernels to build and the schedules that call them."""

    specs: dict[str, Any]  # kernel name -> spec (codegen builds each)
    schedules: dict[str, Schedule]  # "rows<N>" -> the schedule of one entry point at N rows
    constants: dict[str, dict[str, Any]]  # constant table name -> {"dtype", "shape", "values"}
    kv: dict[str, Any]  # the KV plan the schedules were lowered for (KVPlan.to_json())


@dataclass
class PassContext:
    """State passes share besides the module. Passes return a new module but may replace entries of
    `weights` (quantize_weights, cast_weights, pack_weights and others write new arrays, never into an
    existing one); each other result has its own field, written by one pass."""

    weights: dict[str, np.ndarray]  # name -> array, what the artifact stores
    calibration: np.ndarray | None = None  # int64 [samples, seqlen] token ids, when a pass needs them
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # quantize_weights -> pack_weights
    kv_plan: KVPlan | None = None  # plan_kv_cache
    memory_estimate: dict[str, int] | None = None  # plan_kv_cache: weights / kv_cache / workspace bytes
    lowered: Lowered | None = None  # lower_to_kernels
    kernels_skipped: str | None = None  # lower_to_kernels, when not required: why there are no kernels
