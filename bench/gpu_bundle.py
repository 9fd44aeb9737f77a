"""Builds, on this machine (no GPU needed), the bundle that bench/gpu_check.py runs on a GPU machine.

    python bench/gpu_bundle.py [--out .gpu] [--arch sm_90a] [--no-smollm2]

What goes in (runtime only: no TVM compiler, no torch needed by our side):
  site/tvm, wheels/   TVM's runtime (the package without libtvm_compiler.so and sources, ~16 MB) and the
                      cp312 apache-tvm-ffi wheel (the GPU machine runs Python 3.12)
  kernels/            kernels_check.so: one CUDA kernel of every family (+ the int4 4096x4096 GEMV),
                      cases.npz / cases.json: inputs and the CPU kernels' outputs (the test suite checks
                      the CPU kernels against the numpy reference)
  tinystories-*/      TinyStories-656K artifacts with CUDA kernels (fp32 and int4 g32), and
  expected.json       the greedy tokens the CPU kernels give for each artifact
  smollm2.part-*      SmolLM2-135M int4 with CUDA kernels, tarred and cut into pieces: the artifact is
                      126 MB and one device call carries at most 64 MiB (bench/gpu.md says how to carry them)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
PART_BYTES = 56 << 20  # every carried piece stays under the 64 MiB a device call takes, with room for the repo
PROMPT = "Once upon a time, in a small village,"  # encoded here; the ids travel in expected.json
GREEDY_TOKENS = 32
TVM_RUNTIME_SKIP = ("libtvm_compiler.so", "3rdparty", "src", "include", "web", "__pycache__")


def check_specs() -> list:
    """One kernel of every family the lowering emits for GPUs, at SmolLM2-like sizes."""
    from bitsmith.codegen import families as k

    return [
        k.GemvSpec(4096, 4096, 4, 32, True, 1),  # the bandwidth kernel
        k.GemvSpec(1536, 576, 4, 32, False, 4), k.GemvSpec(576, 1536, 8, -1, True, 1),
        k.GemvSpec(1000, 576, 16, -1, True, 1), k.GemvSpec(576, 576, 3, 32, True, 1),
        k.GemmSpec(1536, 576, 4, 32, True, 16), k.GemmSpec(576, 576, 16, -1, True, 64),
        k.RmsNormSpec(4, 576, "float16", 1e-5), k.AddRmsNormSpec(16, 576, "float16", 1e-5),
        k.RopeSpec(4, 9, 64, 64, "half"), k.SiluMulSpec(4 * 1536), k.BinarySpec(4 * 576, "add"),
        k.EmbeddingSpec(4, 1000, 576, "float16"),
        k.PagedAttentionSpec(4, 9, 3, 64, 16, 8, 4, 0.125, None, "float16"),
        k.PagedAttentionSpec(4, 9, 3, 64, 16, 8, 4, 0.125, None, "int8"),
        # matmul variants that isolate a failure: sym/asym, batch, tail or not, dense fp32/fp16, width
        k.GemvSpec(1536, 576, 4, 32, True, 4), k.GemvSpec(1536, 512, 4, 32, False, 4),
        k.GemvSpec(1536, 576, 4, 32, False, 1), k.GemvSpec(1536, 576, 4, 32, True, 2),
        k.GemvSpec(1536, 576, 4, 32, True, 8), k.GemvSpec(1000, 576, 32, -1, True, 1),
        k.GemvSpec(1000, 512, 16, -1, True, 1), k.GemvSpec(1000, 520, 16, -1, True, 1),
        k.GemvSpec(1000, 576, 16, -1, True, 4), k.GemmSpec(576, 576, 32, -1, True, 64),
        k.GemmSpec(1536, 576, 4, 32, False, 16),
    ]


def timing_specs() -> list:
    """Int4 GEMVs timed on the GPU without reference outputs (their weights are drawn there): large enough
    that launch latency does not hide the memory bandwidth, as it does for 4096x4096's 9 MB."""
    from bitsmith.codegen import families as k

    return [k.GemvSpec(14336, 4096, 4, 32, True, 1), k.GemvSpec(16384, 16384, 4, 32, True, 1)]


