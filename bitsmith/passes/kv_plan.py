"""KV-cache planning math: block size, block count and per-layer KV dtype under a memory budget (no IR)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from bitsmith.errors import BitsmithError
from bitsmith.runtime.kv_cache import ring_blocks_needed
from bitsmith.runtime.kv_layout import token_bytes

KV_DTYPES = ("float32", "float16", "int8", "int4")
BLOCK_SIZES = (8, 16, 32, 64)  # tokens per KV block
AUTO_LADDER = ("float16", "int8", "int4")  # auto: the first of these whose cache fits the budget
# Pool layout, one per layer (what the paged attention kernels read; runtime/kv_layout.py per dtype):
#
#   pool[num_blocks, 2, block_size, kv_heads, head_dim]      [b, 0] keys, [b, 1] values of block b
#   scales[num_blocks, 2, block_size, kv_heads] (int8)       one fp32 scale per token and kv head
#   int4: pool[..., head_dim / 2] uint8 (two codes a byte), scales[..., kv_heads, 2] (step, min)
#
#   sequence block table: logical block i (tokens i*bs .. i*bs+bs-1) -> physical block number
#   +---+---+---+---+
#   | 7 | 2 | 9 | . |   a sequence of 2.5 blocks; blocks shared by a common prefix appear in
#   +---+---+---+---+   several tables (read-only, reference counted)
#
# Sliding-window layers (Mistral, Gemma 2/3's local layers) only read a sequence's last `window` tokens.
# When that is less than the context, those layers get their own pools of ring_slots x ring_blocks blocks:
# sequence slot s owns blocks s*ring_blocks .. (s+1)*ring_blocks-1 of them, logical block i in ring entry
# i % ring_blocks, so their KV memory is bounded by the window (plus one call's rows), not the context.


def parse_bytes(text: str | int | None) -> int | None:
    """'2GB', '512MiB', '80MB', '1.5G', 1000 -> bytes (decimal for KB/MB/GB, binary for KiB/MiB/GiB)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise BitsmithError(f"cannot read the size {text!r}", where="--memory", fix="write e.g. 2GB, 512MiB or 80MB")
    value, unit, binary = float(match.group(1)), match.group(2), match.group(3)
    base = 1024 if binary else 1000
    return int(value * base ** " kmgt".index(unit or " "))


