"""The compiled executor against the numpy reference: logits, greedy tokens, runtime-only import, caching, targets."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, TargetOptions, compile_model
from bitsmith.tools.run import reference_session
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.session import CompiledSession
from bitsmith.runtime.generate import generate
from bitsmith.runtime.sampling import SamplingParams

QUANT = {
    "fp32": QuantOptions(),
    "int4-g32-asym": QuantOptions("rtn", bits=4, group_size=32, sym=False, keep_default=False),
    "int3-sym-pc": QuantOptions("rtn", bits=3, group_size=-1, sym=True, keep_default=False),
    "int8-g64": QuantOptions("rtn", bits=8, group_size=64, sym=True),
}
CONTEXT_64 = MemoryOptions(context=64)


def _compile(tiny_artifact, quant: QuantOptions = QuantOptions(), target: str = "host"):
    return tiny_artifact(CompileOptions(quant=quant, memory=CONTEXT_64, target=TargetOptions(target)))


def _greedy(session, prompt: list[int], n: int) -> list[int]:
    return list(generate(session, prompt, n, SamplingParams()))  # temperature 0: argmax, no stop ids


@pytest.mark.parametrize("scheme", sorted(QUANT))
def test_logits_match_reference(tiny_artifact, scheme):
    art = load_artifact(_compile(tiny_artifact, QUANT[scheme]))
    compiled, ref = CompiledSession(art), reference_session(art, 64)
    prompt = [5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 4, 50, 19, 7, 23, 64, 30, 11]  # 19: two prefill chunks
    got, want = compiled.prefill(prompt), ref.prefill(prompt)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-4 * scale  # fp32 kernels vs numpy: summation order only
    for token in (8, 90, 1):
        got, want = compiled.decode(token), ref.decode(token)
        assert np.abs(got - want).max() <= 2e-4 * scale
    compiled.reset()
    assert np.allclose(compiled.prefill(prompt[:3]), ref_reset_prefill(art, prompt[:3]), rtol=0, atol=2e-4 * scale)


def ref_reset_prefill(art, prompt):
    return reference_session(art, 64).prefill(prompt)


def test_context_limit_is_a_clear_error(tiny_artifact):
    session = CompiledSession(load_artifact(_compile(tiny_artifact)))
    with pytest.raises(BitsmithError, match="exceed the context of 64"):
        session.prefill(list(range(65)))


def test_kernel_cache_rebuilds_only_what_changed(tiny_artifact, tiny_llama_dir, tmp_path, monkeypatch):
    opts = QUANT["int4-g32-asym"]
    first = load_artifact(_compile(tiny_artifact, opts)).manifest
    # a private cache holding exactly the first compile's kernels (copied from the test cache it was built in)
    names = {call[0][:80] for s in first["kernels"]["schedules"].values() for call in s["calls"]}
    cache = tmp_path / "kernel-cache"
    cache.mkdir()
    for obj in Path(os.environ["BITSMITH_KERNEL_CACHE"]).glob("*.o"):
        if obj.name.rsplit("-", 1)[0] in names:
            shutil.copy(obj, cache / obj.name)
    monkeypatch.setenv("BITSMITH_KERNEL_CACHE", str(cache))

    def build(out, quant):
        path = compile_model(tiny_llama_dir, tmp_path / out, CompileOptions(quant=quant, memory=CONTEXT_64))
        return load_artifact(path).manifest["kernels"]["build"]

    again = build("b", opts)
    assert again["built"] == 0 and again["cached"] == again["kernels"] == first["kernels"]["build"]["kernels"]
    changed = build("c", dataclasses.replace(opts, schemes=(("layers.1.mlp.down_proj", "int8"),)))
    # int8 down_proj: one new GEMV/GEMM per schedule (rows 1, 4, 16, 32, 64); nothing else is rebuilt
    assert changed["built"] == 5, changed


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'torch' or name.startswith('bitsmith.compiler') or name.startswith('bitsmith.passes') \\
                or name.startswith('bitsmith.codegen') or name == 'transformers':
            raise ImportError('blocked in this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_an_artifact_without_torch_or_the_compiler(tiny_artifact):
    path = _compile(tiny_artifact, QUANT["int4-g32-asym"])
    want = _greedy(CompiledSession(load_artifact(path)), [5, 17, 3], 12)
    script = BLOCK_TORCH + f"""
import json
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.session import CompiledSession
from bitsmith.runtime.generate import generate
from bitsmith.runtime.sampling import SamplingParams
out = list(generate(CompiledSession(load_artifact({str(path)!r})), [5, 17, 3], 12, SamplingParams()))
try:
    import torch
    raise SystemExit('torch imported')
except ImportError:
    pass
assert not any(m.startswith(('bitsmith.compiler', 'bitsmith.passes', 'torch')) for m in sys.modules)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == want


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="gcc-aarch64-linux-gnu is not installed")
def test_aarch64_cross_compile_exports_the_kernels(tiny_artifact):
    path = _compile(tiny_artifact, QUANT["int4-g32-asym"], target="aarch64-linux")
    art = load_artifact(path)
    plan = art.manifest["kernels"]
    library = path / plan["library"]
    assert plan["library"] == "kernels/aarch64-linux.so" and plan["arch"] == "aarch64"
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    kernels = {c[0] for s in plan["schedules"].values() for c in s["calls"]}
    assert kernels and all(f" __tvm_ffi_{k}\n" in symbols for k in kernels)  # TVM FFI exports
    with pytest.raises(BitsmithError, match="built for aarch64-linux"):
        CompiledSession(art)
