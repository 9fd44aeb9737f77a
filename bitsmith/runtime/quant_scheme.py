"""Weight quantization schemes, the quantized-weight container, and group-wise dequantization.

Groups: a weight [out, in] is split along `in` into groups of `group_size` consecutive columns,
group i covering columns [i*g, min((i+1)*g, in)); every (row, group) pair has its own scale (and
zero point when asymmetric). When g does not divide `in` the LAST group is partial and holds the
remaining `in % g` columns (SmolLM2's 576 with g128: four full groups and one of 64 columns), so
n_groups = ceil(in / g). group_size -1 means one group per output row (per-channel).

Dequantization: w = (q - z) * s with q in [0, 2^bits). Asymmetric schemes store a float16 zero
point z per group, generally fractional (z = -min / s); symmetric schemes store none and use the
constant z = 2^(bits-1), i.e. the signed range [-2^(bits-1), 2^(bits-1) - 1].

Min form (`offset`, imported from GGUF): w = s * q + m, with the float offset m stored per group in
place of z (llama.cpp's Q4_1/Q5_1 min, and -dmin * mn for K-quants). It is not the same as a zero
point: z = -m / s would round, and the import must keep the source's values exactly.

Super-groups (`super_group` 256, GGUF K-quants): the per-group scales (and, in min form, offsets)
are themselves quantized, as int8 codes times one float16 per 256 columns:

    columns:  |<------------------- 256 (one super-group) ------------------->|
    groups:   | g0 (16 or 32) | g1 | ... |                                   g7/g15 |
    s[o, g] = f32(super_scales[o, g // (256/G)]) * f32(scales[o, g])     (int8 code; exact in f32)
    m[o, g] = f32(super_zeros[o, g // (256/G)])  * f32(zeros[o, g])      (min form only)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from bitsmith.errors import BitsmithError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128, -1)
QUANTIZER_METHODS = ("rtn", "gptq", "awq", "hqq")  # what bitsmith quantizes with (hqq: no calibration data)
CALIBRATION_FREE_METHODS = ("rtn", "hqq")  # quantize from the weights alone (streamed, no calibration pass)
SUPPORTED_METHODS = (*QUANTIZER_METHODS, "imported")  # imported: codes taken as they are from a quantized source
SUPER_GROUP = 256  # columns per K-quant super-group
PER_CHANNEL = -1
DEFAULT_GROUP_SIZE = 128

SCHEME_GRAMMAR = """\
scheme := "int" BITS ( "-" option )*     BITS in 2 3 4 5 6 8
option := "g" SIZE      group size, SIZE in 16 32 64 128     (default g128)
        | "pc"          per-output-channel (one group per row)
        | "sym" | "asym" | "min"                               (default sym; min: w = s*q + m)
        | "s256"        scales (and mins) as int8 codes x fp16 per 256 columns (K-quants)
        | "rtn" | "gptq" | "awq" | "hqq" | "imported"          (default rtn)
