"""What passes share: the context a pass reads and writes besides the module, with one typed field per result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitsmith.compiler.weight_store import WeightStore
from bitsmith.passes.kv_plan import KVPlan
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme
from bitsmith.runtime.schedule import Schedule


@dataclass(frozen=True)
class Lowered:
    """What lower_to_kernels produces: the kernels to build and the schedules that call them."""

    specs: dict[str, Any]  # kernel name -> spec (codegen builds each)
    schedules: dict[str, Schedule]  # "rows<N>" -> the schedule of one entry point at N rows
    constants: dict[str, dict[str, Any]]  # constant table name -> {"dtype", "shape", "values"}
    kv: dict[str, Any]  # the KV plan the schedules were lowered for (KVPlan.to_json())
    # weight -> why its matmul keeps float32 activations although int8 ones were allowed (the compile log says so)
    float_activations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizedInfo:
    """What quantize_weights tells pack_weights about a weight it quantized (the packed parts are in weights)."""

    scheme: QuantScheme
    out_features: int
    in_features: int
    has_perm: bool = False  # act-order: a `perm` part gathers the input columns
    source_type: str | None = None  # imported weights: the source's type name (e.g. GGUF "Q4_K", "gptq")


@dataclass
class PassContext:
    """State passes share besides the module. Passes return a new module but may replace entries of
    `weights` (quantize_weights, cast_weights, pack_weights and others write new arrays, never into an
    existing one); each other result has its own field, written by one pass. A plain dict of weights is
    wrapped in a WeightStore (in memory, no spilling)."""

    weights: WeightStore  # name -> array, what the artifact stores (read lazily, see weight_store.py)
    calibration: np.ndarray | None = None  # int64 [samples, seqlen] token ids, when a pass needs them
    quantized: dict[str, QuantizedInfo] = field(default_factory=dict)  # quantize_weights -> pack_weights
    # the frontend's pre-quantized weights (LoadedModel.quantized): name -> (codes, source type name)
    imported: dict[str, tuple[QuantizedWeight, str]] = field(default_factory=dict)
    # choose_rotations: "r1" [hidden, hidden] and "r2" [head_dim, head_dim] orthogonal float64 matrices (rotate_*)
    rotations: dict[str, np.ndarray] = field(default_factory=dict)
    kv_plan: KVPlan | None = None  # plan_kv_cache
    memory_estimate: dict[str, int] | None = None  # plan_kv_cache: weights / kv_cache / workspace bytes
    lowered: Lowered | None = None  # lower_to_kernels

    def __post_init__(self) -> None:
        if not isinstance(self.weights, WeightStore):
            self.weights = WeightStore(self.weights)