def _random_args(spec, rng: np.random.Generator) -> tuple[list[np.ndarray], list[int]]:
    """Inputs and zeroed outputs for `spec` in its calling convention; the indices to compare."""
    from bitsmith.codegen import families as k

    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if isinstance(spec, (k.GemvSpec, k.GemmSpec)):
        rows = spec.batch if isinstance(spec, k.GemvSpec) else spec.rows
        w = (rng.integers(0, 2**32, spec.weight_shape(), dtype=np.uint64).astype(np.uint32) if spec.is_quantized
             else (0.05 * f32(*spec.weight_shape())).astype("float16" if spec.bits == 16 else "float32"))
        params = [] if not spec.is_quantized else [(0.01 * np.abs(f32(spec.out_features, spec.n_groups)) + 1e-3)
                                                   .astype(np.float16)] * (1 if spec.sym else 2)
        return [f32(rows, spec.in_features), w, *params, np.zeros((rows, spec.out_features), np.float32)], [-1]
    if isinstance(spec, k.PagedAttentionSpec):
        tables = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7], [0, 1, 2, 3]], dtype=np.int32)
        cache_dt = {"float16": np.float16, "int8": np.int8}[spec.kv_dtype]
        cache = np.zeros((spec.num_blocks, 2, spec.block_size, spec.kv_heads, spec.head_dim), cache_dt)
        scales = [np.ones(cache.shape[:4], np.float32)] if spec.kv_dtype == "int8" else []
        return [f32(4, spec.heads, spec.head_dim), f32(4, spec.kv_heads, spec.head_dim),
                f32(4, spec.kv_heads, spec.head_dim), np.array([0, 0, 1, -1], np.int64), tables, cache, *scales,
                np.zeros((4, spec.heads, spec.head_dim), np.float32)], [-1]
    if isinstance(spec, k.EmbeddingSpec):
        return [f32(spec.vocab, spec.dim).astype(np.float16), rng.integers(0, spec.vocab, spec.rows).astype(np.int64),
                np.zeros((spec.rows, spec.dim), np.float32)], [-1]
    if isinstance(spec, k.RmsNormSpec):
        return [f32(spec.rows, spec.dim), f32(spec.dim).astype(np.float16), np.zeros((spec.rows, spec.dim), np.float32)], [-1]
    if isinstance(spec, k.AddRmsNormSpec):
        z = np.zeros((spec.rows, spec.dim), np.float32)
        return [f32(spec.rows, spec.dim), f32(spec.rows, spec.dim), f32(spec.dim).astype(np.float16), z, z.copy()], [-2, -1]
    if isinstance(spec, k.RopeSpec):
        return [f32(spec.rows, spec.heads, spec.head_dim), np.arange(spec.rows, dtype=np.int64),
                (1e4 ** -(np.arange(0, spec.rotary_dim, 2) / spec.rotary_dim)).astype(np.float32),
                np.zeros((spec.rows, spec.heads, spec.head_dim), np.float32)], [-1]
    if isinstance(spec, (k.SiluMulSpec, k.BinarySpec)):
        return [f32(spec.n), f32(spec.n), np.zeros(spec.n, np.float32)], [-1]
    raise TypeError(spec)


def build_kernel_cases(out: Path, arch: str) -> None:
    from bitsmith.codegen.build import build_kernel_library
    from bitsmith.codegen.gpu.cuda_build import fatbin_archs
    from bitsmith.codegen.kernel import call_kernel

    specs, rng = check_specs(), np.random.default_rng(0)
    build_kernel_library(specs + timing_specs(), f"cuda_{arch}", out / "kernels" / "kernels_check.so", log=print)
    (out / "kernels" / "timing.json").write_text(json.dumps([
        {"name": t.name, "weight_shape": list(t.weight_shape()), "scales_shape": [t.out_features, t.n_groups],
         "in_features": t.in_features, "out_features": t.out_features, "weight_bytes": t.weight_bytes()}
        for t in timing_specs()], indent=1))
    print("fatbin archs:", sorted(fatbin_archs(out / "kernels" / "kernels_check.so")))
    arrays, meta = {}, []
    for i, spec in enumerate(specs):
        args, compare = _random_args(spec, rng)  # compare: the output arguments, last ones first
        first_output = len(args) - len(compare)
        expected = [a.copy() for a in args]
        call_kernel(spec, expected[:first_output], expected[first_output:])
        for j, a in enumerate(args):
            arrays[f"{i}_arg{j}"] = a
        wanted = sorted(j % len(args) for j in compare)
        for j in wanted:
            arrays[f"{i}_want{j}"] = expected[j]
        meta.append({"name": spec.name, "args": len(args), "compare": wanted,
                     "weight_bytes": spec.weight_bytes() if hasattr(spec, "weight_bytes") else 0})
    np.savez(out / "kernels" / "cases.npz", **arrays)
    (out / "kernels" / "cases.json").write_text(json.dumps(meta, indent=1))