each kind of option at most once, in any order; e.g. "int4", "int4-g32-asym", "int3-pc-gptq",
"int4-g32-min-s256-imported" (GGUF Q4_K)."""


@dataclass(frozen=True)
class QuantScheme:
    """How one weight is quantized: bit width, group size (-1: per channel), symmetry, method; `offset`: min form
    (w = s*q + m, asymmetric only); `super_group`: 0, or 256 for K-quant int8 scale codes x fp16 per 256 columns."""

    bits: int
    group_size: int
    sym: bool
    method: str
    offset: bool = False
    super_group: int = 0

    def __post_init__(self) -> None:
        def bad(problem: str, fix: str) -> BitsmithError:
            return BitsmithError(problem, where="QuantScheme", fix=fix)

        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise bad(f"unsupported bit width {self.bits!r}", f"use one of {SUPPORTED_BITS}")
        if isinstance(self.group_size, bool) or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise bad(f"unsupported group size {self.group_size!r}",
                      f"use one of {SUPPORTED_GROUP_SIZES} (-1 = per output channel)")
        if not isinstance(self.sym, bool) or not isinstance(self.offset, bool):
            raise bad(f"sym and offset must be bools, got {self.sym!r}, {self.offset!r}",
                      "use one of (True, False): sym True = symmetric, offset True = min form")
        if self.method not in SUPPORTED_METHODS:
            raise bad(f"unsupported quantization method {self.method!r}", f"use one of {SUPPORTED_METHODS}")
        if self.offset and self.sym:
            raise bad("the min form (offset) is asymmetric", "give sym=False with offset=True ('int4-g32-min')")
        if self.super_group not in (0, SUPER_GROUP):
            raise bad(f"unsupported super-group {self.super_group!r}", f"use 0 or {SUPER_GROUP} ('s256')")
        if self.super_group and (self.group_size not in (16, 32) or not (self.sym or self.offset)):
            raise bad(f"super-groups need groups of 16 or 32 and a sym or min form, got {self.short_name()}",
                      "write e.g. 'int4-g32-min-s256' (Q4_K) or 'int6-g16-sym-s256' (Q6_K)")

    @property
    def qmax(self) -> int:
        """Largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    def short_name(self) -> str:
        group = "pc" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        form = "sym" if self.sym else "min" if self.offset else "asym"
        return f"int{self.bits}-{group}-{form}" + ("-s256" if self.super_group else "")

    @property
    def name(self) -> str:
        """Canonical short string (every option spelled out); `parse_scheme(s.name) == s`."""
        return f"{self.short_name()}-{self.method}"

    def effective_group_size(self, in_features: int) -> int:
        """Columns per group for a weight with `in_features` columns (per-channel: all of them)."""
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def n_groups(self, in_features: int) -> int:
        """ceil(in / g): the last group is partial when g does not divide in_features."""
        g = self.effective_group_size(in_features)
        return -(-in_features // g)

    def n_super(self, in_features: int) -> int:
        """ceil(in / 256) super-groups (0 without super-groups)."""
        return -(-in_features // SUPER_GROUP) if self.super_group else 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for manifest.json); the fields added later are written only when set."""
        data: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                                "method": self.method}
        if self.offset:
            data["offset"] = True
        if self.super_group:
            data["super_group"] = self.super_group
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> QuantScheme:
        """Inverse of `to_json`; also accepts the dict serialised as a JSON string."""
        if isinstance(data, str):
            data = json.loads(data)
        required, optional = {"bits", "group_size", "sym", "method"}, {"offset", "super_group"}
        if not isinstance(data, Mapping) or not required <= set(data) <= required | optional:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise BitsmithError(f"bad quant scheme JSON: keys {got}", where="QuantScheme.from_json",
                                fix=f"give the keys {sorted(required)} (optional: {sorted(optional)})")
        return cls(bits=data["bits"], group_size=data["group_size"], sym=data["sym"], method=data["method"],
                   offset=data.get("offset", False), super_group=data.get("super_group", 0))


def parse_scheme(text: str) -> QuantScheme:
    """Parse a short scheme string; the grammar is SCHEME_GRAMMAR (e.g. "int4-g32-asym")."""
    where = f"scheme {text!r}"
    if not isinstance(text, str):
        raise BitsmithError(f"a scheme must be a string, got {type(text).__name__}", where=where,
                            fix=f"write e.g. 'int4-g128-sym'; grammar:\n{SCHEME_GRAMMAR}")
    parts = text.strip().lower().split("-")
    head = parts[0]
    if not head.startswith("int") or not head[3:].isdigit():
        raise BitsmithError(f"scheme must start with 'int<bits>', got {head!r}", where=where,
                            fix=f"write e.g. 'int4-g128-sym'; grammar:\n{SCHEME_GRAMMAR}")
    fields: dict[str, Any] = {}

    def put(key: str, value: Any, token: str) -> None:
        if key in fields:
            raise BitsmithError(f"option {token!r} repeats or conflicts with an earlier one", where=where,
                                fix=f"give each of group/symmetry/method once; grammar:\n{SCHEME_GRAMMAR}")
        fields[key] = value

    for token in parts[1:]:
        if token == "pc":
            put("group_size", PER_CHANNEL, token)
        elif token.startswith("g") and token[1:].isdigit():
            put("group_size", int(token[1:]), token)
        elif token in ("sym", "asym", "min"):
            put("sym", token == "sym", token)
            fields["offset"] = token == "min"
        elif token == "s256":
            put("super_group", SUPER_GROUP, token)
        elif token in SUPPORTED_METHODS:
            put("method", token, token)
        else:
            raise BitsmithError(f"unknown scheme option {token!r}", where=where,
                                fix=f"grammar:\n{SCHEME_GRAMMAR}")
    return QuantScheme(bits=int(head[3:]), group_size=fields.get("group_size", DEFAULT_GROUP_SIZE),
                       sym=fields.get("sym", True), method=fields.get("method", "rtn"),
                       offset=fields.get("offset", False), super_group=fields.get("super_group", 0))


def group_index(in_features: int, scheme: QuantScheme) -> np.ndarray:
    """int64 [in]: the group of each input column (column c is in group c // g)."""
    return np.arange(in_features) // scheme.effective_group_size(in_features)


def group_starts(in_features: int, scheme: QuantScheme) -> np.ndarray:
    """int64 [n_groups]: first column of each group (for np.*.reduceat along `in`)."""
    return np.arange(0, in_features, scheme.effective_group_size(in_features))


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Codes q uint8 [out, in] in [0, 2^bits), unpacked, and per (row, group):
      scales  float16 [out, n_groups]  (s256: int8 codes, times super_scales float16 [out, n_super])
      zeros   None (sym: z = 2^(bits-1)) | float16 zero points z (asym) | float16 offsets m (min form;
              s256: int8 codes, times super_zeros float16 [out, n_super])
      perm    None | int32 [in]: act-order; q's column c holds the source's column perm[c], so that
              groups are contiguous, and y = W @ x = Wq @ x[perm]."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    scheme: QuantScheme
    in_features: int
    super_scales: np.ndarray | None = None
    super_zeros: np.ndarray | None = None
    perm: np.ndarray | None = None

    def __post_init__(self) -> None:
        out, n_in = self.q.shape
        scheme = self.scheme
        groups, supers = (out, scheme.n_groups(self.in_features)), (out, scheme.n_super(self.in_features))
        code_dtype = np.int8 if scheme.super_group else np.float16
        problems = []

        def check(label: str, array: np.ndarray | None, want: bool, dtype: Any, shape: tuple) -> None:
            if (array is not None) != want:
                problems.append(f"{label} must be {'given' if want else 'None'} for {scheme.short_name()}")
            elif array is not None and (array.dtype != dtype or array.shape != shape):
                problems.append(f"{label} are {array.dtype} {array.shape}, want {np.dtype(dtype)} {shape}")

        if self.q.dtype != np.uint8 or n_in != self.in_features:
            problems.append(f"q is {self.q.dtype} {self.q.shape}, want uint8 ({out}, {self.in_features})")
        check("scales", self.scales, True, code_dtype, groups)
        check("zeros", self.zeros, not scheme.sym, code_dtype, groups)
        check("super_scales", self.super_scales, bool(scheme.super_group), np.float16, supers)
        check("super_zeros", self.super_zeros, bool(scheme.super_group and scheme.offset), np.float16, supers)
        check("perm", self.perm, self.perm is not None, np.int32, (self.in_features,))
        if problems:
            raise BitsmithError("; ".join(problems), where=f"QuantizedWeight {scheme.name}",
                                fix="build it with quantize_rtn/quantize_gptq/quantize_awq or a frontend's importer")

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    def _two_level(self, codes: np.ndarray, per_super: np.ndarray | None) -> np.ndarray:
        """float32 [out, n_groups]: codes as they are, or (s256) f32(per_super[g // (256/G)]) * f32(code)."""
        if per_super is None:
            return codes.astype(np.float32)
        owner = np.arange(codes.shape[1]) // (SUPER_GROUP // self.scheme.group_size)
        return per_super.astype(np.float32)[:, owner] * codes.astype(np.float32)

    def group_scales(self) -> np.ndarray:
        """float32 [out, n_groups]: each group's scale s."""
        return self._two_level(self.scales, self.super_scales)

    def group_offsets(self) -> np.ndarray:
        """float32 [out, n_groups]: each group's offset m of the min form (w = s*q + m)."""
        if not self.scheme.offset:
            raise BitsmithError(f"{self.scheme.name} has zero points, not offsets", where="QuantizedWeight",
                                fix="call zero_points() for sym/asym schemes")
        return self._two_level(self.zeros, self.super_zeros)

    def zero_points(self) -> np.ndarray:
        """float32 [out, n_groups]: the stored zeros, or the constant 2^(bits-1) when symmetric (not min form)."""
        if self.scheme.offset:
            raise BitsmithError(f"{self.scheme.name} has offsets, not zero points", where="QuantizedWeight",
                                fix="call group_offsets() for the min form")
        if self.zeros is not None:
            return self.zeros.astype(np.float32)
        return np.full(self.scales.shape, 1 << (self.scheme.bits - 1), dtype=np.float32)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """float32 [out, in] in the source's column order: (q - z) * s, or s * q + m in min form; each group's s,
    z and m broadcast over its columns. The float32 operations are gguf-py's, in its order, so an imported
    GGUF tensor dequantizes to the same bits."""
    gidx = group_index(qw.in_features, qw.scheme)
    s = qw.group_scales()[:, gidx]
    q = qw.q.astype(np.float32)
    w = s * q + qw.group_offsets()[:, gidx] if qw.scheme.offset else (q - qw.zero_points()[:, gidx]) * s
    if qw.perm is None:
        return w
    out = np.empty_like(w)
    out[:, qw.perm] = w
    return out


def theoretical_bytes(out_features: int, in_features: int, scheme: QuantScheme) -> float:
    """Ideal storage: bits/8 per weight, plus 2 bytes per fp16 scale (and per zero when asymmetric); with
    super-groups, 1 byte per int8 scale (and offset) code plus 2 per fp16 super-scale (and super-offset)."""
    params_per_group = 1 if scheme.sym else 2
    per_group = 1 if scheme.super_group else 2
    supers = 2 * params_per_group * out_features * scheme.n_super(in_features)
    return (scheme.bits * out_features * in_features / 8
            + per_group * params_per_group * out_features * scheme.n_groups(in_features) + supers)
