"""A GPTQ v1 act-order checkpoint of the tiny Llama written from the spec (random codes and column orders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_act_order_gptq(tiny_llama_dir: Path, out: Path, sym: bool, seed: int = 7) -> dict[str, np.ndarray]:
    """Every *_proj weight of the tiny Llama as GPTQ v1 int4 g16 with desc_act (a random permutation per layer;
    asym: zero points 1..15) in `out`; returns the GPTQ tensors written, by name."""
    from safetensors.numpy import save_file

    from bitsmith.compiler.hf_quant_formats import pack_gptq
    from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme
    from bitsmith.runtime.safetensors_io import read_safetensors

    dense = read_safetensors(tiny_llama_dir / "model.safetensors")
    written, rng = {}, np.random.default_rng(seed)
    for name in [n for n in dense if n.endswith("_proj.weight")]:
        rows, n_in = dense.pop(name).shape
        scheme = QuantScheme(4, 16, sym, "gptq")
        groups = (rows, scheme.n_groups(n_in))
        zeros = None if sym else rng.integers(1, 16, groups).astype(np.float16)
        qw = QuantizedWeight(rng.integers(0, 16, (rows, n_in), dtype=np.uint8),
                             rng.uniform(1e-3, 0.05, groups).astype(np.float16), zeros, scheme, n_in,
                             perm=rng.permutation(n_in).astype(np.int32))
        written.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in pack_gptq(qw).items()})
    out.mkdir(parents=True)
    save_file({**{k: np.ascontiguousarray(v) for k, v in dense.items()}, **written}, str(out / "model.safetensors"))
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 16,
                                  "desc_act": True, "sym": sym}
    (out / "config.json").write_text(json.dumps(cfg))
    return written
