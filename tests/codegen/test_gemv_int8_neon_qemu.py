"""The aarch64 sdot / usdot GEMV kernels run under QEMU user-mode (the cores of the device profiles) against the
numpy oracle of test_gemv_int8_neon.py: same |y - ref| <= 1e-5 max|ref| bound.

The kernels are built into an aarch64 .so here; an emulated arm64 Python (tools/emulate.py's cached sysroot and
wheels) loads it with the runtime-only TVM from the aarch64 apache-tvm wheel, calls every kernel on inputs from an
.npz and writes the outputs back. Skipped where qemu-aarch64-static, the sysroot or the aarch64 wheels are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitsmith.codegen.build import build_kernel_library
from bitsmith.codegen.gemv_int8 import QGemvI8Spec
from bitsmith.errors import BitsmithError
from bitsmith.tools import emulate, package

sys.path.insert(0, str(Path(__file__).parent))
from test_gemv_int8_neon import case, reference  # the oracle and inputs, one definition

SPECS = [QGemvI8Spec(7, 576, 4, 32, True, 1), QGemvI8Spec(33, 200, 4, 64, False, 3),
         QGemvI8Spec(16, 1536, 4, 128, True, 16), QGemvI8Spec(9, 576, 8, 32, True, 2),
         QGemvI8Spec(9, 200, 8, -1, False, 1), QGemvI8Spec(5, 37, 4, -1, False, 2),
         QGemvI8Spec(6, 160, 4, 32, False, 2), QGemvI8Spec(6, 96, 8, 32, True, 3)]  # 4- and 8-lane vector tails
# QEMU core per build: cortex-a76 has dotprod (sdot) but not i8mm; "max" has both (usdot)
BUILDS = {"aarch64-linux:cortex-a76": "cortex-a76", "aarch64-linux:cortex-a76+i8mm": "max"}
RUNNER = """
import sys, numpy as np, tvm
lib = tvm.runtime.load_module(sys.argv[1])
data = np.load(sys.argv[2])
names = sorted({k.split('/')[0] for k in data.files})
out = {}
for name in names:
    args = [data[f"{name}/{a}"] for a in ("x", "qweight", "scales", "zeros") if f"{name}/{a}" in data.files]
    y = tvm.runtime.tensor(np.full(tuple(data[f"{name}/shape"]), np.nan, np.float32))
    lib[name](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], y)
    out[name] = y.numpy()
