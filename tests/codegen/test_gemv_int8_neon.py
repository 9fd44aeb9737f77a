"""aarch64 int8-activation GEMV (QGemvI8Spec with sdot, gemv_int8_neon.py): numerics and the emitted code.

Numerics without an ARM machine: the same TIR with sdot / usdot replaced by their definition in portable TIR
(`emulate=True`) is built for this host and compared with a numpy oracle: the full blocks' activations
quantized per 32 values exactly as the kernel (sx = max|x| / 127, xq = rint(x * (127 / max|x|)) in fp32),
integer dot products per 32-block, fp64 scaling; the tail block (in % BK values) on fp32 x. The kernel
differs by fp32 rounding of the scaling and sums only: |y - ref| <= 1e-5 max|ref|. The aarch64 build itself
is checked by disassembly (sdot / usdot in the GEMV for cortex-a76, none for cortex-a72, which lacks dotprod).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from bitsmith.codegen.build import build_kernel_library
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.gemv_int8 import QGemvI8Spec
from bitsmith.codegen.gemv_int8_neon import build_qgemv_i8_neon
from bitsmith.codegen.target import host_target, resolve_target, target_key
from bitsmith.compiler.ops.quant import dequantize_packed
from bitsmith.errors import BitsmithError
from bitsmith.passes import lower_linear
from bitsmith.passes.quant.packing import pack
from bitsmith.runtime.packed_layout import LANES, lane_unit

# (out, in, bits, group, sym, batch): 576 = 4 int4 blocks + a 64-value tail (8 lanes, vector); 200 = 1 block +
# 72 (int4) or 3 blocks + 8 (int8) (scalar tails); 160 = 1 int4 block + 32 (4 lanes), 96 = 1 int8 block + 32
# (8 lanes); 37: tail only; 1536 whole blocks; groups inside a block (32, 64 at b = 4; 32 at b = 8)
SPECS = [QGemvI8Spec(n, k, b, g, sym, bs) for b in (4, 8) for g in (32, 64, 128, -1) for sym in (True, False)
         for n, k, bs in ((7, 576, 1), (33, 200, 3))]
SPECS += [QGemvI8Spec(64, 1536, 4, 32, True, 1), QGemvI8Spec(48, 1536, 8, 128, False, 16),
          QGemvI8Spec(5, 37, 4, -1, False, 2), QGemvI8Spec(16, 2048, 4, 128, True, 64),
          QGemvI8Spec(6, 160, 4, 32, False, 2), QGemvI8Spec(6, 96, 8, 32, True, 3), QGemvI8Spec(6, 32, 4, 32, True, 1),
          QGemvI8Spec(8, 576, 4, 64, False, 4)]
USDOT_SPECS = [QGemvI8Spec(9, 576, 8, g, sym, 2) for g in (32, -1) for sym in (True, False)]


def emulated(specs, usdot: bool = False):
    """The kernels with the dot products in portable TIR, built for this host."""
    import tvm

    funcs = {s.name: build_qgemv_i8_neon(s, usdot=usdot, emulate=True) for s in specs}
    return tvm.compile(tvm.IRModule(funcs), target=host_target().tvm_target())


def reference(spec: QGemvI8Spec, x, qweight, scales, zeros) -> np.ndarray:
    """Full blocks (and a tail of whole 32-blocks in 4 or 8 lanes, e.g. 576 at b = 4): the kernel's int8
    activations, exact integer dots, fp64 scaling; any other tail: fp32 x."""
    attrs = {"bits": spec.bits, "group_size": spec.group_size, "in_features": spec.in_features, "sym": spec.sym}
    w = dequantize_packed(qweight, scales, zeros, attrs).astype(np.float64)
    q = w / np.repeat(scales.astype(np.float64), spec.group, axis=1)[:, :spec.in_features]  # q - z
    slots = lane_unit(spec.bits)[1]
    base = spec.in_features // (LANES * slots) * LANES * slots
    rest = spec.in_features - base
    if rest % 32 == 0 and rest // slots in (4, 8):  # the vector tail
        base = spec.in_features
    blocks = base // 32
    xb = x[:, :base].reshape(spec.batch, blocks, 32)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.float64)
    sx = (amax / np.float32(127)).astype(np.float64)
    qz = np.rint(q[:, :base]).reshape(spec.out_features, blocks, 32)  # exact small integers (codes minus zero points)
    s = scales.astype(np.float64)[:, np.arange(blocks) * 32 // spec.group]
    full = (sx[:, None, :] * s[None] * np.einsum("obk,nbk->nob", qz, xq)).sum(-1)
    return full + x[:, base:].astype(np.float64) @ w[:, base:].T


def case(spec: QGemvI8Spec, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << spec.bits, (spec.out_features, spec.in_features), dtype=np.uint8)
    q[:, :3] = (0, (1 << spec.bits) - 1, 1 << (spec.bits - 1))  # extreme codes (int8: 255 flips to 127)
    scales = (rng.random((spec.out_features, spec.n_groups)) * 0.05 + 0.005).astype(np.float16)
    zeros = None if spec.sym else np.rint(rng.random((spec.out_features, spec.n_groups))
                                          * ((1 << spec.bits) - 1)).astype(np.float16)
    x = rng.standard_normal((spec.batch, spec.in_features)).astype(np.float32)
    x[:, ::97] *= 20  # outliers
    x[0, :min(32, spec.in_features)] = 0  # an all-zero block: sx = 0
    return x, pack(q, spec.bits), scales, zeros


def run(module, spec, x, qweight, scales, zeros) -> np.ndarray:
    import tvm

    args = [x, qweight, scales] + ([] if zeros is None else [zeros])
    out = tvm.runtime.tensor(np.full((spec.batch, spec.out_features), np.nan, np.float32))
    module[spec.name](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("usdot", [False, True])
def test_emulated_kernel_matches_the_int8_reference(usdot):
    specs = USDOT_SPECS if usdot else SPECS
    module = emulated(specs, usdot)
    for spec in specs:
        x, qweight, scales, zeros = case(spec)
        y = run(module, spec, x, qweight, scales, zeros)
        ref = reference(spec, x, qweight, scales, zeros)
        assert np.isfinite(y).all(), spec.name
        err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
        assert err <= 1e-5 * scale, (spec.name, err, scale)


def _disassembly(specs, key: str, tmp_path) -> dict[str, str]:
    """objdump -d of the aarch64 library of `specs` for target `key`, per kernel symbol."""
    if shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("aarch64-linux-gnu-objdump") is None:
        pytest.skip("gcc-aarch64-linux-gnu / binutils-aarch64-linux-gnu not installed")
    lib = tmp_path / f"{key.replace(':', '_').replace('+', '_')}.so"
    build_kernel_library(specs, key, lib)
    text = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(lib)], capture_output=True, text=True,
                          check=True).stdout
    funcs, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.+)>:$", line):
            name = m.group(1)
            funcs[name] = ""
        elif name:
            funcs[name] += line + "\n"
    return funcs


def _lowered(key: str, bits: int, rows: int = 1):
    """The matmul kernel the lowering picks for a 576 x 1536 qlinear on target `key` with int8 activations."""
    target = resolve_target(key)
    return lower_linear.matmul_spec(lower_linear.k, 576, 1536, bits, 32, True, rows,
                                    target.supports_int8_activations, arch=target.arch)


def test_cortex_a76_gemv_kernels_use_sdot(tmp_path):
    key = target_key("aarch64-linux", "cortex-a76")
    specs = [_lowered(key, 4), _lowered(key, 8), _lowered(key, 4, rows=16)]
    assert all(isinstance(s, QGemvI8Spec) for s in specs)
    funcs = _disassembly(specs, key, tmp_path)
    for spec in specs:  # the kernel and its parallel body (TVM outlines it as <name>_compute_)
        body = "".join(code for sym, code in funcs.items() if sym.startswith(spec.name))
        assert re.search(r"\tsdot\t", body), spec.name
    # +i8mm: int8 codes go to usdot unflipped
    i8mm = _disassembly([_lowered(key + "+i8mm", 8)], key + "+i8mm", tmp_path)
    assert re.search(r"\tusdot\t", "".join(i8mm.values()))


def test_cortex_a72_gets_float_kernels_without_sdot(tmp_path):
    key = target_key("aarch64-linux", "cortex-a72")  # Raspberry Pi 4: NEON, no dotprod
    target = resolve_target(key)
    assert not target.supports_int8_activations and target.activations == ("float32",)
    with pytest.raises(BitsmithError, match=r"cortex-a72\), which lacks the dot-product extension"):
        QGemvI8Spec(64, 576, 4, 32, True, 1).prim_func(target)
    specs = [_lowered(key, 4), _lowered(key, 8)]
    assert all(isinstance(s, GemvSpec) for s in specs)
    funcs = _disassembly(specs, key, tmp_path)
    assert funcs and not re.search(r"\t(sdot|udot|usdot)\t", "".join(funcs.values()))


def test_generic_aarch64_refuses_int8_activations_and_unknown_cpus():
    generic = resolve_target("aarch64-linux")
    assert generic.mcpu == "generic" and not generic.supports_int8_activations
    assert resolve_target("aarch64-linux:generic+dotprod").supports_int8_activations
    assert "QGemvX16Spec" not in resolve_target("aarch64-linux:cortex-a76").families  # x86-only layout kernel
    with pytest.raises(BitsmithError, match="unknown aarch64 CPU 'cortex-a99'"):
        resolve_target("aarch64-linux:cortex-a99")
    assert target_key("aarch64-linux", "cortex-a76", ("i8mm",)) == "aarch64-linux:cortex-a76+i8mm"
    assert target_key("host", "cortex-a76") == "host"


def test_device_profiles_pick_the_core_and_its_dot_product_features(tmp_path):
    from bitsmith.devices import device_profile, for_device
    from bitsmith.options import CompileOptions
    from bitsmith.pipeline import kernel_target

    def key(profile) -> str:
        return kernel_target(for_device(CompileOptions(), profile))

    assert key(device_profile("raspberry-pi-5")) == "aarch64-linux:cortex-a76+dotprod"
    assert key(device_profile("raspberry-pi-4")) == "aarch64-linux:cortex-a72"
    assert not resolve_target(key(device_profile("raspberry-pi-4"))).supports_int8_activations
    custom = tmp_path / "board.json"  # a user profile without an LLVM cpu: generic + its features
    custom.write_text('{"name": "board", "ram": "4GB", "bandwidth_gbs": 8, "cores": 4, '
                      '"features": ["neon", "dotprod", "i8mm"]}')
    target = resolve_target(key(device_profile(custom)))
    assert target.mcpu == "generic" and target.supports_int8_activations and "i8mm" in target.features
