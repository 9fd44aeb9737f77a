"""`bitsmith package`: the bundle runs with its own runtime alone (no compiler, no torch, TVM's runtime library only)
and gives the artifact's greedy tokens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, TargetOptions
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.tools.package import package, runtime_modules
from bitsmith.tools.run import run_prompt
from conftest import REPO_ROOT, attach_char_tokenizer

# Put first on the bundle's path: torch "not installed" (tvm_ffi tries it and goes on), and at exit a record of
# every module the process imported and every shared library it mapped.
PROBE = """
import atexit, json, os, sys
def _record():
    libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if l.rstrip().endswith('.so') or '.so.' in l})
    mods = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())}
    json.dump({'modules': mods, 'libs': libs}, open(os.environ['PROBE_OUT'], 'w'))
atexit.register(_record)
"""
ABOVE_RUNTIME = ("bitsmith.compiler", "bitsmith.codegen", "bitsmith.passes", "bitsmith.search", "bitsmith.cli",
                 "bitsmith.pipeline", "bitsmith.tools", "bitsmith.options")


def probe_site(directory: Path) -> Path:
    (directory / "torch").mkdir(parents=True)
    (directory / "torch" / "__init__.py").write_text("raise ImportError('no torch on the device')\n")
    (directory / "sitecustomize.py").write_text(PROBE)
    return directory


def run_bundle(bundle: Path, site: Path, *args: str, timeout: int = 300) -> tuple[dict, dict]:
    """(the launcher's --json output, what the process loaded), with the system Python and its site-packages
    (numpy, tokenizers, tvm_ffi) behind the bundle's runtime/ on the path."""
    out = site / "probe.json"
    env = dict(os.environ, PYTHON=shutil.which("python3") or "python3", BUNDLE_SITE=str(site), PROBE_OUT=str(out))
    env.pop("TVM_USE_RUNTIME_LIB", None)
    done = subprocess.run([str(bundle / "run"), *args, "--json"], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=site)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), json.loads(out.read_text())


def test_runtime_modules_are_the_runtime_and_what_it_imports():
    modules = {str(p) for p in runtime_modules(REPO_ROOT)}
    assert "bitsmith/runtime/executor.py" in modules and "bitsmith/runtime/__main__.py" in modules
    assert {"bitsmith/__init__.py", "bitsmith/errors.py"} <= modules
    assert all(m.startswith("bitsmith/runtime/") for m in modules - {"bitsmith/__init__.py", "bitsmith/errors.py"})


def test_host_bundle_runs_alone_and_matches_bitsmith_run(tiny_artifact, tmp_path):
    artifact = tmp_path / "art"
    shutil.copytree(tiny_artifact(CompileOptions(target=TargetOptions("host"))), artifact)
    attach_char_tokenizer(artifact)
    report = package(artifact, tmp_path / "bundle")
    bundle = report.bundle
    for name in ("artifact/manifest.json", "runtime/bitsmith/runtime/__main__.py", "runtime/tvm/lib/libtvm_runtime.so",
                 "requirements.txt", "run", "serve", "install", "README.md", "bundle.json"):
        assert (bundle / name).is_file(), name
    assert not list(bundle.rglob("libtvm_compiler*")) and not (bundle / "runtime" / "bitsmith" / "compiler").exists()
    assert "apache-tvm==" not in (bundle / "requirements.txt").read_text()  # tvm comes as runtime/tvm
    assert report.installed_bytes < report.naive_bytes / 3  # the compiler library alone is ~250 MB
    with tarfile.open(report.archive) as tar:
        assert "bundle/run" in tar.getnames() and "bundle/runtime/tvm/lib/libtvm_runtime.so" in tar.getnames()

    expected_text, expected_ids = run_prompt(artifact, "abc", 12, SamplingParams())
    result, loaded = run_bundle(bundle, probe_site(tmp_path / "site"), "abc", "--max-tokens", "12")
    assert result["token_ids"] == expected_ids and result["text"] == expected_text
    files = {n: f for n, f in loaded["modules"].items() if n.split(".")[0] in ("bitsmith", "tvm") and f}
    assert all(f.startswith(str(bundle / "runtime")) for f in files.values()), "a module came from outside the bundle"
    assert not [n for n in loaded["modules"] if n.startswith(ABOVE_RUNTIME)]
    libs = [Path(p).name for p in loaded["libs"]]
    assert "libtvm_runtime.so" in libs and not any("tvm_compiler" in name for name in libs)


def test_package_refuses_an_artifact_for_another_target(tiny_artifact, tmp_path):
    artifact = tiny_artifact(CompileOptions(target=TargetOptions("host")))
    with pytest.raises(BitsmithError, match="--target aarch64-linux"):
        package(artifact, tmp_path / "bundle", target="aarch64-linux")
    with pytest.raises(BitsmithError, match="cannot package"):
        package(artifact, tmp_path / "bundle", target="riscv")


