"""learn_rotations: R1/R2 optimised on calibration activations (Cayley SGD from the randomized Hadamard ones)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tqdm import tqdm

from bitsmith.compiler.ir import Module
from bitsmith.errors import BitsmithError
from bitsmith.passes.assign_precision import AssignPrecision
from bitsmith.passes.base import PassContext
from bitsmith.passes.calibrate import CALIBRATION_THREADS, initial_envs, layer_index, run_samples, split_by_layer
from bitsmith.passes.choose_rotations import residual_rotation, rotation_sizes
from bitsmith.passes.manager import Pass
from bitsmith.passes.quant.learned_rotation import (
    LowRankHessian, Objective, Term, factor_activations, factor_hessian, learn_rotations,
)
from bitsmith.passes.quant.rotation import check_orthogonal, online_factor, random_hadamard
from bitsmith.passes.rotation_sites import find_residual_sites, with_rotation_meta
from bitsmith.runtime.hadamard import hadamard_transform
from bitsmith.runtime.quant_scheme import QuantScheme

log = logging.getLogger(__name__)
ONLINE = "@online"  # suffix of a Hessian key whose input takes rotate_ffn_online's fixed Hadamard

@dataclass(frozen=True)
class LearnRotations(Pass):
    """ctx.rotations["r1"]/["r2"] as choose_rotations picks them (randomized Hadamard, same seed), then `steps`
    Cayley steps that lower the mean relative RTN output error of the linears the precision plan quantizes (see
    passes/quant/learned_rotation.py; a cheaper objective than SpinQuant's end-to-end loss). The inputs' Hessians
    X^T X come from one reference-executor pass over up to `max_tokens` calibration tokens, before any rotation,
    each kept only as a rank-`max_rank` factor (plus an isotropic tail) once its layer has run, so at most one
    layer's inputs are ever held whole: in * min(in, tokens, max_rank) floats per input (report "hessian_bytes").
    Each step draws `layers_per_step` decoder layers, so a step costs a few layers' weights, not the model's.

    `precision`: the plan assign_precision will make (which linears, which bits/group/sym); with nothing quantized
    its default scheme stands for every linear. `ffn_online`/`heads`: whether rotate_ffn_online (a fixed Hadamard on
    down_proj's input) and rotate_heads (R2) will run, so the objective sees the weights as they will be."""

    seed: int = 0
    steps: int = 100
    lr: float = 1.5
    precision: AssignPrecision | None = None
    ffn_online: bool = True
    heads: bool = True
    max_tokens: int = 4096
    layers_per_step: int = 4
    max_rank: int = 512
    name = "learn_rotations"
    requires = frozenset({"norms_folded"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        hidden, head_dim = rotation_sizes(module, ctx)
        outliers = ctx.rotations.get("outliers", np.zeros(0, dtype=np.int64))  # R1 stays the identity there
        start = {"r1": residual_rotation(hidden, outliers, self.seed)}
        if head_dim is not None:
            start["r2"] = random_hadamard(head_dim, self.seed + 1)
        if ctx.calibration is None:
            raise BitsmithError("--rotate learned needs calibration tokens, and this model has no tokenizer",
                                where=f"pass {self.name}", fix="use --rotate hadamard, or give the model a tokenizer")
        started = time.perf_counter()
        terms = self._terms(module, ctx, head_dim is not None and self.heads)
        factors, signals = self._factors(module, ctx, terms)
        objective = Objective(terms, factors, signals)
        log.info("learn_rotations: %d input Hessians at rank <= %d hold %.1f MiB", len(factors), self.max_rank,
                 objective.bytes / 2**20)
        calibrated = time.perf_counter()
        learnable = {k: v for k, v in start.items() if k == "r1" or any("r2" in (t.rows, t.cols) for t in terms)}
        with tqdm(total=self.steps, desc="learning rotations", unit="step", leave=False,
                  disable=not sys.stderr.isatty()) as bar:
            learned, report = learn_rotations(objective, learnable, self.steps, self.lr, self.layers_per_step,
                                              self.seed, bar.update, fixed={"r1": outliers})
        for key in start:
            ctx.rotations[key] = learned.get(key, start[key])
            report[f"{key}_orthogonality"] = check_orthogonal(ctx.rotations[key], 1e-5)
        report.update(hessian_rank_cap=self.max_rank, hessian_bytes=objective.bytes)
        return with_rotation_meta(module, "learned", {**report, "calibration_tokens": self._tokens(ctx),
                                                      "calibration_s": round(calibrated - started, 1),
                                                      "learning_s": round(time.perf_counter() - calibrated, 1)})

    def _tokens(self, ctx: PassContext) -> int:
        samples, seqlen = ctx.calibration.shape
        return min(samples, max(1, self.max_tokens // seqlen)) * seqlen

    def _online(self, x: np.ndarray) -> np.ndarray:
        """x @ H for the H rotate_ffn_online folds into down_proj's columns (same seed, same factor), by the fast
        transform: an ffn-sized dense H would be in^2 float64 (14336: 1.6 GB)."""
        return hadamard_transform(x, online_factor(x.shape[-1], self.seed))

    def _factors(self, module: Module, ctx: PassContext, terms: list[Term]) -> tuple[dict[str, LowRankHessian],
                                                                                      list[float]]:
        """Each term key's LowRankHessian, and each term's signal || X W^T ||^2 from the exact X^T X (it does
        not depend on the rotations: computed once, here). A layer's inputs are factored as soon as it has run."""
        users: dict[str, list[int]] = {}
        for i, term in enumerate(terms):
            users.setdefault(term.hessian, []).append(i)
        factors: dict[str, LowRankHessian] = {}
        signals = [0.0] * len(terms)
        tokens = self._tokens(ctx)
        values = {key.removesuffix(ONLINE) for key in users}
        for value, data, is_rows in collect_inputs(module, ctx, values, self.max_tokens):
            for key in (value, value + ONLINE):
                if key not in users:
                    continue
                seen = data
                if key.endswith(ONLINE):  # X H, or H^T S H = T(T(S)^T) for the symmetric S
                    seen = self._online(data) if is_rows else self._online(self._online(data).T)
                factors[key] = (factor_activations(seen, self.max_rank) if is_rows
                                else factor_hessian(seen, self.max_rank, tokens))
                for i in users[key]:
                    signals[i] = _signal(terms[i].weight, seen, is_rows)
        return factors, signals

    def _terms(self, module: Module, ctx: PassContext, with_r2: bool) -> list[Term]:
        """The objective's linears, each with its input value in prefill as its Hessian key."""
        fn = module["prefill"]
        sites = find_residual_sites(fn)
        plan = self._plan(module)
        weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
        input_of = {weight_of[n.inputs[1]]: n.inputs[0] for n in fn.nodes
                    if n.op == "linear" and n.inputs[1] in weight_of}
        v_weights = {p.v.weight for p in sites.heads} if with_r2 else set()
        o_weights = {p.o.weight for p in sites.heads}
        sides: dict[str, tuple[str | None, str | None]] = {}  # weight -> (rows, cols)
        for _, linears in sites.norms:
            for lin in linears:
                sides[lin.weight] = ("r2" if lin.weight in v_weights else None, "r1")
        for lin in sites.writers:
            sides[lin.weight] = ("r1", "r2" if lin.weight in o_weights and with_r2 else None)
        terms = []
        num_layers = 1 + max((i for n in module.weights if (i := layer_index(n)) is not None), default=-1)
        for name, scheme in plan.items():
            if name not in sides or name not in input_of:
                continue  # not on the residual stream: no rotation reaches it
            rows, cols = sides[name]
            weight = np.asarray(ctx.weights[name], dtype=np.float32)
            key = input_of[name]
            if rows == "r1" and cols is None and self.ffn_online and name not in o_weights:
                weight = self._online(weight)
                key += ONLINE
            layer = layer_index(name)
            terms.append(Term(weight, key, rows, cols, scheme.effective_group_size(weight.shape[1]), scheme.bits,
                              scheme.sym, num_layers if layer is None else layer))
        if not terms:
            raise BitsmithError("no quantized linear reads or writes the residual stream", where=f"pass {self.name}",
                                fix="use --rotate hadamard (nothing for a learned rotation to lower)")
        return terms

    def _plan(self, module: Module) -> dict:
        """weight -> QuantScheme for the linears that will be quantized (all of them at the default scheme when
        the plan quantizes none: e.g. --rotate learned without --method)."""
        precision = self.precision or AssignPrecision(default=QuantScheme(4, 128, True, "rtn"))
        plan = {name: scheme for name, scheme in precision.plan(module).items() if scheme is not None}
        return plan or {name: precision.default for name in precision.plan(module)}


def _signal(w: np.ndarray, data: np.ndarray, is_rows: bool) -> float:
    """|| X W^T ||^2 from X (is_rows) or from S = X^T X (as tr(W S W^T))."""
    if is_rows:
        return float((np.square(data @ w.T, dtype=np.float64)).sum())
    return float(((w @ data) * w).sum(dtype=np.float64))


def collect_inputs(module: Module, ctx: PassContext, values: set[str],
                   max_tokens: int) -> Iterator[tuple[str, np.ndarray, bool]]:
    """(value, data, is_rows) for each prefill value in `values` over the first calibration samples (at most
    `max_tokens` tokens), run on the reference executor one layer at a time and yielded when its layer is done:
    data is the activations X [tokens, features] float32 when tokens <= features (is_rows), else X^T X
    [features, features] float32, whichever is smaller. Only the current layer's values are held."""
    samples = ctx.calibration[:max(1, max_tokens // ctx.calibration.shape[1])]
    tokens = samples.size
    fn = module["prefill"]
    held: dict[str, list[np.ndarray] | np.ndarray] = {}

    def observe(value: str, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1])
        if tokens <= x.shape[1]:
            held.setdefault(value, []).append(x)
        else:
            held[value] = held.get(value, 0) + x.T @ x

    segments = split_by_layer(module)
    defined = [{v for n in seg.nodes for v in n.outputs} for seg in segments]
    last = max(i for i, d in enumerate(defined) if d & values)
    envs = initial_envs(module, samples, caches=CALIBRATION_THREADS)
    seen: set[str] = set()
    for index, seg in enumerate(tqdm(segments[:last + 1], desc="rotation calibration", unit="layer", leave=False,
                                     disable=not sys.stderr.isatty())):
        envs = run_samples(fn, seg, envs, ctx.weights, observe, values & defined[index])
        for value in sorted(held):
            data = held.pop(value)
            seen.add(value)
            yield (value, np.concatenate(data), True) if isinstance(data, list) else (value, data, False)
    missing = values - seen
    if missing:
        raise BitsmithError(f"calibration never computed {sorted(missing)[:3]}", where="pass learn_rotations",
                            fix="report this model: its linears' inputs are not prefill values")