def compile_pair(source: str, name: str, out: Path, arch: str, extra: list[str]) -> dict:
    """The model compiled for CUDA into out/name, and the greedy tokens of the same compile on this CPU."""
    from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, TargetOptions, compile_model
    from bitsmith.tools.run import open_session
    from bitsmith.runtime.artifact import load_artifact

    def options(target: str, arch_: str | None) -> CompileOptions:
        quant = QuantOptions("rtn", bits=4, group_size=32, keep_default=False) if "int4" in extra else QuantOptions()
        return CompileOptions(quant=quant, memory=MemoryOptions(context=256, concurrency=1),
                              target=TargetOptions(target, arch_))

    src = None if source == "default" else source
    compile_model(src, out / name, options("cuda", arch))
    host = compile_model(src, out / f"{name}.host", options("host", None))
    artifact = load_artifact(host)
    prompt = artifact.tokenizer().encode(PROMPT)
    session = open_session(artifact, "compiled")
    logits, tokens = session.prefill(prompt)[-1], []
    for _ in range(GREEDY_TOKENS):
        tokens.append(int(np.argmax(logits)))
        logits = session.decode(tokens[-1])
    shutil.rmtree(host)
    return {"prompt": prompt, "tokens": tokens}


def copy_tvm_runtime(out: Path, wheels: Path) -> None:
    import tvm

    src = Path(tvm.__file__).resolve().parent
    shutil.copytree(src, out / "site" / "tvm", ignore=shutil.ignore_patterns(*TVM_RUNTIME_SKIP))
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "-d", str(wheels), f"apache-tvm-ffi=={_installed('apache-tvm-ffi')}"], check=True)


def _installed(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def split_archive(directory: Path, out: Path, stem: str) -> list[Path]:
    """directory as stem.tar cut into PART_BYTES pieces stem.part-1, -2, ... (cat them back together)."""
    archive = out / f"{stem}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(directory, arcname=stem)
    parts, data = [], archive.read_bytes()
    for i in range(0, len(data), PART_BYTES):
        part = out / f"{stem}.part-{i // PART_BYTES + 1}"
        part.write_bytes(data[i:i + PART_BYTES])
        parts.append(part)
    archive.unlink()
    shutil.rmtree(directory)
    (out / f"{stem}.parts").write_text(str(len(parts)))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE.parent / ".gpu")
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args()
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    (out / "kernels").mkdir(parents=True)
    copy_tvm_runtime(out, out / "wheels")
    build_kernel_cases(out, args.arch)
    expected = {}
    tiny = DATA / "tinystories-656k"
    if tiny.is_dir():
        for name, extra in (("tinystories-fp32", []), ("tinystories-int4", ["int4"])):
            expected[name] = compile_pair(str(tiny), name, out, args.arch, extra)
    else:
        print(f"{tiny} is absent: the bundle has no TinyStories check")
    if not args.no_smollm2:
        expected["smollm2-int4"] = compile_pair("default", "smollm2-int4", out, args.arch, ["int4"])
        print("SmolLM2 pieces:", [p.name for p in split_archive(out / "smollm2-int4", out, "smollm2-int4")])
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    small = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and ".part-" not in f.name)
    print(f"bundle {out}: {small / 2**20:.1f} MiB without the SmolLM2 pieces; pieces "
          f"{ {k: round(v / 2**20, 1) for k, v in sizes.items() if '.part-' in k} } MiB")


if __name__ == "__main__":
    main()