def test_aarch64_bundle_carries_arm_runtime_and_wheels(shared_data, tmp_path):
    """TinyStories-656K int4 cross-compiled, packaged --offline: every binary in it is aarch64 (ELF e_machine 183),
    the wheels are for manylinux aarch64, and the README states the sizes. Needs aarch64-linux-gnu-gcc and PyPI
    (or the wheels in ~/.cache/bitsmith/wheels)."""
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    from bitsmith.pipeline import compile_model

    artifact = compile_model(shared_data / "tinystories-656k", tmp_path / "art",
                             CompileOptions(target=TargetOptions("aarch64-linux")))
    try:
        report = package(artifact, tmp_path / "bundle", target="aarch64-linux", offline=True)
    except BitsmithError as exc:
        if "pip download" not in str(exc):
            raise
        pytest.skip(f"the aarch64 wheels are neither cached nor downloadable here: {exc}")
    binaries = [p for p in report.bundle.rglob("*.so")]
    assert {p.name for p in binaries} == {"aarch64-linux.so", "libtvm_runtime.so"}
    for path in binaries:
        header = path.read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183, path
    wheels = sorted(p.name for p in (report.bundle / "wheels").glob("*.whl"))
    assert len(wheels) == len((report.bundle / "requirements.txt").read_text().splitlines()) - 1
    assert all("aarch64" in w or w.endswith("-none-any.whl") for w in wheels)
    readme = (report.bundle / "README.md").read_text()
    assert f"| bundle .tar.gz | {report.archive_bytes / 2**20:.1f} MiB |" in readme
    assert report.archive_bytes < 40 << 20 and report.installed_bytes < report.naive_bytes / 3


def test_host_bundle_serves(tiny_artifact, tmp_path):
    """./serve answers an OpenAI completion with bitsmith run's greedy text, under the artifact's own name."""
    import select
    import urllib.request

    artifact = tmp_path / "tiny-art"
    shutil.copytree(tiny_artifact(CompileOptions(target=TargetOptions("host"))), artifact)
    attach_char_tokenizer(artifact)
    bundle = package(artifact, tmp_path / "bundle").bundle
    expected_text, _ = run_prompt(artifact, "abc", 8, SamplingParams())
    env = dict(os.environ, PYTHON=shutil.which("python3") or "python3", BUNDLE_SITE=str(probe_site(tmp_path / "s")),
               PROBE_OUT=str(tmp_path / "probe.json"))
    server = subprocess.Popen([str(bundle / "serve"), "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([server.stderr], [], [], 120)
        assert ready, "the server did not start in 120 s"
        line = server.stderr.readline()
        assert "serving tiny-art on http://" in line, line
        url = line.split()[-1]
        body = json.dumps({"model": "tiny-art", "prompt": "abc", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["text"] == expected_text
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_device_checks_core_and_fit(tiny_artifact, tmp_path):
    """--device: kernels for a newer core are refused for an older one (sdot on a Cortex-A72 is SIGILL), a device of
    another architecture is refused, and a bundle for a device that fits carries the fit check in its README."""
    from bitsmith.devices import device_profile
    from bitsmith.tools.package import check_device

    artifact = tiny_artifact(CompileOptions(target=TargetOptions("host")))
    with pytest.raises(BitsmithError, match="--device raspberry-pi-4"):
        check_device(artifact, "cortex-a76", device_profile("raspberry-pi-4"))
    with pytest.raises(BitsmithError, match="does not run on raspberry-pi-5"):
        package(artifact, tmp_path / "b0", target="host", device=device_profile("raspberry-pi-5"))
    report = package(artifact, tmp_path / "b1", device=device_profile("host"))
    readme = (report.bundle / "README.md").read_text()
    assert "predicted RSS on host" in readme and json.loads((report.bundle / "bundle.json").read_text())["device_fit"]


@pytest.mark.parametrize("command", ["runtime", "cli"])
def test_running_an_artifact_loads_no_compiler_library(tiny_artifact, tmp_path, command):
    """With the full install (apache-tvm with libtvm_compiler.so present), `python -m bitsmith.runtime run` and
    `bitsmith run` map libtvm_runtime.so and never libtvm_compiler.so."""
    import sys

    artifact = tmp_path / "art"
    shutil.copytree(tiny_artifact(CompileOptions(target=TargetOptions("host"))), artifact)
    attach_char_tokenizer(artifact)
    site = probe_site(tmp_path / "site")
    shutil.rmtree(site / "torch")  # torch as installed: this is the full install
    env = dict(os.environ, PYTHONPATH=f"{site}:{REPO_ROOT}", PROBE_OUT=str(site / "probe.json"))
    env.pop("TVM_USE_RUNTIME_LIB", None)
    program = ["-m", "bitsmith.runtime"] if command == "runtime" else ["-c", "from bitsmith.cli import main; main()"]
    done = subprocess.run([sys.executable, *program, "run", str(artifact), "abc", "--max-tokens", "4", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    libs = [Path(p).name for p in json.loads((site / "probe.json").read_text())["libs"]]
    assert "libtvm_runtime.so" in libs and "libtvm_compiler.so" not in libs
