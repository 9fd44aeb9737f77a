"""`bitsmith export --format gguf`: an artifact as a llama.cpp GGUF, codes and scales copied where a ggml type holds them.

Per weight (our scheme -> ggml type; `exact`: dequantizing the file gives our dequantized weight bit for bit):
    int4/int5/int8 sym, groups of 32/64/128 or per channel   -> Q4_0 / Q5_0 / Q8_0, each group's scale repeated
                                                                 in every block of 32 it covers
    int4/int5 min form (w = s*q + m), same groups            -> Q4_1 / Q5_1, scale and offset repeated
    int2/int3 sym (min), int6 sym                            -> Q4_0 (Q4_1), Q8_0: the codes widened (value-exact)
    imported K-quants (int*-s256)                            -> Q2_K .. Q6_K, via compiler/gguf_blocks.py
    16-bit and float32 matrices                              -> F16 / BF16 / F32 as stored; 1-D tensors -> F32
No exact type: asymmetric z-form (Q4_1's offset m = -z*s would round to float16), groups of 16 outside K-quants,
act-order (perm), rows not a multiple of 32. Those are refused, naming the nearest types, unless
--allow-requantize: then they are converted (z-form: codes kept, m rounded; others: gguf-py's quantizer on the
dequantized weight, F16 for rows not a multiple of 32) and reported with their max abs error.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from bitsmith.compiler.frontends.gguf_arch import BLOCKS, GLOBALS
from bitsmith.compiler.frontends.llama2c import interleaved_to_half
from bitsmith.compiler.gguf_blocks import GGUF_SCHEMES, encode, gguf_kind
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.quant_scheme import QuantizedWeight, dequantize
from bitsmith.tools.export import ExportOptions, ExportReport, TensorExport, dense_weights, quantized_weights
from bitsmith.tools.export_gguf_meta import add_hparams, add_tokenizer, gguf_architecture

BLOCK = 32  # values per block of the legacy ggml types
# bits -> (sym type, min-form type) of the block-32 types a scheme's codes fit in (narrower codes are widened)
_CONTAINER = {2: ("Q4_0", "Q4_1"), 3: ("Q4_0", "Q4_1"), 4: ("Q4_0", "Q4_1"), 5: ("Q5_0", "Q5_1"), 6: ("Q8_0", None),
              8: ("Q8_0", None)}
_FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
               "Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1, "Q5_0": LlamaFileType.MOSTLY_Q5_0,
               "Q5_1": LlamaFileType.MOSTLY_Q5_1, "Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q2_K": LlamaFileType.MOSTLY_Q2_K,
               "Q3_K": LlamaFileType.MOSTLY_Q3_K_M, "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
               "Q5_K": LlamaFileType.MOSTLY_Q5_K_M, "Q6_K": LlamaFileType.MOSTLY_Q6_K}
_FIX_REQUANT = ("rerun with --allow-requantize to convert these tensors (each reported with its max abs error), or "
                "compile with a scheme GGUF holds (int4/int5/int8 sym or min form, groups of 32/64/128)")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_GLOBAL_NAMES = {hf.removeprefix("model.") + ".weight": f"{gguf}.weight" for gguf, hf in GLOBALS.items()}
_BLOCK_NAMES = {hf: gguf for gguf, hf in BLOCKS.items()}


def gguf_name(name: str, where: str) -> str:
    """The GGUF tensor name of an IR weight name: the inverse of gguf_arch.hf_name for llama-family weights."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER.fullmatch(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blk.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"
    raise BitsmithError(f"weight {name!r} has no GGUF tensor name", where=where, fix="export another --format")


def rope_rows(name: str, config: dict, order: str) -> np.ndarray | None:
    """The row order that turns the artifact's q/k rows into `order` ("half" / "interleaved"), or None."""
    if config["rope_style"] == order or not re.search(r"self_attn\.[qk]_proj\.(weight|bias)$", name):
        return None
    heads = config["num_heads"] if ".q_proj." in name else config["num_kv_heads"]
    rows = np.arange(heads * config["head_dim"]).reshape(-1, 1)
    if order == "half":  # interleaved -> half is what the GGUF importer undoes
        return interleaved_to_half(rows, heads)[:, 0]
    half = interleaved_to_half(rows, heads)[:, 0]  # position of each half row in interleaved order, inverted
    inverse = np.empty_like(half)
    inverse[half] = np.arange(half.size)
    return inverse


def permute_rows(qw: QuantizedWeight, rows: np.ndarray) -> QuantizedWeight:
    """The same weight with its output rows reordered: codes and every per-row parameter move together."""
    take = {f: getattr(qw, f)[rows] for f in ("q", "scales", "zeros", "super_scales", "super_zeros")
            if getattr(qw, f) is not None}
    return dataclasses.replace(qw, **take)


