"""A compile's peak memory does not grow with the number of layers (weights are read and written a tensor at a time)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bitsmith.runtime.safetensors_io import read_safetensors
from bitsmith.tools.synthetic import LlamaShape, write_random_llama

PROBE = """
import json, sys, tracemalloc
from bitsmith.options import CompileOptions, QuantOptions, TargetOptions
from bitsmith.pipeline import compile_model
model, out, method, dtype = sys.argv[1:5]
quant = QuantOptions(method, bits=4, group_size=32, keep_default=False) if method != "none" else QuantOptions()
options = CompileOptions(dtype=None if dtype == "none" else dtype, quant=quant, target=TargetOptions("none"))
tracemalloc.start()  # numpy's buffers are traced too
compile_model(model, out, options)
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1]}))
"""


def shape(layers: int) -> LlamaShape:
    # 4.2M parameters per layer (8.4 MB in bf16): 6 more layers are 50 MB, far above the probe's noise
    return LlamaShape(hidden=512, layers=layers, intermediate=2048, heads=8, kv_heads=8, vocab=1024, tied=True,
                      max_position=256)


def peak_bytes(tmp_path, layers: int, method: str, dtype: str) -> int:
    model = tmp_path / f"m{layers}"
    if not model.exists():
        write_random_llama(model, shape(layers), "bfloat16", shard_bytes=16 << 20)
    out = tmp_path / f"a{layers}-{method}-{dtype}"
    run = subprocess.run([sys.executable, "-c", PROBE, str(model), str(out), method, dtype], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["peak"]


@pytest.mark.parametrize("method,dtype", [("rtn", "none"), ("none", "float16")])
def test_compile_peak_memory_does_not_grow_with_layers(tmp_path, method, dtype):
    small, large = peak_bytes(tmp_path, 2, method, dtype), peak_bytes(tmp_path, 8, method, dtype)
    extra_layers_bytes = 6 * (shape(8).parameters() - shape(7).parameters()) * 2
    # holding the whole model once (even in bf16) would add >= extra_layers_bytes; a layer at a time adds ~0
    assert large - small < 0.2 * extra_layers_bytes, (small, large)


def test_streamed_compile_keeps_bf16_weights_exact(tmp_path):
    """A fp compile keeps a bf16 checkpoint's bytes (streamed from the source file, never converted)."""
    model = write_random_llama(tmp_path / "m", shape(2), "bfloat16", shard_bytes=8 << 20)
    assert len(list(model.glob("*.safetensors"))) > 1  # sharded
    peak_bytes(tmp_path, 2, "none", "none")
    source = {}
    for f in sorted(model.glob("*.safetensors")):
        source.update({k.removeprefix("model."): v for k, v in read_safetensors(f).items()})
    stored = read_safetensors(tmp_path / "a2-none-none" / "weights.safetensors")
    for name in ("embed_tokens.weight", "layers.1.mlp.down_proj.weight", "norm.weight"):
        assert stored[name].dtype == source[name].dtype
        np.testing.assert_array_equal(stored[name].view(np.uint16), source[name].view(np.uint16))
