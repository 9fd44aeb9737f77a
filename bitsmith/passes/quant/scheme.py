"""Weight quantization schemes, the quantized-weight container, and group-wise dequantization.

Groups: a weight [out, in] is split along `in` into groups of `group_size` consecutive columns,
group i covering columns [i*g, min((i+1)*g, in)); every (row, group) pair has its own scale (and
zero point when asymmetric). When g does not divide `in` the LAST group is partial and holds the
remaining `in % g` columns (SmolLM2's 576 with g128: four full groups and one of 64 columns), so
n_groups = ceil(in / g). group_size -1 means one group per output row (per-channel).

Dequantization: w = (q - z) * s with q in [0, 2^bits). Asymmetric schemes store a float16 zero
point z per group, generally fractional (z = -min / s: code 0 is the group's min, as in llama.cpp's
Q4_1); symmetric schemes store none and use the constant z = 2^(bits-1), i.e. the signed range
[-2^(bits-1), 2^(bits-1) - 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from bitsmith.errors import BitsmithError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
SUPPORTED_METHODS = ("rtn", "gptq", "awq")
PER_CHANNEL = -1
DEFAULT_GROUP_SIZE = 128

SCHEME_GRAMMAR = """\
scheme := "int" BITS ( "-" option )*     BITS in 2 3 4 8
option := "g" SIZE      group size, SIZE in 32 64 128        (default g128)
        | "pc"          per-output-channel (one group per row)
        | "sym" | "asym"                                       (default sym)
        | "rtn" | "gptq" | "awq"                               (default rtn)
each kind of option at most once, in any order; e.g. "int4", "int4-g32-asym", "int3-pc-gptq"."""


@dataclass(frozen=True)
class QuantScheme:
    """How one weight is quantized: bit width, group size (-1: per channel), symmetry, method."""

    bits: int
    group_size: int
    sym: bool
    method: str

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise BitsmithError(f"unsupported bit width {self.bits!r}", where="QuantScheme",
                                fix=f"use one of {SUPPORTED_BITS}")
        if isinstance(self.group_size, bool) or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise BitsmithError(f"unsupported group size {self.group_size!r}", where="QuantScheme",
                                fix=f"use one of {SUPPORTED_GROUP_SIZES} (-1 = per output channel)")
        if not isinstance(self.sym, bool):
            raise BitsmithError(f"sym must be a bool, got {self.sym!r}", where="QuantScheme",
                                fix="use one of (True, False): True = symmetric")
        if self.method not in SUPPORTED_METHODS:
            raise BitsmithError(f"unsupported quantization method {self.method!r}", where="QuantScheme",
                                fix=f"use one of {SUPPORTED_METHODS}")

    @property
    def qmax(self) -> int:
        """Largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        """Canonical short string (every option spelled out); `parse_scheme(s.name) == s`."""
        group = "pc" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"int{self.bits}-{group}-{'sym' if self.sym else 'asym'}-{self.method}"

    def effective_group_size(self, in_features: int) -> int:
        """Columns per group for a weight with `in_features` columns (per-channel: all of them)."""
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def n_groups(self, in_features: int) -> int:
        """ceil(in / g): the last group is partial when g does not divide in_features."""
        g = self.effective_group_size(in_features)
        return -(-in_features // g)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for manifest.json)."""
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "method": self.method}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> QuantScheme:
        """Inverse of `to_json`; also accepts the dict serialised as a JSON string."""
        if isinstance(data, str):
            data = json.loads(data)
        expected = {"bits", "group_size", "sym", "method"}
        if not isinstance(data, Mapping) or set(data) != expected:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise BitsmithError(f"bad quant scheme JSON: keys {got}", where="QuantScheme.from_json",
                                fix=f"give exactly the keys {sorted(expected)}")
        return cls(bits=data["bits"], group_size=data["group_size"], sym=data["sym"], method=data["method"])


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
        elif token in ("sym", "asym"):
            put("sym", token == "sym", token)
        elif token in SUPPORTED_METHODS:
            put("method", token, token)
        else:
            raise BitsmithError(f"unknown scheme option {token!r}", where=where,
                                fix=f"grammar:\n{SCHEME_GRAMMAR}")
    return QuantScheme(bits=int(head[3:]), group_size=fields.get("group_size", DEFAULT_GROUP_SIZE),
                       sym=fields.get("sym", True), method=fields.get("method", "rtn"))


def group_index(in_features: int, scheme: QuantScheme) -> np.ndarray:
    """int64 [in]: the group of each input column (column c is in group c // g)."""
    return np.arange(in_features) // scheme.effective_group_size(in_features)


def group_starts(in_features: int, scheme: QuantScheme) -> np.ndarray:
    """int64 [n_groups]: first column of each group (for np.*.reduceat along `in`)."""
    return np.arange(0, in_features, scheme.effective_group_size(in_features))


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """Codes q uint8 [out, in] in [0, 2^bits), scales float16 [out, n_groups], zeros float16
    [out, n_groups] (None when symmetric: z = 2^(bits-1)); unpacked, in the original column order."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    scheme: QuantScheme
    in_features: int

    def __post_init__(self) -> None:
        out, n_in = self.q.shape
        groups = (out, self.scheme.n_groups(self.in_features))
        problems = []
        if self.q.dtype != np.uint8 or n_in != self.in_features:
            problems.append(f"q is {self.q.dtype} {self.q.shape}, want uint8 ({out}, {self.in_features})")
        if self.scales.dtype != np.float16 or self.scales.shape != groups:
            problems.append(f"scales are {self.scales.dtype} {self.scales.shape}, want float16 {groups}")
        if self.scheme.sym != (self.zeros is None):
            problems.append("zeros must be None exactly when the scheme is symmetric")
        elif self.zeros is not None and (self.zeros.dtype != np.float16 or self.zeros.shape != groups):
            problems.append(f"zeros are {self.zeros.dtype} {self.zeros.shape}, want float16 {groups}")
        if problems:
            raise BitsmithError("; ".join(problems), where=f"QuantizedWeight {self.scheme.name}",
                                fix="build it with quantize_rtn/quantize_gptq/quantize_awq")

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    def zero_points(self) -> np.ndarray:
        """float32 [out, n_groups]: the stored zeros, or the constant 2^(bits-1) when symmetric."""
        if self.zeros is not None:
            return self.zeros.astype(np.float32)
        return np.full(self.scales.shape, 1 << (self.scheme.bits - 1), dtype=np.float32)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """float32 [out, in]: w = (q - z) * s, with s and z broadcast over each group's columns."""
    gidx = group_index(qw.in_features, qw.scheme)
    s = qw.scales.astype(np.float32)[:, gidx]
    z = qw.zero_points()[:, gidx]
    return (qw.q.astype(np.float32) - z) * s


def theoretical_bytes(out_features: int, in_features: int, scheme: QuantScheme) -> float:
    """Ideal storage: bits/8 per weight, plus 2 bytes per fp16 scale (and per zero when asymmetric)."""
    params_per_group = 1 if scheme.sym else 2
    return (scheme.bits * out_features * in_features / 8
            + 2 * params_per_group * out_features * scheme.n_groups(in_features))
