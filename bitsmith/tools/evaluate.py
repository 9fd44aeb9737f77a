"""`bitsmith eval`: perplexity of an artifact and its KL divergence / top-1 agreement against a reference model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bitsmith.compiler.analysis import dead_code_elimination
from bitsmith.compiler.ir import Module, Node, TensorType
from bitsmith.compiler.loader import load_model
from bitsmith.compiler.ops.quant import dequantize_packed, qlinear_input_names, reads_int8_activations
from bitsmith.compiler.reference import ReferenceSession, check_activations, upcast_weights
from bitsmith.errors import BitsmithError
from bitsmith.passes.canonicalize import canonical_model
from bitsmith.passes.plan_kv_cache import with_kv_dtypes
from bitsmith.runtime.artifact import Artifact, is_artifact, load_artifact
from bitsmith.runtime.session import CompiledSession
from bitsmith.tools.run import EXECUTORS


EVAL_ACTIVATIONS = ("auto", "float32", "int8")  # `bitsmith eval --activations`; auto: what the artifact's kernels do


def kernel_activations(manifest: dict) -> str:
    """What an artifact's quantized matmuls compute on: "int8" when it was compiled with --activations int8 (also
    with --target none, whose scoring then emulates them), with auto where the lowering chose them (its target has
    int8 dot products: pipeline.use_int8_activations); "float32" otherwise."""
    target = (manifest.get("compile") or {}).get("target") or {}
    asked = target.get("activations", "float32")
    if asked != "auto":
        return asked
    from bitsmith.options import CompileOptions, TargetOptions  # lazy: the pipeline imports TVM
    from bitsmith.pipeline import use_int8_activations

    known = {k: v for k, v in target.items() if k in TargetOptions.__dataclass_fields__}
    options = TargetOptions(**{**known, "features": tuple(known.get("features") or ())})
    return "int8" if use_int8_activations(CompileOptions(target=options)) else "float32"


def resolve_activations(manifest: dict, activations: str) -> str:
    """`activations` (one of EVAL_ACTIVATIONS) with auto replaced by the artifact's kernel_activations."""
    if activations not in EVAL_ACTIVATIONS:
        raise BitsmithError(f"unknown activations {activations!r}", where="eval",
                            fix=f"use one of {', '.join(EVAL_ACTIVATIONS)}")
    return kernel_activations(manifest) if activations == "auto" else activations


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    ref_ppl: float | None
    kld_mean: float | None
    kld_p99: float | None
    top1_agree: float | None
    tokens: int  # scored tokens
    windows: int
    ctx: int
    bos: bool

    def to_json(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows_of(ids: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of `ctx` text tokens (a trailing partial window is dropped).

    With BOS each window is [BOS] + ctx tokens and every text token is scored; without it the first
    token of each window has no context and is not scored.
    """
    prefix = [bos] if bos is not None else []
    return [prefix + ids[start:start + ctx] for start in range(0, len(ids) - ctx + 1, ctx)]


class Scorer:
    """log-probabilities of windows under one model on the reference executor; packed weights are dequantized
    once, up front. activations "int8": the inputs of the qlinears an int8-activation build runs on int8 GEMVs
    are rounded as those kernels round them (the artifact need not have kernels: --target none is fine)."""

    def __init__(self, module: Module, weights, activations: str = "float32"):
        self.module, self.weights = densify(module, upcast_weights(weights), check_activations(activations))

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens) - 1, vocab] for predicting tokens[1:]."""
        session = ReferenceSession(self.module, self.weights, len(tokens))
        return log_softmax(session.prefill(tokens)[:-1])


class CompiledScorer:
    """log-probabilities of windows under an artifact's kernels: one session, reset for every window."""

    def __init__(self, artifact: Artifact, max_context: int):
        self.session = CompiledSession(artifact, max_context)

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """[len(tokens) - 1, vocab] for predicting tokens[1:]."""
        self.session.reset()
        return log_softmax(self.session.prefill(tokens)[:-1])


def densify(module: Module, weights: dict, activations: str = "float32") -> tuple[Module, dict]:
    """Replace every qlinear by a linear over its dequantized float32 matrix (the same arithmetic); activations
    "int8": an `int8_activations` node before each linear whose qlinear reads int8 activations (its rounding)."""
    weights = dict(weights)
    new_types = dict(module.weights)
    functions = {}
    for key, fn in module.functions.items():
        weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
        nodes, types = [], dict(fn.types)
        for node in fn.nodes:
            if node.op != "qlinear":
                nodes.append(node)
                continue
            qname = weight_of[node.inputs[1]]
            dense = qname.removesuffix(".qweight") + ".dense"
            if dense not in weights:
                names = qlinear_input_names(node.attrs)
                parts = {name: weights[weight_of[v]] for name, v in zip(names, node.inputs[1:]) if name != "bias"}
                w = dequantize_packed(parts["qweight"], parts["scales"], parts.get("zeros"), node.attrs,
                                      parts.get("super_scales"), parts.get("super_zeros"))
                if "perm" in parts:  # stored column c is original column perm[c]
                    w[:, np.asarray(parts["perm"], dtype=np.int64)] = w.copy()
                weights[dense] = w
                new_types[dense] = TensorType(weights[dense].shape, "float32")
            value = f"{node.outputs[0]}.dense"
            nodes.append(Node("weight", (), (value,), {"name": dense}))
            types[value] = new_types[dense]
            bias = node.inputs[-1:] if node.attrs.get("has_bias") else ()
            x = node.inputs[0]
            if activations == "int8" and reads_int8_activations(node.attrs):
                x = f"{node.outputs[0]}.x_int8"
                nodes.append(Node("int8_activations", (node.inputs[0],), (x,), {}))
                types[x] = types[node.inputs[0]]
            nodes.append(Node("linear", (x, value, *bias), node.outputs, {}))
        functions[key] = dead_code_elimination(fn.replace(nodes=tuple(nodes), types=types))
    return module.replace(functions=functions, weights=new_types), weights


def _reference_model(artifact: Artifact, reference: str | Path | None, always: bool) -> tuple[Module, dict] | None:
    """The 16-bit model of the same source (or `reference`); None when the artifact is itself unquantized
    and `always` is false."""
    meta = artifact.manifest["ir"].get("meta", {})
    quantized_kv = bool({"int8", "int4"} & set((meta.get("kv_plan") or {}).get("layer_dtypes", ())))
    if reference is None:
        if not always and not meta.get("precision_plan") and not quantized_kv:
            return None
        reference = artifact.manifest["provenance"]["source"].get("path")
        if not reference or not Path(reference).exists():
            raise BitsmithError(f"the artifact's source {reference!r} is not available for the reference logits",
                                fix="pass --reference MODEL_OR_ARTIFACT")
    if is_artifact(reference):
        ref = load_artifact(reference, check_hashes=False)
        return Module.from_json(ref.manifest["ir"]), ref.weights
    model = canonical_model(load_model(reference))
    # the reference keeps a 16-bit KV cache: an int8-KV artifact is scored against what it replaces
    layers = model.module["decode"].inputs[2][1].shape[0]
    return with_kv_dtypes(model.module, ("float16",) * layers), model.weights



def evaluate(path: str | Path, text: str, tokens: int | None, ctx: int, reference: str | Path | None = None,
             executor: str = "compiled", activations: str = "float32") -> EvalResult:
    return evaluate_many([path], text, tokens, ctx, reference, executor, activations)[0]


def evaluate_many(paths: list[str | Path], text: str, tokens: int | None, ctx: int,
                  reference: str | Path | None = None, executor: str = "compiled",
                  activations: str = "float32") -> list[EvalResult]:
    """Score several artifacts of one model on the same windows; the reference runs once per window.

    Tokenizer, context and (without `reference`) the reference model come from the first artifact. `executor`
    scores the artifacts: "compiled" (their kernels; one without kernels is an error) or "reference" (numpy on
    their dequantized weights); the reference model always runs on the reference executor. `activations` "int8"
    (reference executor only) scores the artifacts as their int8-activation build would compute (Scorer); the
    reference model keeps float32 activations.
    """
    if executor not in EXECUTORS:
        raise BitsmithError(f"unknown executor {executor!r}", fix=f"use one of {', '.join(EXECUTORS)}")
    if activations != "float32" and executor != "reference":
        raise BitsmithError(f"activations {activations!r} are emulated on the reference executor only",
                            where="evaluate", fix="pass executor='reference' (compiled artifacts use their own "
                                                  "kernels' activations: compile with --activations int8)")
    artifacts = [load_artifact(p) for p in paths]
    tokenizer = artifacts[0].tokenizer()
    ids = tokenizer.encode(text, add_bos=False)
    if tokens:
        ids = ids[:tokens]
    bos = tokenizer.bos_token_id if tokenizer.add_bos else None
    max_context = min(a.max_context for a in artifacts)
    if ctx + (bos is not None) > max_context:
        raise BitsmithError(f"--ctx {ctx} exceeds the model's context of {max_context}", fix="lower --ctx")
    windows = windows_of(ids, ctx, bos)
    if not windows:
        raise BitsmithError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}",
                            fix="pass a longer text or a smaller --ctx")
    scorers = [CompiledScorer(a, len(windows[0])) if executor == "compiled"
               else Scorer(Module.from_json(a.manifest["ir"]), a.weights, activations) for a in artifacts]
    ref_model = _reference_model(artifacts[0], reference, always=len(paths) > 1)
    ref = Scorer(*ref_model) if ref_model is not None else None
    stats = [{"nll": [], "ref_nll": [], "kld": [], "agree": []} for _ in scorers]
    for window in tqdm(windows, desc="eval windows", leave=False, disable=len(windows) < 4):
        targets = np.asarray(window[1:])
        rows = np.arange(len(targets))
        ref_logp = ref.logprobs(window) if ref is not None else None
        for scorer, st in zip(scorers, stats):
            logp = scorer.logprobs(window)
            st["nll"].append(-logp[rows, targets])
            if ref_logp is not None:
                st["ref_nll"].append(-ref_logp[rows, targets])
                st["kld"].append((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1))
                st["agree"].append(ref_logp.argmax(-1) == logp.argmax(-1))
    return [_result(st, len(windows), ctx, bos is not None) for st in stats]


def _result(st: dict, windows: int, ctx: int, bos: bool) -> EvalResult:
    nll = np.concatenate(st["nll"])
    ppl = float(np.exp(nll.mean()))
    if not st["kld"]:  # the artifact is its own reference
        return EvalResult(ppl, ppl, 0.0, 0.0, 1.0, int(nll.size), windows, ctx, bos)
    kld = np.concatenate(st["kld"])
    return EvalResult(
        ppl=ppl,
        ref_ppl=float(np.exp(np.concatenate(st["ref_nll"]).mean())),
        kld_mean=float(kld.mean()),
        kld_p99=float(np.percentile(kld, 99)),
        top1_agree=float(np.concatenate(st["agree"]).mean()),
        tokens=int(nll.size),
        windows=windows,
        ctx=ctx,
        bos=bos,
    )
