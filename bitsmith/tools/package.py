"""`bitsmith package`: an artifact + the runtime alone + TVM's runtime library alone + pinned requirements -> a bundle."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import bitsmith
from bitsmith.devices import DeviceProfile
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.memory import BUNDLE_RUNTIME_BASE_BYTES
from bitsmith.runtime.step_runner import kernel_plan
from bitsmith.tools.fit import format_fit, require_fit
from bitsmith.tools.package_files import launchers, readme_text

PACKAGE_TARGETS = ("host", "aarch64-linux")
# pip's view of each target: platform tags newest first (numpy and tvm are tagged 2_27/2_28, tokenizers 2_17).
PLATFORMS = {"aarch64-linux": ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
                               "manylinux_2_17_aarch64", "manylinux2014_aarch64")}
TVM_DIST = "apache-tvm"
# What the runtime imports from outside the standard library, as distributions, installed with --no-deps (the list
# is the whole closure: tokenizers' huggingface-hub is only for downloading, which a device never does).
BASE_REQUIREMENTS = ("numpy", "apache-tvm-ffi", "ml_dtypes", "typing_extensions")
TOKENIZER_REQUIREMENTS = ("tokenizers",)
CHAT_REQUIREMENTS = ("jinja2", "markupsafe")
# Not in a bundle's requirements: llguidance (runtime/constrained.py imports it only when a request asks for a
# constraint; the bundle README says how to add it).
# TVM files the runtime needs besides the Python modules `import tvm` loads with TVM_USE_RUNTIME_LIB=1.
TVM_EXTRA_FILES = ("lib/libtvm_runtime.so", "LICENSE", "NOTICE")


@dataclass
class BundleReport:
    bundle: Path
    archive: Path
    target: str
    bundle_bytes: int  # the directory (with wheels/ when --offline)
    archive_bytes: int  # the .tar.gz
    installed_bytes: int  # on the device: the bundle without wheels/ + the requirements unpacked
    artifact_bytes: int
    naive_bytes: int  # the artifact + every wheel of the full install (apache-tvm with its compiler), unpacked
    sizes: dict[str, dict[str, int | None]] = field(default_factory=dict)  # requirement -> wheel / unpacked bytes

    def summary(self) -> str:
        return (f"bundle {self.bundle} ({self.target}): {mib(self.bundle_bytes)} directory, {mib(self.archive_bytes)} "
                f"{self.archive.name}; installed on the device {mib(self.installed_bytes)} (artifact "
                f"{mib(self.artifact_bytes)}), against {mib(self.naive_bytes)} for the artifact + a full install")


def mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def tree_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()
               and not any(part in skip for part in p.relative_to(path).parts))


def runtime_modules(root: Path) -> list[Path]:
    """bitsmith/runtime/*.py and every bitsmith module they import, transitively (read from the source, as
    tests/test_layering.py does): the runtime ships with exactly what it imports."""
    package = root / "bitsmith"
    todo = sorted((package / "runtime").glob("*.py")) + [package / "__init__.py"]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                if name.split(".")[0] != "bitsmith":
                    continue
                parts = name.split(".")[1:]
                for candidate in (package.joinpath(*parts).with_suffix(".py"), package.joinpath(*parts, "__init__.py")):
                    if parts and candidate.is_file():
                        todo.append(candidate)
                for i in range(1, len(parts)):  # parent packages' __init__.py run on import too
                    init = package.joinpath(*parts[:i], "__init__.py")
                    if init.is_file():
                        todo.append(init)
    return sorted(p.relative_to(root) for p in seen)


def tvm_runtime_files() -> list[str]:
    """Paths inside the tvm package that the runtime loads: the modules `import tvm` imports with
    TVM_USE_RUNTIME_LIB=1 (asked of a fresh interpreter), all of tvm/runtime/, and the runtime library."""
    probe = ("import os, sys, tvm, tvm.runtime\n"
             "assert tvm.base._RUNTIME_ONLY\n"
             "top = os.path.dirname(tvm.__file__)\n"
             "names = {os.path.relpath(m.__file__, top) for n, m in list(sys.modules.items())\n"
             "         if (n == 'tvm' or n.startswith('tvm.')) and getattr(m, '__file__', None)}\n"
             "names |= {os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(os.path.join(top, 'runtime'))\n"
             "          for f in fs if f.endswith('.py')}\n"
             "print('\\n'.join(sorted(names)))\n")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise BitsmithError(f"could not list the TVM runtime's modules: {done.stderr.strip().splitlines()[-1:]}",
                            where="package", fix=f"check that {TVM_DIST} imports with TVM_USE_RUNTIME_LIB=1")
    return sorted(set(done.stdout.split()) | set(TVM_EXTRA_FILES))


def pinned(names: tuple[str, ...]) -> dict[str, str]:
    """name -> the version installed here (the one bitsmith was tested with)."""
    try:
        return {name: metadata.version(name) for name in names}
    except metadata.PackageNotFoundError as exc:
        raise BitsmithError(f"{exc.name} is not installed here, so its version cannot be pinned", where="package",
                            fix=f"pip install {exc.name}") from exc


def wheel_cache(target: str) -> Path:
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return Path(os.environ.get("BITSMITH_CACHE", Path.home() / ".cache" / "bitsmith")) / "wheels" / f"{target}-{tag}"


def download_wheels(target: str, pins: dict[str, str], into: Path) -> dict[str, Path]:
    """The target's wheels for `pins` (no dependencies: the pins are the closure), fetched once into `into`."""
    into.mkdir(parents=True, exist_ok=True)
    found = {name: _find_wheel(into, name, version) for name, version in pins.items()}
    missing = [f"{n}=={pins[n]}" for n, w in found.items() if w is None]
    if missing:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into)]
        if target in PLATFORMS:
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            abi = f"cp{sys.version_info.major}{sys.version_info.minor}"
            command += ["--python-version", version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
                        "--abi", "none"] + [arg for tag in PLATFORMS[target] for arg in ("--platform", tag)]
        done = subprocess.run(command + missing, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BitsmithError(f"pip download of {target} wheels failed: {tail}", where="package",
                                fix="check the network (PyPI), or put the wheels in " + str(into))
        found = {name: _find_wheel(into, name, version) for name, version in pins.items()}
    lost = [n for n, w in found.items() if w is None]
    if lost:
        raise BitsmithError(f"pip downloaded no wheel for {lost}", where=str(into), fix="check the pinned versions")
    return found  # type: ignore[return-value]


def _find_wheel(directory: Path, name: str, version: str) -> Path | None:
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    return next((p for p in sorted(directory.glob("*.whl")) if p.name.lower().startswith(stem)), None)


def unpacked_bytes(wheel: Path) -> int:
    with zipfile.ZipFile(wheel) as zf:
        return sum(info.file_size for info in zf.infolist())


def installed_dist_bytes(name: str) -> int:
    """Bytes a distribution takes installed here (its RECORD), for the host target without downloaded wheels."""
    dist = metadata.distribution(name)
    return sum(int(f.size or 0) for f in dist.files or ())


def copy_tvm_runtime(files: list[str], destination: Path, wheel: Path | None) -> None:
    """tvm/<files> from the target's apache-tvm wheel, or from the tvm installed here (host)."""
    destination.mkdir(parents=True)
    if wheel is None:
        import importlib.util

        spec = importlib.util.find_spec("tvm")  # found, not imported: this process may not want TVM loaded
        source = Path(spec.origin).parent  # type: ignore[union-attr, arg-type]
        for name in files:
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, destination / name)
        return
    with zipfile.ZipFile(wheel) as zf:
        present = set(zf.namelist())
        for name in files:
            member = f"tvm/{name}"
            if member not in present:
                raise BitsmithError(f"{wheel.name} lacks {member}", where="package",
                                    fix=f"use the {TVM_DIST} version installed here ({metadata.version(TVM_DIST)})")
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).write_bytes(zf.read(member))
    os.chmod(destination / "lib" / "libtvm_runtime.so", 0o755)


def device_target(device: DeviceProfile) -> str:
    return "aarch64-linux" if device.arch == "aarch64" else "host"


def check_device(artifact_path: Path, plan_cpu: str, device: DeviceProfile) -> list[str]:
    """The fit check's lines for `device`, or a BitsmithError: kernels for another core, or a plan that does not fit."""
    if device.arch == "aarch64" and plan_cpu not in ("generic", device.llvm_cpu):
        # a core's kernels may use instructions another lacks (sdot on a Cortex-A72 is SIGILL)
        raise BitsmithError(f"the kernels were built for {plan_cpu}, {device.name} is a {device.llvm_cpu}",
                            where=str(artifact_path),
                            fix=f"compile with `bitsmith compile MODEL -o DIR --device {device.name}`")
    # the bundle's launchers load TVM's runtime library alone and no torch: its smaller base, not `bitsmith run`'s
    return format_fit(require_fit(artifact_path, device, BUNDLE_RUNTIME_BASE_BYTES), device)


def package(artifact_path: Path, output: Path, target: str | None = None, offline: bool = False,
            log: Callable[[str], None] | None = None, device: DeviceProfile | None = None) -> BundleReport:
    """Write the bundle directory `output` and `output`.tar.gz; see tools/package_files.py for the layout.
    `target` defaults to the device's (aarch64-linux for an ARM profile) or host; with `device`, the artifact must
    fit it (tools/fit.py) and its kernels must be for its core."""
    log = log or (lambda _: None)
    if target is None:
        target = device_target(device) if device is not None else "host"
    elif device is not None and device_target(device) != target:
        raise BitsmithError(f"--target {target} does not run on {device.name} ({device.arch})", where="package",
                            fix=f"drop --target, or use --target {device_target(device)}")
    if target not in PACKAGE_TARGETS:
        raise BitsmithError(f"cannot package for target {target!r}", where="package",
                            fix=f"use one of {', '.join(PACKAGE_TARGETS)}")
    artifact = load_artifact(artifact_path)
    plan = kernel_plan(artifact)
    if plan is None or plan.target.partition(":")[0] != target:
        built = "no kernels" if plan is None else f"kernels for {plan.target}"
        raise BitsmithError(f"the artifact has {built}, the bundle is for {target}", where=str(artifact_path),
                            fix=f"compile it with `bitsmith compile MODEL -o DIR --target {target}`")
    fit = check_device(artifact_path, plan.target_cpu, device) if device is not None else []
    for line in fit:
        log(line)
    if output.exists():
        raise BitsmithError("the bundle directory already exists", where=str(output),
                            fix="remove it or choose another -o")
    names = BASE_REQUIREMENTS
    tokenizer = artifact.manifest["tokenizer"]
    if tokenizer and tokenizer.get("kind") != "llama2c":
        names += TOKENIZER_REQUIREMENTS
    if tokenizer and tokenizer.get("chat_template"):
        names += CHAT_REQUIREMENTS
    pins = pinned(names + (TVM_DIST,))
    cross = target != "host"
    wheels = download_wheels(target, pins, wheel_cache(target)) if (cross or offline) else {}

    log(f"package: {artifact_path} -> {output} ({target})")
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(artifact_path, staging / "artifact")
    root = Path(bitsmith.__file__).resolve().parents[1]
    for module in runtime_modules(root):
        (staging / "runtime" / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / module, staging / "runtime" / module)
    copy_tvm_runtime(tvm_runtime_files(), staging / "runtime" / "tvm", wheels.get(TVM_DIST) if cross else None)
    requirements = {n: v for n, v in pins.items() if n != TVM_DIST}
    (staging / "requirements.txt").write_text(
        f"# {target}, Python {sys.version_info.major}.{sys.version_info.minor}: install with --no-deps (this is the "
        f"whole closure). TVM comes as runtime/tvm (its runtime library only), not from {TVM_DIST}.\n"
        + "".join(f"{n}=={v}\n" for n, v in requirements.items()))
    if offline:
        (staging / "wheels").mkdir()
        for name in requirements:
            shutil.copy2(wheels[name], staging / "wheels" / wheels[name].name)
    for name, text in launchers(Path(artifact_path).resolve().name).items():
        (staging / name).write_text(text)
        os.chmod(staging / name, 0o755)

    sizes: dict[str, dict[str, int | None]] = {}
    for name in pins:
        if name in wheels:
            sizes[name] = {"wheel": wheels[name].stat().st_size, "unpacked": unpacked_bytes(wheels[name])}
        else:
            sizes[name] = {"wheel": None, "unpacked": installed_dist_bytes(name)}
    artifact_bytes = tree_bytes(staging / "artifact")
    runtime_bytes = tree_bytes(staging / "runtime")
    installed = tree_bytes(staging, skip=("wheels",)) + sum(s["unpacked"] or 0 for n, s in sizes.items() if n != TVM_DIST)
    naive = artifact_bytes + sum(s["unpacked"] or 0 for s in sizes.values())
    known = all(s["wheel"] is not None for s in sizes.values())
    naive_copy = artifact_bytes + sum(s["wheel"] or 0 for s in sizes.values()) if known else None
    info = {"target": target, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "offline": offline, "requirements": requirements, "tvm": pins[TVM_DIST],
            "artifact_bytes": artifact_bytes, "runtime_bytes": runtime_bytes, "installed_bytes": installed,
            "naive_installed_bytes": naive, "naive_copy_bytes": naive_copy, "wheels": sizes,
            "kernels": plan.target, "device_fit": fit}
    (staging / "README.md").write_text(readme_text(info | {"bundle_bytes": None, "archive_bytes": None}))
    bundle_bytes = tree_bytes(staging)
    archive = output.with_name(output.name + ".tar.gz")
    _write_archive(staging, archive, output.name)
    info |= {"bundle_bytes": bundle_bytes, "archive_bytes": archive.stat().st_size}
    (staging / "README.md").write_text(readme_text(info))
    (staging / "bundle.json").write_text(json.dumps(info, indent=1) + "\n")
    _write_archive(staging, archive, output.name)  # again, with the sizes in its README
    staging.rename(output)
    return BundleReport(output, archive, target, bundle_bytes, archive.stat().st_size, installed, artifact_bytes,
                        naive, sizes)


def _write_archive(directory: Path, archive: Path, name: str) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(directory, arcname=name)
