"""CUDA kernel libraries built ahead of time with nvcc, on machines with or without a GPU (see tvm-0.27-notes.md):
the GPU half of codegen.build.build_kernel_library, the CUDA runtime plugin without a driver, and what a built
library holds."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import tvm

from bitsmith.codegen.cache import kernel_cache_dir, kernel_key, temporary_next_to
from bitsmith.codegen.target import Target
from bitsmith.errors import BitsmithError

CUDA_ERROR_NO_DEVICE = 100
FATBIN_MAGIC = 0xBA55ED50
_FATBIN_ELF, _FATBIN_ARCH_SPECIFIC = 2, 0x100000  # entry kind of a cubin; flag of an "a" arch (sm_90a)
_WHERE = "codegen cuda build"


def build_cuda(specs: dict[str, Any], target: Target, out: Path, cache: Path) -> int:
    """Compile the kernels `specs` (name -> spec) for the GPU `target` with nvcc (one module, one nvcc run)
    into the shared library `out`, written atomically; an identical earlier build is copied from the kernel
    cache `cache`. Returns how many kernels were compiled now (0: the library came from the cache).

    The library holds the host-side launchers and one fatbin with the target's SM code (no PTX): it loads
    in a runtime-only TVM on a machine with a driver. No GPU is needed here.
    """
    if not specs:
        raise BitsmithError("no kernels to build", where=_WHERE, fix="pass at least one kernel description")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise BitsmithError("nvcc is not on PATH", where=_WHERE,
                            fix="install the CUDA toolkit (12.x or 13.x) and put its bin/ on PATH")
    cached = cache / f"{target.name}-{_library_key(specs.values(), target, nvcc)}.so"
    built = 0
    if not cached.is_file():
        _compile_library(specs, target, cached, nvcc)
        built = len(specs)
    with temporary_next_to(out) as tmp:
        shutil.copyfile(cached, tmp)
        os.replace(tmp, out)
    return built


def _library_key(specs: Iterable[Any], target: Target, nvcc: str) -> str:
    """sha256 of the kernels' keys (spec, target, TVM and codegen versions, sources) and nvcc's version."""
    keys = sorted(kernel_key(spec, target) for spec in specs)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    identity = f"{version}:{','.join(keys)}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def _compile_library(specs: dict[str, Any], target: Target, path: Path, nvcc: str) -> None:
    ensure_cuda_runtime()

    funcs = {name: spec.prim_func(target) for name, spec in sorted(specs.items())}
    with _nvcc_mode(), target.tvm_target() as tvm_target:  # nvcc reads the arch from the current target
        try:
            module = tvm.compile(tvm.IRModule(funcs), target=tvm_target)
        except (RuntimeError, ValueError) as exc:
            raise BitsmithError(f"compiling {len(funcs)} CUDA kernels failed: {_first_error(str(exc))}",
                                where=_WHERE, fix=f"check that {nvcc} supports {target.tvm['arch']}") from exc
    _check_binary(module.mod, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_next_to(path) as tmp:
        module.export_library(str(tmp))
        os.replace(tmp, path)


# TVM's default, NVRTC, needs the cuda-bindings package. nvcc's --use_fast_math (TVM's default) would
# trade IEEE division, sqrt and sin/cos for approximations: __sinf of a rope angle of 8192 rad is off
# in the first digits, and int8 KV codes would differ from the CPU kernel's
_NVCC_ENV = {"TVM_CUDA_COMPILE_MODE": "nvcc", "TVM_CUDA_NVCC_NO_FAST_MATH": "1"}


@contextlib.contextmanager
def _nvcc_mode() -> Iterator[None]:
    """The environment TVM's nvcc callback reads, for the duration of a build."""
    before = {key: os.environ.get(key) for key in _NVCC_ENV}
    os.environ.update(_NVCC_ENV)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_binary(module: Any, target: Target) -> None:
    """Every CUDA module must hold compiled code: without the CUDA runtime TVM silently keeps the source."""
    cuda = [m for m in module.imports if m.kind == "cuda"]
    if not cuda or not all(m.is_runnable() for m in cuda):
        raise BitsmithError(f"the {target.name} kernels were not compiled to a binary", where=_WHERE,
                            fix="make sure tvm/lib/libtvm_runtime_cuda.so loads (see ensure_cuda_runtime)")