@dataclass(frozen=True)
class KVPlanOptions:
    """What the user asks of the KV cache: a total memory budget, the context and the concurrency."""

    memory: int | None = None  # total bytes for weights + KV cache + workspace; None: no limit
    max_context: int = 2048
    concurrency: int = 4  # sequences expected at once, each up to max_context tokens
    kv_dtype: str = "auto"  # auto: float16 unless the budget forces int8, then int4
    block_size: int = 16
    # the most rows one kernel call writes (lower_to_kernels' largest step, PREFILL_ROWS): a ring holds the
    # window + that many positions; lower_to_kernels refuses larger steps on a plan with rings
    chunk_rows: int = 64
    # the budget's origin for the refusal, e.g. "raspberry-pi-4 (3.1 GiB: 4 GiB RAM less ...)"; "": --memory
    device: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KVPlan:
    block_size: int
    num_blocks: int
    max_blocks: int  # blocks one sequence can hold (max_context / block_size)
    layer_dtypes: tuple[str, ...]
    kv_heads: int
    head_dim: int
    max_context: int
    concurrency: int
    layer_windows: tuple[int, ...] = ()  # per layer: its sliding window, 0 for global attention (() = all 0)
    ring_blocks: int = 0  # blocks of a windowed layer's ring per sequence (0: windowed layers use the full table)
    ring_slots: int = 0  # sequences the ring pools hold at once

    def ring_layer(self, layer: int) -> bool:
        """Whether `layer` keeps its KV in a ring (a windowed layer, when rings are planned)."""
        return bool(self.ring_blocks and self.layer_windows and self.layer_windows[layer])

    def layer_blocks(self, layer: int) -> int:
        """Blocks of `layer`'s pool: ring_slots x ring_blocks for a ring layer, else num_blocks."""
        return self.ring_slots * self.ring_blocks if self.ring_layer(layer) else self.num_blocks

    def layer_bytes(self, layer: int) -> int:
        return self.block_bytes(self.layer_dtypes[layer]) * self.layer_blocks(layer)

    @property
    def bytes(self) -> int:
        return sum(self.layer_bytes(i) for i in range(len(self.layer_dtypes)))

    def block_bytes(self, dtype: str) -> int:
        return token_bytes(dtype, self.kv_heads, self.head_dim) * self.block_size

    def to_json(self) -> dict:
        data = asdict(self)
        data["layer_dtypes"] = list(self.layer_dtypes)
        data["layer_windows"] = list(self.layer_windows)
        data["layer_bytes"] = [self.layer_bytes(i) for i in range(len(self.layer_dtypes))]
        data["bytes"] = self.bytes
        data["layout"] = ("pool[num_blocks, 2, block_size, kv_heads, head_dim] per layer (+ fp32 scales[.., kv_heads] "
                          "for int8; int4: uint8 pool[.., head_dim / 2] + fp32 (step, min) scales[.., kv_heads, 2])")
        return data

    @classmethod
    def from_json(cls, data: dict) -> "KVPlan":
        fields = {k: data[k] for k in ("block_size", "num_blocks", "max_blocks", "kv_heads", "head_dim",
                                        "max_context", "concurrency")}
        rings = {k: data.get(k, 0) for k in ("ring_blocks", "ring_slots")}  # (absent in older manifests)
        return cls(layer_dtypes=tuple(data["layer_dtypes"]), layer_windows=tuple(data.get("layer_windows", ())),
                   **rings, **fields)


def layer_dtypes_for(kind: str, num_layers: int) -> tuple[str, ...]:
    """int8 and int4 keep the first and last layer at float16 (their KV is the most sensitive, and two layers
    of many cost little); others uniform."""
    if kind in ("int8", "int4") and num_layers > 2:
        return ("float16",) + (kind,) * (num_layers - 2) + ("float16",)
    return (kind,) * num_layers