def as_block_type(qw: QuantizedWeight) -> tuple[str, QuantizedWeight] | None:
    """(ggml type, the same values in that type's scheme) when a ggml type holds `qw` exactly, else None: the
    scheme itself, or its groups cut into blocks of 32 (parameters repeated) and its codes widened."""
    scheme, n_in = qw.scheme, qw.in_features
    if qw.perm is not None:
        return None
    kind = gguf_kind(scheme)
    if kind is not None:  # a partial last group (in % 32) has no block: refused below, or F16 when allowed
        return (kind, qw) if n_in % (256 if scheme.super_group else BLOCK) == 0 else None
    group = scheme.effective_group_size(n_in)
    if scheme.super_group or n_in % BLOCK or group % BLOCK or not (scheme.sym or scheme.offset):
        return None
    kind = _CONTAINER[scheme.bits][0 if scheme.sym else 1]
    if kind is None:
        return None
    target = GGUF_SCHEMES[kind]
    owner = np.arange(n_in // BLOCK) * BLOCK // group  # the group each block of 32 lies in
    shift = (1 << (target.bits - 1)) - (1 << (scheme.bits - 1)) if scheme.sym else 0  # sym: same q - 2^(b-1)
    q = qw.q + np.uint8(shift) if shift else qw.q
    zeros = None if qw.zeros is None else np.ascontiguousarray(qw.zeros[:, owner])
    return kind, QuantizedWeight(q, np.ascontiguousarray(qw.scales[:, owner]), zeros,
                                 dataclasses.replace(target, method=scheme.method), n_in)


def min_form(qw: QuantizedWeight) -> QuantizedWeight:
    """An asymmetric z-form weight in the min form, codes kept: w = s*q + m with m = float16(-z*s) (rounded)."""
    m = (-(qw.zeros.astype(np.float32) * qw.scales.astype(np.float32))).astype(np.float16)
    return dataclasses.replace(qw, zeros=m, scheme=dataclasses.replace(qw.scheme, offset=True))


def why_not(qw: QuantizedWeight) -> tuple[str, list[str]]:
    """(why no ggml type holds `qw` exactly, the nearest types) for the refusal."""
    scheme, n_in = qw.scheme, qw.in_features
    sym_kind, min_kind = _CONTAINER[scheme.bits]
    if n_in % BLOCK:
        return f"rows of {n_in} values are not a multiple of 32", ["F16"]
    if qw.perm is not None:
        return "act-order columns (perm) break the blocks of 32", [sym_kind if scheme.sym else min_kind or "Q8_0"]
    if not scheme.sym and not scheme.offset:
        return ("float16 zero points: Q4_1/Q5_1 store an offset m = -z*s, which rounds",
                [min_kind or "Q8_0", "Q8_0"] if min_kind else ["Q8_0"])
    if scheme.effective_group_size(n_in) % BLOCK:
        return f"groups of {scheme.effective_group_size(n_in)} (a block of 32 has one scale)", [
            sym_kind if scheme.sym else min_kind or "Q8_0", "Q8_0"]
    return "no ggml type has these codes", ["Q8_0"]


def _requantized(w: np.ndarray, qw: QuantizedWeight) -> tuple[str, np.ndarray]:
    """(type, data) converting the float weight w, for --allow-requantize."""
    if w.shape[1] % BLOCK:
        return "F16", w.astype(np.float16)
    if not qw.scheme.sym and not qw.scheme.offset and qw.perm is None:
        exact = as_block_type(min_form(qw))
        if exact is not None:
            return exact[0], None  # encoded by the caller from the min form (codes kept)
    kind = _CONTAINER[qw.scheme.bits][0 if qw.scheme.sym else 1] or "Q8_0"
    return kind, gguf_quantize(w, GGMLQuantizationType[kind])


def _decoded(kind: str, data: np.ndarray) -> np.ndarray:
    return np.asarray(gguf_dequantize(data, GGMLQuantizationType[kind]), dtype=np.float32)


def quantized_tensor(name: str, qw: QuantizedWeight, options: ExportOptions) -> tuple[str, np.ndarray, TensorExport]:
    """(ggml type, data, report entry) of one packed weight (rows already in GGUF order); refused -> BitsmithError."""
    exact = as_block_type(qw)
    if exact is not None:
        kind, held = exact
        data = encode(held, kind)
        ours = dequantize(qw)
        if not np.array_equal(_decoded(kind, data), ours):  # every exact claim checked against gguf-py's decoder
            raise BitsmithError(f"{name}: {kind} does not decode to the {qw.scheme.name} weight", where="export gguf",
                                fix="report this as a bug (export --allow-requantize is not affected)")
        return kind, data, TensorExport(name, qw.scheme.name, kind)
    reason, nearest = why_not(qw)
    if not options.allow_requantize:
        raise BitsmithError(f"{name}: {qw.scheme.name} has no exact GGUF type ({reason}); nearest: "
                            f"{', '.join(dict.fromkeys(nearest))}", where="export gguf", fix=_FIX_REQUANT)
    w = dequantize(qw)
    kind, data = _requantized(w, qw)
    if data is None:
        data = encode(as_block_type(min_form(qw))[1], kind)
    decoded = data.astype(np.float32) if kind == "F16" else _decoded(kind, data)
    return kind, data, TensorExport(name, qw.scheme.name, kind, exact=False,
                                    max_abs_error=float(np.max(np.abs(decoded - w), initial=0.0)))


def dense_tensor(name: str, w: np.ndarray) -> tuple[str, np.ndarray, TensorExport]:
    """(ggml type, data, report entry) of an unquantized weight: as stored (F16/BF16/F32), 1-D as F32."""
    stored = str(w.dtype)
    if w.ndim == 1 or stored not in ("float16", "bfloat16"):
        data, kind = np.asarray(w, dtype=np.float32), "F32"
    elif stored == "bfloat16":
        data, kind = np.ascontiguousarray(w).view(np.uint8), "BF16"
    else:
        data, kind = np.ascontiguousarray(w), "F16"
    return kind, data, TensorExport(name, stored, kind)


def export_gguf(artifact_dir: Path, out: Path, options: ExportOptions) -> ExportReport:
    """Write `artifact_dir` as one GGUF file `out` (see the module docstring for the per-tensor types)."""
    artifact = load_artifact(artifact_dir, check_hashes=False)  # export() checked the hashes
    where = f"export gguf {artifact_dir}"
    config = artifact.config
    arch, order = gguf_architecture(config, where)
    if artifact.manifest["ir"].get("meta", {}).get("frontend") != "llama":
        raise BitsmithError("the artifact was traced (torch.export), not built from the llama-family IR",
                            where=where, fix="export --format compressed-tensors or onnx")
    packed, dense = quantized_weights(artifact), dense_weights(artifact)
    _tie_to_head(packed, dense, config)
    report = ExportReport("gguf", str(out))
    tensors: list[tuple[str, str, np.ndarray]] = []
    refused: list[str] = []
    for ir_name in sorted(set(packed) | set(dense), key=_file_order):
        name = gguf_name(ir_name, where)
        rows = rope_rows(ir_name, config, order)
        if ir_name in packed:
            qw = packed[ir_name] if rows is None else permute_rows(packed[ir_name], rows)
            try:
                kind, data, entry = quantized_tensor(name, qw, options)
            except BitsmithError as exc:
                if exc.fix != _FIX_REQUANT:
                    raise
                refused.append(exc.problem)
                continue
        else:
            w = dense[ir_name] if rows is None else dense[ir_name][rows]
            kind, data, entry = dense_tensor(name, w)
        tensors.append((name, kind, data))
        report.tensors.append(entry)
    if refused:
        shown = "; ".join(refused[:4]) + (f"; and {len(refused) - 4} more" if len(refused) > 4 else "")
        raise BitsmithError(f"{len(refused)} tensors have no exact GGUF type: {shown}", where=where,
                            fix=_FIX_REQUANT)
    writer = GGUFWriter(str(out), arch)
    add_hparams(writer, config, artifact_dir.resolve().name)
    matrices = Counter(kind for name, kind, data in tensors if data.ndim == 2 and "token_embd" not in name)
    writer.add_file_type(int(_FILE_TYPES.get(matrices.most_common(1)[0][0] if matrices else "F32",
                                             LlamaFileType.GUESSED)))
    writer.add_quantization_version(2)  # ggml's block formats as of GGML_QNT_VERSION 2
    report.notes.extend(add_tokenizer(writer, artifact_dir, artifact.manifest.get("tokenizer"),
                                      int(config["vocab_size"])))
    for name, kind, data in tensors:
        raw = None if kind in ("F16", "F32") else GGMLQuantizationType[kind]
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report.notes.append(f"{arch} GGUF: {len(tensors)} tensors, "
                        + ", ".join(f"{n} {k}" for k, n in Counter(k for _, k, _ in tensors).most_common()))
    return report


def _tie_to_head(packed: dict, dense: dict, config: dict) -> None:
    """A tied model whose lm_head kept codes (an imported GGUF's token_embd) and whose table is exactly their values:
    write the table once, in the head's type, as token_embd (llama.cpp reads a missing output.weight as tied)."""
    head, table = packed.get("lm_head.weight"), dense.get("embed_tokens.weight")
    if not config.get("tie_word_embeddings") or head is None or table is None or as_block_type(head) is None:
        return
    if np.array_equal(dequantize(head), np.asarray(table, dtype=np.float32)):
        packed["embed_tokens.weight"] = packed.pop("lm_head.weight")
        del dense["embed_tokens.weight"]


def _file_order(name: str) -> tuple[int, int, str]:
    """The converter's order: token_embd, blocks by layer, output_norm, output."""
    match = _LAYER.fullmatch(name)
    if match:
        return 1, int(match.group(1)), name
    return (0 if name.startswith("embed") else 2), 0, name