def _first_error(message: str) -> str:
    """nvcc's (or TVM's) first error line of a compile failure, else its last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "fatal" in line.lower()]
    errors = [line for line in errors if line != "Compilation error:"]
    return (errors or lines or ["(no message)"])[0]


# ---------------------------------------------------------------------------------------------
# The CUDA runtime plugin without a driver


def ensure_cuda_runtime() -> None:
    """Register TVM's CUDA module support (tvm/lib/libtvm_runtime_cuda.so), whatever the import order.

    The plugin links against the driver, libcuda.so.1; `import tvm` tries to load it and silently gives up
    when there is no driver. Then this loads, with RTLD_GLOBAL so that the plugin's symbols bind to it,
    the real driver if one is installed, else a stub whose entry points return CUDA_ERROR_NO_DEVICE
    (built once into the kernel cache), and loads the plugin again. Compiling needs no device.
    """
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    plugin = Path(tvm.__file__).resolve().parent / "lib" / "libtvm_runtime_cuda.so"
    if not plugin.is_file():
        raise BitsmithError(f"{plugin} is missing", where=_WHERE, fix="install apache-tvm with CUDA support")
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(cuda_stub(plugin)), mode=ctypes.RTLD_GLOBAL)
    _load_plugin(plugin)
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise BitsmithError(f"{plugin.name} loaded but registered no CUDA modules", where=_WHERE,
                            fix="reinstall apache-tvm==0.27.0.post1")


def _load_plugin(plugin: Path) -> None:
    """dlopen the plugin; its CUDA runtime (libcudart) may only be found next to nvcc."""
    try:
        ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
        return
    except OSError as first:
        error = first
    for cudart in _toolkit_cudarts():
        try:
            ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
            ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
            return
        except OSError as exc:
            error = exc
    raise BitsmithError(f"cannot load {plugin.name}: {error}", where=_WHERE,
                        fix="install the CUDA runtime (libcudart) of the toolkit nvcc belongs to, "
                            "or add its lib directory to LD_LIBRARY_PATH")


def _toolkit_cudarts() -> list[Path]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    root = Path(os.path.realpath(nvcc)).parent.parent
    return sorted(p for d in ("lib64", "lib") for p in (root / d).glob("libcudart.so.*") if p.is_file())


def cuda_stub(plugin: Path) -> Path:
    """A libcuda.so.1 defining every driver entry point `plugin` imports, each returning
    CUDA_ERROR_NO_DEVICE; built with `cc` once per symbol set into <kernel cache>/cuda-stub/."""
    symbols = _driver_symbols(plugin)
    digest = hashlib.sha256(" ".join(symbols).encode()).hexdigest()[:16]
    stub = kernel_cache_dir() / "cuda-stub" / digest / "libcuda.so.1"
    if stub.is_file():
        return stub
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BitsmithError("no C compiler (cc) to build the CUDA driver stub", where=_WHERE,
                            fix="install gcc, or the NVIDIA driver (libcuda.so.1)")
    stub.parent.mkdir(parents=True, exist_ok=True)
    source = "".join(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for name in symbols)
    with temporary_next_to(stub.with_suffix(".c")) as c_file, temporary_next_to(stub) as tmp:
        c_file.write_text(f"/* build-time stand-in for the CUDA driver: no device */\n{source}")
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(c_file)],
                       check=True, capture_output=True)
        os.replace(tmp, stub)
    return stub


def _driver_symbols(plugin: Path) -> list[str]:
    """The driver API functions (cuXxx, not the runtime's cudaXxx) that `plugin` leaves undefined."""
    nm = shutil.which("nm")
    if nm is None:
        raise BitsmithError("nm (binutils) is not installed", where=_WHERE, fix="apt-get install binutils")
    listing = subprocess.run([nm, "-D", "--undefined-only", str(plugin)], check=True, capture_output=True,
                             text=True).stdout
    return sorted({m.group(1) for m in re.finditer(r"\bU (cu[A-Z]\w*)", listing)})


# ---------------------------------------------------------------------------------------------
# What a library holds


def fatbin_archs(path: str | Path) -> set[str]:
    """The SM architectures ("sm_90a", ...) of the cubins in the fatbins embedded in the library `path`.

    TVM embeds the fatbin in its own module blob, where `cuobjdump` does not look: each fatbin is cut out
    and given to `cuobjdump --list-elf` when it is on PATH, else its entry headers are read here.
    """
    blobs = _fatbins(Path(path).read_bytes())
    cuobjdump = shutil.which("cuobjdump")
    archs: set[str] = set()
    for blob in blobs:
        try:
            archs |= _cuobjdump_archs(cuobjdump, blob) if cuobjdump else parse_fatbin_archs(blob)
        except subprocess.CalledProcessError:  # a cuobjdump older than the arch: read the headers
            archs |= parse_fatbin_archs(blob)
    return archs


def _fatbins(data: bytes) -> list[bytes]:
    """Every fatbin in `data`: header (magic u32, version u16, header size u16, payload size u64), payload."""
    blobs, start = [], data.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0 and start + 16 <= len(data):
        _, _, header, size = struct.unpack_from("<IHHQ", data, start)
        end = start + header + size
        if header == 16 and end <= len(data):
            blobs.append(data[start:end])
        start = data.find(struct.pack("<I", FATBIN_MAGIC), start + 4)
    return blobs


def parse_fatbin_archs(blob: bytes) -> set[str]:
    """The cubin archs of one fatbin, from its entry headers.

    An entry header starts with kind u16 (1 PTX, 2 cubin), u16, header size u32, payload size u64; the
    SM number (90) is the u32 at offset 28 and the flags u64 at offset 40 mark arch-specific code ("a").
    """
    _, _, header, size = struct.unpack_from("<IHHQ", blob, 0)
    archs, offset = set(), header
    while offset + 48 <= min(len(blob), header + size):
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, offset)
        (sm,) = struct.unpack_from("<I", blob, offset + 28)
        (flags,) = struct.unpack_from("<Q", blob, offset + 40)
        if kind == _FATBIN_ELF:
            archs.add(f"sm_{sm}" + ("a" if flags & _FATBIN_ARCH_SPECIFIC else ""))
        if entry_header == 0:
            break
        offset += entry_header + payload
    return archs


def _cuobjdump_archs(cuobjdump: str, blob: bytes) -> set[str]:
    with tempfile.TemporaryDirectory() as tmp:
        fatbin = Path(tmp) / "kernels.fatbin"
        fatbin.write_bytes(blob)
        listing = subprocess.run([cuobjdump, "--list-elf", str(fatbin)], check=True, capture_output=True,
                                 text=True).stdout
    return set(re.findall(r"\.(sm_\d+[a-z]?)\.cubin", listing))
