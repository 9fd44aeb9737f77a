"""TIR written as thread phases: loops bound to GPU blocks/threads or serial (a CPU rendition), cross-thread reductions.


Rules TVM 0.27's lowering imposes on such code (it inserts the barriers itself, ThreadSync):
- no barrier may fall inside a branch: every thread runs every phase; only stores are guarded, and a
  per-thread loop over work items has no bounds test (pad the shared buffers instead);
- no shared load inside a branch or Select condition: copy the value to a register first;
- a cross-thread reduction is recognised only with its reducer's exact identity (lowest float for max,
  0 for sum) and inside a scope block of its own (data-dependent loops around it defeat the analysis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import tirx
from tvm.script.ir_builder import tirx as T


@dataclass(frozen=True)
class Loops:
    """Parallel loops: bound to GPU threads/blocks, or serial (the CPU rendition)."""

    gpu: bool

    def blocks(self, n: int, axis: str = "x") -> Any:
        return T.thread_binding(0, n, thread=f"blockIdx.{axis}") if self.gpu else T.serial(0, n)

    def threads(self, n: int) -> Any:
        return T.thread_binding(0, n, thread="threadIdx.x") if self.gpu else T.serial(0, n)

    def last_first(self, index: Any, n: int) -> Any:
        """A block loop's index, counted down in the CPU rendition: GPU blocks run in any order, and a
        serial rendition in the natural order would hide a result that depends on it."""
        return index if self.gpu else n - 1 - index

    def div(self, a: Any, b: Any) -> Any:
        """a / b correctly rounded on the GPU too, whatever nvcc's math flags."""
        return tirx.call_pure_extern("float32", "__fdiv_rn", a, b) if self.gpu else a / b


def reduce_threads(name: str, op: str, src: Any, dst: Any, groups: int, width: int, loops: Loops) -> None:
    """dst[g] = op over t < width of src[g * width + t], for g < groups (shared buffers). A reduction block
    over the block's threads (warp shuffles on the GPU) in a scope block of its own, so that its loops are
    the only ones the cross-thread lowering has to analyse."""
    identity = tirx.min_value("float32") if op == "max" else tirx.const(0.0, "float32")
    with T.sblock(f"{name}_scope"):
        with T.serial(0, groups) as g:
            with loops.threads(width) as t:
                with T.sblock(name):
                    vg = T.axis.spatial(groups, g)
                    vt = T.axis.reduce(width, t)
                    T.reads(src[vg * width + vt])
                    T.writes(dst[vg])
                    with T.init():
                        T.buffer_store(dst, identity, [vg])
                    item = src[vg * width + vt]
                    T.buffer_store(dst, tirx.max(dst[vg], item) if op == "max" else dst[vg] + item, [vg])