np.savez(sys.argv[3], **out)
"""


@pytest.fixture(scope="module")
def emulated_python(tmp_path_factory):
    """(command prefix without -cpu, PYTHONPATH) of an emulated arm64 Python with numpy and the TVM runtime."""
    if emulate.missing_tools() and not any(emulate.cache_dir().glob("sysroot-arm64-*/usr/bin/python3.11")):
        pytest.skip(emulate.missing_tools())
    if emulate.shutil.which(emulate.QEMU) is None:
        pytest.skip("qemu-aarch64-static not installed (apt-get install qemu-user-static)")
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the emulated sysroot has Python 3.11; the wheels here are for this Python")
    pins = package.pinned(package.BASE_REQUIREMENTS + (package.TVM_DIST,))
    cache = package.wheel_cache("aarch64-linux")
    if any(package._find_wheel(cache, n, v) is None for n, v in pins.items()):
        pytest.skip(f"aarch64 wheels not cached in {cache} (bitsmith package --target aarch64-linux --offline)")
    try:
        root = emulate.sysroot("3.11")  # cached after the first run; needs a Debian mirror before that
    except BitsmithError as err:
        pytest.skip(f"no aarch64 emulation here: {err}")
    bundle = tmp_path_factory.mktemp("bundle")  # just enough of a bundle for emulate.bundle_site
    (bundle / "wheels").symlink_to(cache)
    (bundle / "bundle.json").write_text(json.dumps({"target": "aarch64-linux", "python": "3.11", "requirements": {
        n: v for n, v in pins.items() if n != package.TVM_DIST}}))
    site = emulate.bundle_site(bundle)
    runtime = tmp_path_factory.mktemp("runtime")
    package.copy_tvm_runtime(package.tvm_runtime_files(), runtime / "tvm",
                             package._find_wheel(cache, package.TVM_DIST, pins[package.TVM_DIST]))
    command = emulate.python_command(root, "3.11")
    return command[:1] + command[3:], f"{runtime}:{site}"


def _run(emulated_python, key: str, cpu: str, specs, tmp_path):
    """Build `specs` for `key`, run them on QEMU core `cpu`: (the finished process, the inputs per kernel)."""
    command, pythonpath = emulated_python
    lib = tmp_path / "kernels.so"
    build_kernel_library(specs, key, lib)
    inputs, cases = {}, {}
    for spec in specs:
        cases[spec.name] = case(spec, seed=3)
        for name, value in zip(("x", "qweight", "scales", "zeros"), cases[spec.name]):
            if value is not None:
                inputs[f"{spec.name}/{name}"] = value
        inputs[f"{spec.name}/shape"] = np.array([spec.batch, spec.out_features])
    np.savez(tmp_path / "in.npz", **inputs)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {"PYTHONPATH": pythonpath, "TVM_USE_RUNTIME_LIB": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([command[0], "-cpu", cpu, *command[1:], str(tmp_path / "runner.py"), str(lib),
                           str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    return done, cases


@pytest.mark.parametrize("key", list(BUILDS))
def test_kernels_match_the_reference_under_qemu(emulated_python, key, tmp_path):
    specs = [s for s in SPECS if s.bits == 8] if "i8mm" in key else SPECS
    done, cases = _run(emulated_python, key, BUILDS[key], specs, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    for spec in specs:
        y, ref = out[spec.name], reference(spec, *cases[spec.name])
        err, scale = float(np.abs(y - ref).max()), float(np.abs(ref).max())
        assert np.isfinite(y).all() and err <= 1e-5 * scale, (spec.name, err, scale)


def test_the_sdot_kernel_faults_on_a_core_without_dotprod(emulated_python, tmp_path):
    """The cortex-a76 build on a cortex-a72 (Raspberry Pi 4): SIGILL, so the kernel does execute sdot, and a
    device profile must never get a CPU newer than its core (the lowering gives the a72 float GEMVs)."""
    done, _ = _run(emulated_python, "aarch64-linux:cortex-a76", "cortex-a72", SPECS[:1], tmp_path)
    assert done.returncode == -4, (done.returncode, done.stderr[-500:])  # -SIGILL


def test_tinystories_int8_activations_on_a_pi5_core_give_the_vnni_greedy_tokens(emulated_python, shared_data,
                                                                                tmp_path):
    """A whole model: TinyStories int4 g32 for raspberry-pi-5 with int8 activations (every qlinear a sdot
    kernel) bundled and run under QEMU cortex-a76 gives the host's int8-activation (VNNI) greedy tokens: the
    same activation quantization and exact integer dots, so only fp32 summation order differs."""
    from bitsmith.codegen.target import host_target
    from bitsmith.devices import device_profile, for_device
    from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, TargetOptions
    from bitsmith.pipeline import compile_model
    from bitsmith.runtime.sampling import SamplingParams
    from bitsmith.tools.emulate import run_bundle
    from bitsmith.tools.run import run_prompt

    if not host_target().supports_int8_activations:
        pytest.skip("the host lacks AVX-512 VNNI: no x86 int8-activation run to compare with")
    options = CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, keep_default=False),
                             memory=MemoryOptions(context=256), target=TargetOptions(activations="int8"))
    source = shared_data / "tinystories-656k"
    host = compile_model(source, tmp_path / "x86", options)
    arm = compile_model(source, tmp_path / "arm", for_device(options, device_profile("raspberry-pi-5")))
    kernels = json.loads((arm / "manifest.json").read_text())["kernels"]
    calls = [call[0] for call in kernels["schedules"]["rows1"]["calls"]]
    assert kernels["target_cpu"] == "cortex-a76" and any(k.startswith("qgemv_i8a_b4") for k in calls)
    bundle = package.package(arm, tmp_path / "bundle", target="aarch64-linux").bundle
    _, ids = run_prompt(host, "Once upon a time", 24, SamplingParams(temperature=0.0))
    run = run_bundle(bundle, ["Once upon a time", "--max-tokens", "24", "--json"], "cortex-a76")
    assert run.json()["token_ids"] == ids and len(ids) == 24