def plan_kv_cache(options: KVPlanOptions, num_layers: int, kv_heads: int, head_dim: int, weight_bytes: int,
                  workspace_bytes: int, layer_windows: tuple[int | None, ...] = (), weight_params: int = 0) -> KVPlan:
    """The plan for `options`, or a BitsmithError that says what would fit instead. `layer_windows`: each
    layer's sliding window (None/0: global); windowed layers get rings when that saves memory. `weight_params`
    (logical parameters) lets the refusal name the bits per weight that would fit."""
    bs = options.block_size
    if bs not in BLOCK_SIZES:
        raise BitsmithError(f"block size {bs} is not supported", where="kv plan", fix="use 8, 16, 32 or 64")
    if options.max_context % bs:
        raise BitsmithError(f"context {options.max_context} is not a multiple of the block size {bs}",
                            where="kv plan", fix=f"use --context {options.max_context // bs * bs or bs}")
    max_blocks = options.max_context // bs
    needed = max_blocks * options.concurrency
    kinds = AUTO_LADDER if options.kv_dtype == "auto" else (options.kv_dtype,)
    if options.kv_dtype not in KV_DTYPES + ("auto",):
        raise BitsmithError(f"unknown KV dtype {options.kv_dtype!r}", where="kv plan", fix=f"use auto or one of {KV_DTYPES}")
    if options.kv_dtype == "int4" and head_dim % 2:
        raise BitsmithError(f"int4 KV packs two codes a byte and head_dim {head_dim} is odd", where="kv plan",
                            fix="use --kv-dtype int8")
    if options.kv_dtype == "auto" and head_dim % 2:
        kinds = kinds[:-1]

    windows = tuple(int(w or 0) for w in layer_windows) or (0,) * num_layers
    ring = ring_blocks_needed(max(windows), options.chunk_rows, bs) or 0
    ring = ring if ring < max_blocks else 0  # a ring as long as the context saves nothing

    def plan(kind: str, blocks: int) -> KVPlan:
        return KVPlan(bs, blocks, max_blocks, layer_dtypes_for(kind, num_layers), kv_heads, head_dim,
                      options.max_context, options.concurrency, windows, ring, options.concurrency if ring else 0)

    if options.memory is None:
        return plan(kinds[0], needed)
    room = options.memory - weight_bytes - workspace_bytes
    for kind in kinds:
        rings = plan(kind, 0).bytes  # the ring pools: fixed by the window, the chunk and the concurrency
        per_block = plan(kind, 1).bytes - rings  # a block of every global layer
        spare = room - rings
        fit = (spare // per_block if per_block else 4 * needed) if spare >= 0 else 0
        if fit >= needed:
            # spare budget becomes prefix-cache headroom, up to 4x what the sequences need
            return plan(kind, int(min(fit, 4 * needed)))
    raise _does_not_fit(options, plan, room, weight_bytes, workspace_bytes, needed, weight_params,
                        AUTO_LADDER if head_dim % 2 == 0 else AUTO_LADDER[:-1])


def _does_not_fit(options: KVPlanOptions, plan, room: int, weight_bytes: int, workspace_bytes: int,
                  needed: int, weight_params: int, ladder: tuple[str, ...]) -> BitsmithError:
    mib = 2 ** 20
    low = ladder[-1]  # the smallest KV dtype this model can use
    smallest = plan(low, needed).bytes

    def largest_context(space: int, kind: str) -> int:
        return max(space, 0) // options.concurrency // plan(kind, 1).bytes * options.block_size

    hints = []
    for kind in ladder:
        per_seq = plan(kind, needed // options.concurrency).bytes
        if room > 0:
            ctx = largest_context(room, kind)
            seqs = room // per_seq
            if ctx >= options.block_size:
                hints.append(f"--context {ctx} with {kind} KV")
            if seqs >= 1:
                hints.append(f"--concurrency {seqs} with {kind} KV")
    if weight_params:
        now = 8 * weight_bytes / weight_params
        fit_bits = 8 * (options.memory - workspace_bytes - smallest) / weight_params
        if fit_bits >= 2:  # the fewest bits a scheme has (int2 + its scales is a little more)
            hints.append(f"weights of at most {fit_bits:.1f} bits/weight on average (now {now:.1f}) with {low} KV")
        if largest_context(room, low) < options.block_size and now > 5:
            # ~5 bits/weight: int4 with group-128 fp16 scales and a 16-bit embedding table (measured: a 1.7B
            # Llama shape at int4-g32 without kept layers, untied lm_head, stores 5.36 bits/weight; g128 ~4.8)
            ctx = largest_context(options.memory - workspace_bytes - weight_params * 5 // 8, low)
            if ctx >= options.block_size:
                hints.append(f"--context {ctx} with {low} KV and weights at ~5 bits/weight "
                             f"(--method rtn --bits 4 --no-keep-default)")
    if options.device:
        hints.append(f"`bitsmith search --device {options.device.split()[0]} --context {options.max_context}` to "
                     f"pick per-layer bits")
        budget = f"{options.device} holds {options.memory / mib:.0f} MiB for the model, which"
    else:
        hints.append(f"--memory {(weight_bytes + workspace_bytes + smallest) / mib:.0f}MiB ({low} KV), or fewer weight bits")
        budget = f"the budget of {options.memory / mib:.1f} MiB"
    return BitsmithError(
        f"{budget} does not fit weights {weight_bytes / mib:.1f} MiB + workspace "
        f"{workspace_bytes / mib:.1f} MiB + a KV cache for {options.concurrency} x {options.max_context} tokens "
        f"(at least {smallest / mib:.1f} MiB with {low} KV)", where="kv plan", fix="try " + "; or ".join(hints))
