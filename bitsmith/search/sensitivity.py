"""Per-tensor sensitivity: measured KL divergence with one tensor quantized, scaled across schemes by a Hessian proxy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from bitsmith.compiler.ir import Module
from bitsmith.compiler.reference import upcast_weights
from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QUANTIZER_METHODS
from bitsmith.passes.calibrate import initial_envs, linear_inputs, run_segment, split_by_layer
from bitsmith.search.experts import roundtrip

# Why this estimator: the true effect of a scheme on a tensor is the KL divergence of the model's
# next-token distribution with only that tensor quantized. Measuring it for every (tensor, scheme)
# costs one partial forward each (SmolLM2: 210 tensors x 6 schemes = 1260 passes, ~20 min here).
# Instead we measure it once per tensor at a probe scheme (int3-g32: large enough to rise above the
# noise) and carry it to the other schemes with the Hessian-weighted output error of that tensor,
#     e_t(s) = trace((W - Q_s(W)) H (W - Q_s(W))^T),   H = X^T X over the calibration activations,
# i.e.  kld_t(s) = kld_t(probe) * e_t(s) / e_t(probe). The measured factor carries what the proxy
# cannot see (how much the rest of the network amplifies this tensor's error); the proxy carries
# how the error shrinks with bits and group size. Plans are scored additively (sum over tensors);
# `bench/search.py` reports the Spearman rank correlation of predicted vs measured plan KLD.
# HQQ candidates (`int4-g32-hqq`, ...) are the same formats with other scales and zeros: the same bytes and kernels,
# their own e_t(s) from HQQ's round trip, carried from the same (RTN) probe.

PROBE = "int3-g32"
CANDIDATES = ("int8-g128", "int4-g32", "int4-g64", "int4-g128", "int3-g32", "int2-g32")
KEEP16 = "16"  # the 16-bit choice
SEARCH_METHODS = ("rtn", "hqq")  # calibration-free: a tensor's round trip needs its weights alone
DEFAULT_METHODS = ("rtn", "hqq") if "hqq" in QUANTIZER_METHODS else ("rtn",)  # hqq: once --method hqq is in the tree


def candidates(methods: tuple[str, ...] = ("rtn",)) -> tuple[str, ...]:
    """The searched schemes for these methods: CANDIDATES (RTN) and each again as `<scheme>-<method>`."""
    unknown = [m for m in methods if m not in SEARCH_METHODS]
    if unknown or not methods:
        raise BitsmithError(f"the search cannot choose method(s) {unknown or methods}", where="search --methods",
                            fix=f"use methods from {', '.join(SEARCH_METHODS)}")
    return tuple(s if m == "rtn" else f"{s}-{m}" for m in methods for s in CANDIDATES)


@dataclass
class Sensitivity:
    """kld[tensor][scheme] (scheme strings from candidates(), plus "16" with 0)."""

    kld: dict[str, dict[str, float]]
    probe_kld: dict[str, float]
    tokens: int

    def to_json(self) -> dict:
        return {"kld": self.kld, "probe_kld": self.probe_kld, "tokens": self.tokens}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def cache_key(model_hash: str, samples: np.ndarray, tensors: list[str], schemes: tuple[str, ...] = CANDIDATES) -> str:
    digest = hashlib.sha256()
    digest.update(model_hash.encode())
    digest.update(np.ascontiguousarray(samples).tobytes())
    # the RTN-only key is the one it was before the HQQ candidates (caches stay valid)
    digest.update(json.dumps([tensors, CANDIDATES if schemes == CANDIDATES else schemes, PROBE, 1]).encode())
    return digest.hexdigest()[:24]


def measure_sensitivity(module: Module, weights: dict[str, np.ndarray], samples: np.ndarray, tensors: list[str],
                        cache_dir: Path | None = None, model_hash: str = "",
                        log: Callable[[str], None] | None = None,
                        schemes: tuple[str, ...] = CANDIDATES) -> Sensitivity:
    """Sensitivity of every tensor in `tensors` (linear weights) on calibration `samples` [S, T], for `schemes`
    (candidates(); `model_hash` names the model and how it was rotated)."""
    path = cache_dir / f"sensitivity-{cache_key(model_hash, samples, tensors, schemes)}.json" if cache_dir else None
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        return Sensitivity(data["kld"], data["probe_kld"], data["tokens"])
    weights = upcast_weights(weights)
    fn = module["prefill"]
    segments = split_by_layer(module)
    # one reference pass: the env entering every segment, each linear's Hessian, the reference logits
    hessians: dict[str, np.ndarray] = {}
    input_of = {w: v for seg in segments for w, v in linear_inputs(fn, seg).items()}
    wanted = {input_of[t] for t in tensors if t in input_of}  # a stacked expert tensor has no single input

    def observe(value: str, x: np.ndarray) -> None:
        x64 = x.astype(np.float64)
        hessians[value] = hessians.get(value, 0) + x64.T @ x64

    envs = initial_envs(module, samples)
    envs_at: list[list[dict]] = []
    for seg in segments:
        envs_at.append(envs)
        envs = [run_segment(fn, seg, env, weights, observe, wanted) for env in envs]
    ref_logp = [_log_softmax(env[fn.outputs[0]]) for env in envs]
    segment_of = {w: i for i, seg in enumerate(segments) for w in linear_inputs(fn, seg)}
    segment_of |= {n.attrs["name"]: i for i, seg in enumerate(segments) for n in seg.nodes
                   if n.op == "weight" and n.attrs["name"] in tensors and n.attrs["name"] not in segment_of}

    def kld_with(tensor: str, w_q: np.ndarray) -> float:
        original = weights[tensor]
        weights[tensor] = w_q
        try:
            total = 0.0
            for sample, env in enumerate(envs_at[segment_of[tensor]]):
                for seg in segments[segment_of[tensor]:]:
                    env = run_segment(fn, seg, env, weights)
                logp = _log_softmax(env[fn.outputs[0]])
                total += float((np.exp(ref_logp[sample]) * (ref_logp[sample] - logp)).sum(axis=-1).sum())
        finally:
            weights[tensor] = original
        return total / samples.size

    kld: dict[str, dict[str, float]] = {}
    probe_kld: dict[str, float] = {}
    for tensor in tqdm(tensors, desc="sensitivity", unit="tensor", leave=False):
        w = weights[tensor]
        h = hessians.get(input_of.get(tensor, ""))  # experts: rows differ per expert, plain squared error instead
        errors = {}
        for scheme in dict.fromkeys(schemes + (PROBE,)):
            delta = (w - roundtrip(w, scheme)).astype(np.float64)
            # trace(D H D^T) as sum((D H) * D): one BLAS product (np.einsum of three operands loops in C without BLAS,
            # 1.7 s against 0.07 s for a 1536 x 576 tensor)
            errors[scheme] = float(((delta @ h) * delta).sum() if h is not None else (delta ** 2).sum())
        probe_kld[tensor] = max(kld_with(tensor, roundtrip(w, PROBE)), 0.0)
        scale = probe_kld[tensor] / errors[PROBE] if errors[PROBE] > 0 else 0.0
        kld[tensor] = {s: scale * errors[s] for s in schemes} | {KEEP16: 0.0}
    result = Sensitivity(kld, probe_kld, int(samples.size))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json()))
        tmp.replace(path)
    if log:
        log(f"sensitivity of {len(tensors)} tensors on {samples.size} tokens")
    return result
