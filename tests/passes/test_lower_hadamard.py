"""Lowering the online `hadamard` op: fused with the SwiGLU before down_proj and with RoPE on q/k, alone elsewhere,
on host, aarch64 and CUDA targets; refusals name the node; a rotated int4 artifact's kernels give the reference
executor's logits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bitsmith.compiler.ir import Node, TensorType
from bitsmith.errors import BitsmithError
from bitsmith.passes.kv_plan import KVPlan
from bitsmith.passes.lower_to_kernels import lower_function
from bitsmith.passes.rotation_sites import insert_online_hadamard
from conftest import RANDOM_CONFIGS, random_model

CONFIG = RANDOM_CONFIGS["gqa"]  # ffn 40 = 8 * 5: a factor of order 5; head_dim 8


def _kv(config) -> KVPlan:
    return KVPlan(16, 8, 4, ("float16",) * config.num_layers, config.num_kv_heads, config.head_dim, 64, 2)


def _rotated(entry: str, sites: str = "ffn+qk", factor_size: int = 5):
    """The random model's `entry` with hadamard ops on the down_proj inputs (factor weight rotation.hadamard5),
    q and k after RoPE ("qk"), or v ("v": a reshape's output, nothing to fuse)."""
    module, _ = random_model(CONFIG)
    name = f"rotation.hadamard{factor_size}"
    module = module.replace(weights={**module.weights, name: TensorType((factor_size, factor_size), "float32")})
    fn = module[entry]
    targets: dict[str, str | None] = {}
    for node in fn.nodes:
        if "ffn" in sites and node.op == "linear" and fn.types[node.inputs[0]].shape[-1] == CONFIG.intermediate_size:
            targets[node.inputs[0]] = name
        if node.op == "attention":
            if "qk" in sites:
                targets[node.inputs[0]] = targets[node.inputs[1]] = None
            if "v" in sites:
                targets[node.inputs[2]] = None
    return insert_online_hadamard(fn, module, targets)


@pytest.mark.parametrize("target", ["host", "aarch64-linux", "cuda"])
def test_hadamard_fuses_with_swiglu_and_rope(target):
    layers = CONFIG.num_layers
    for entry, rows in (("decode", 1), ("prefill", 16)):
        specs: dict = {}
        schedule = lower_function(_rotated(entry), rows, _kv(CONFIG), specs, {}, target=target)
        kernels = [c.kernel for c in schedule.calls]
        assert sum(k.startswith("silu_mul_hadamard") for k in kernels) == layers
        assert sum(k.startswith("rope_half_hadamard") for k in kernels) == 2 * layers  # q and k
        assert not any(k.startswith(("silu_mul_n", "rope_half_r", "hadamard_")) for k in kernels)
        down = next(c for c in schedule.calls if c.kernel.startswith("silu_mul_hadamard"))
        assert ("weight", "rotation.hadamard5") in down.args  # gate, up, factor, y
        spec = specs[down.kernel]
        assert (spec.rows, spec.n, spec.factor, spec.gate) == (rows, CONFIG.intermediate_size, 5, "silu")


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_hadamard_fuses_with_geglu(approximate):
    """The silu of the random model swapped for a gelu: gelu(gate) * up and the Hadamard are one kernel."""
    fn = _rotated("decode", "ffn")
    nodes = tuple(Node("gelu", n.inputs, n.outputs, {"approximate": approximate}) if n.op == "silu" else n
                  for n in fn.nodes)
    specs: dict = {}
    schedule = lower_function(fn.replace(nodes=nodes), 1, _kv(CONFIG), specs, {})
    gate = "gelu_tanh" if approximate == "tanh" else "gelu"
    fused = [specs[c.kernel] for c in schedule.calls if c.kernel.startswith(f"{gate}_mul_hadamard")]
    assert len(fused) == CONFIG.num_layers and all(s.gate == gate for s in fused)
    assert not any(c.kernel.startswith(("unary_", "gelu_", "mul_n")) and "hadamard" not in c.kernel
                   for c in schedule.calls)


def test_hadamard_without_a_fusable_producer_runs_alone():
    """v comes from a reshape: one HadamardSpec over rows * kv_heads rows of head_dim."""
    specs: dict = {}
    schedule = lower_function(_rotated("prefill", "v"), 4, _kv(CONFIG), specs, {})
    alone = [specs[c.kernel] for c in schedule.calls if c.kernel.startswith("hadamard_")]
    assert len(alone) == CONFIG.num_layers
    assert (alone[0].rows, alone[0].n, alone[0].factor) == (4 * CONFIG.num_kv_heads, CONFIG.head_dim, 1)
    assert sum(c.kernel.startswith("silu_mul_n") for c in schedule.calls) == CONFIG.num_layers


def test_a_computed_factor_is_refused_by_name():
    """The factor must be a weight (a kernel argument): one that goes through a relu first is refused."""
    fn = _rotated("decode", "ffn")
    nodes, types = [], dict(fn.types)
    for node in fn.nodes:
        if node.op == "hadamard":
            relu = Node("relu", (node.inputs[1],), (f"{node.inputs[1]}.relu",))
            types[relu.outputs[0]] = fn.types[node.inputs[1]]
            nodes += [relu, Node("hadamard", (node.inputs[0], relu.outputs[0]), node.outputs, node.attrs)]
        else:
            nodes.append(node)
    with pytest.raises(BitsmithError, match=r"op hadamard .*expects a weight"):
        lower_function(fn.replace(nodes=tuple(nodes), types=types), 1, _kv(CONFIG), {}, {})


def test_rows_beyond_gpu_shared_memory_are_refused_at_lowering():
    fn = _rotated("decode", "ffn")
    big = {v: TensorType(tuple(t.shape[:-1]) + (8192,), t.dtype) if t.shape and t.shape[-1] == 40 else t
           for v, t in fn.types.items()}
    hadamard = next(n for n in fn.nodes if n.op == "hadamard")
    nodes = tuple(n if n.op != "hadamard" else n.__class__("hadamard", n.inputs[:1], n.outputs, n.attrs)
                  for n in fn.nodes)
    with pytest.raises(BitsmithError, match=rf"op hadamard \({hadamard.outputs[0]}\).*8192 values.*shared memory"):
        lower_function(fn.replace(nodes=nodes, types=big), 1, _kv(CONFIG), {}, {}, target="cuda")


def _tiny_llama_with_tokenizer(directory, tie: bool = False):
    """The tiny random Llama in HF layout with a character-level tokenizer.json (a..z, space; ids < its vocab of
    96), so that rotate passes that read calibration text have tokens. Its norm scales are random (not the init's
    ones), so fold_norm_scales has something to fold (for a tied head: into head_norm)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from conftest import make_tiny_hf_model

    model = make_tiny_hf_model("llama", tie, 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    vocab = {chr(97 + i): i + 3 for i in range(26)} | {"<unk>": 0, " ": 29, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_rotated_int4_artifact_kernels_equal_the_reference(tmp_path, tie):
    """--rotate hadamard, int4 g32 RTN on the tiny Llama: the compiled kernels (fused hadamards) against the numpy
    reference executor of the same artifact, prefill in two chunks and three decode steps. Tied: the head stays
    tied and reads head_norm's output."""
    from bitsmith.options import RotationOptions
    from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.session import CompiledSession
    from bitsmith.tools.run import reference_session

    options = CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, sym=False, keep_default=False),
                             memory=MemoryOptions(context=64), rotation=RotationOptions("hadamard"))
    model = _tiny_llama_with_tokenizer(tmp_path / "model", tie)
    art = load_artifact(compile_model(model, tmp_path / "art", options))
    assert ("head_norm.weight" in art.weights) == tie
    assert any(k.startswith("lm_head") for k in art.weights) != tie  # untied: its own (quantized) weight
    kernels = [c[0] for c in art.manifest["kernels"]["schedules"]["rows1"]["calls"]]
    assert any(k.startswith("silu_mul_hadamard") for k in kernels) and any("_hadamard_" in k for k in kernels)
    compiled, ref = CompiledSession(art), reference_session(art, 64)
    prompt = [5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 4, 50, 19, 7, 23, 64, 30, 11]
    got, want = compiled.prefill(prompt), ref.prefill(prompt)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-4 * scale
    for token in (8, 90, 1):
        assert np.abs(compiled.decode(token) - ref.decode(token)).max() <= 2e-4 * scale


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_rotated_artifact_builds_for_cuda(tmp_path):
    """`compile --target cuda --rotate hadamard`: the fused Hadamard kernels are in the sm_90a library (no GPU
    needed to build; bench/gpu_check.sh runs artifacts on a lent GPU)."""
    from click.testing import CliRunner

    from bitsmith.cli import main
    from bitsmith.codegen.gpu.cuda_build import fatbin_archs
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.step_runner import kernel_plan

    model = _tiny_llama_with_tokenizer(tmp_path / "model")
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "art"), "--target", "cuda",
                                       "--method", "rtn", "--bits", "4", "--group", "32", "--rotate", "hadamard",
                                       "--context", "64", "--concurrency", "2", "--gate", "none"])
    assert result.exit_code == 0, result.output
    art = load_artifact(tmp_path / "art")
    plan = kernel_plan(art)
    kernels = {c.kernel for s in plan.schedules.values() for c in s.calls}
    fused = {k for k in kernels if "hadamard" in k}
    assert any(k.startswith("silu_mul_hadamard") for k in fused) and any(k.startswith("rope_") for k in fused)
    library = art.directory / plan.library
    assert fatbin_archs(library) == {"sm_90a"}
    assert all(name.encode() in library.read_bytes() for name in fused)
