"""Every checkpoint dtype compiles to kernels: float32, float16 and bfloat16 copies of one tiny Llama, unquantized
and RTN int4 with the lm_head kept 16-bit, each run on its host kernels and compared with transformers in float32
on the same weights; a target that cannot build a kernel fails the compile, naming the op, the dtype and the fix.

The oracle is transformers (eager, float32) holding exactly the artifact's weights: its stored values widened to
float32, packed weights dequantized (what the kernels compute with). The artifacts keep a float32 KV cache so that
the weights are the only thing rounded. Greedy tokens must then be identical for every dtype, and logits agree to
1e-4 of their scale (float32 summation order). The bf16 copy is also held against the float32 original: rounding
every weight to bf16 (8 significant bits) moves its logits by up to BF16_LOGIT_TOL of their scale.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from click.testing import CliRunner

from bitsmith.cli import main
from bitsmith.compiler.ir import Module
from bitsmith.compiler.reference import upcast_weights
from bitsmith.errors import BitsmithError
from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model
from bitsmith.runtime.artifact import load_artifact
from bitsmith.tools.describe import describe, format_summary
from bitsmith.tools.evaluate import densify
from bitsmith.tools.run import open_session
from conftest import make_tiny_hf_model

DTYPES = ("float32", "float16", "bfloat16")
PROMPT = [5, 9, 13, 2, 7, 40, 41]
STEPS = 8
LOGIT_RTOL = 1e-4  # our float32 kernels vs torch's float32 on identical weights
BF16_LOGIT_TOL = 0.02  # bf16-rounded weights vs the float32 original (measured 4.4e-3 on this model)
MEMORY = MemoryOptions(context=64, kv_dtype="float32")
OPTIONS = {
    "fp": CompileOptions(memory=MEMORY),
    # every decoder linear int4 (the 2-layer model's layers are all first/last: no default keeps), lm_head 16-bit
    "rtn4": CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, keep_default=False, keep=("lm_head",)),
                           memory=MEMORY),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """directory of each dtype's copy of the tiny random Llama (seed 0), saved by transformers in that dtype."""
    import torch

    root = tmp_path_factory.mktemp("dtypes")
    model = make_tiny_hf_model("llama")
    for dtype in DTYPES:  # each copy rounded once from the float32 original (`to` converts in place)
        copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(root / dtype)
    return root


@pytest.fixture(scope="module")
def artifacts(checkpoints, tmp_path_factory):
    """compile(dtype, options key) -> the loaded artifact, compiled once per module."""
    built: dict = {}

    def compile(dtype: str, kind: str):
        if (dtype, kind) not in built:
            out = tmp_path_factory.mktemp(f"{dtype}-{kind}") / "art"
            built[dtype, kind] = load_artifact(compile_model(checkpoints / dtype, out, OPTIONS[kind]))
        return built[dtype, kind]

    return compile


def greedy(step, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """(STEPS greedy tokens, the logits after the prompt) from step(tokens so far, new tokens) -> last logits."""
    logits = first = step(prompt)
    tokens: list[int] = []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(logits)))
        logits = step([tokens[-1]])
    return tokens, first


def ours(artifact) -> tuple[list[int], np.ndarray]:
    session = open_session(artifact)  # the compiled kernels: no other executor is involved
    return greedy(lambda new: session.prefill(new)[-1] if len(new) > 1 else session.decode(new[0]), PROMPT)


def transformers_on(weights: dict[str, np.ndarray], directory) -> tuple[list[int], np.ndarray]:
    """Greedy tokens of transformers in float32 with `weights` (bitsmith's canonical names) loaded."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    state = {name if name == "lm_head.weight" else f"model.{name}": torch.from_numpy(np.array(w, np.float32))
             for name, w in weights.items()}
    model.load_state_dict(state, strict=True)
    ids = list(PROMPT)

    def step(new: list[int]) -> np.ndarray:
        if len(new) == 1:
            ids.append(new[0])
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].numpy()

    return greedy(step, PROMPT)


def artifact_weights(artifact) -> dict[str, np.ndarray]:
    """The weights the kernels compute with, in float32: stored values widened, packed ones dequantized."""
    _, weights = densify(Module.from_json(artifact.manifest["ir"]), upcast_weights(artifact.weights))
    out = {}
    for name, w in weights.items():
        if name.endswith(".dense"):
            out[name.removesuffix(".dense") + ".weight"] = w
        elif not name.endswith((".qweight", ".scales", ".zeros")):
            out[name] = w
    return out


def kernel_names(artifact) -> set[str]:
    return {call[0] for s in artifact.manifest["kernels"]["schedules"].values() for call in s["calls"]}


@pytest.mark.parametrize("kind", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_compiles_to_kernels_that_match_transformers(checkpoints, artifacts, dtype, kind):
    art = artifacts(dtype, kind)
    assert art.manifest["kernels"] is not None
    names = kernel_names(art)
    stored = {str(w.dtype) for n, w in art.weights.items() if not n.endswith((".qweight", ".scales", ".zeros"))}
    # the checkpoint's dtype is kept (a quantized compile of an fp32 checkpoint keeps its dense layers fp16)
    assert stored == {dtype if dtype != "float32" or kind == "fp" else "float16"}
    if dtype == "bfloat16":
        assert {"embedding_bf16", "rmsnorm_bf16", "gemv_bfloat16"} <= {"_".join(n.split("_")[:2]) for n in names}
    if kind == "rtn4":
        assert any(n.startswith("qgemv") for n in names) and "lm_head.weight" in art.weights
    if kind == "fp":  # inspect says what the kernels read: every weight as stored
        summary, _ = describe(art.directory)
        assert summary["kernels"]["weight_dtypes"] == {dtype: len(art.weights)}
        assert f"weights the kernels read: {dtype} ×{len(art.weights)}; each in its stored dtype" in format_summary(
            summary)
    tokens, logits = ours(art)
    ref_tokens, ref_logits = transformers_on(artifact_weights(art), checkpoints / dtype)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= LOGIT_RTOL * np.abs(ref_logits).max()


def test_bf16_stays_within_its_tolerance_of_the_float32_original(checkpoints, artifacts):
    _, bf16_logits = ours(artifacts("bfloat16", "fp"))
    _, fp32_logits = ours(artifacts("float32", "fp"))
    err = np.abs(bf16_logits - fp32_logits).max() / np.abs(fp32_logits).max()
    assert 0 < err <= BF16_LOGIT_TOL  # > 0: the copy really was rounded


@pytest.fixture
def no_bf16_target(monkeypatch):
    """The host target as one that cannot read bf16 weights (as a target without a bf16 path would be)."""
    from bitsmith.codegen import target

    monkeypatch.setattr(target, "WEIGHT_DTYPES", tuple(d for d in target.WEIGHT_DTYPES if d != "bfloat16"))


def test_a_target_that_cannot_build_a_kernel_fails_the_compile(checkpoints, tmp_path, no_bf16_target):
    with pytest.raises(BitsmithError) as info:
        compile_model(checkpoints / "bfloat16", tmp_path / "art", OPTIONS["fp"])
    message = str(info.value)
    assert "op embedding" in message and "embed_tokens.weight stored as bfloat16" in message
    assert "target host" in message and "--dtype float32" in message and "--target none" in message
    assert not (tmp_path / "art").exists()


def test_the_cli_reports_it_and_writes_nothing(checkpoints, tmp_path, no_bf16_target):
    result = CliRunner().invoke(main, ["compile", str(checkpoints / "bfloat16"), "-o", str(tmp_path / "art"),
                                       "--context", "64"])
    assert result.exit_code != 0
    assert "op embedding" in result.output and "bfloat16" in result.output and "fix:" in result.output
    assert "reference executor" not in result.output.split("fix:")[0]  # no fallback is offered as what happened
    assert not (tmp_path / "art").exists()


def test_the_same_target_still_compiles_a_dtype_it_reads(checkpoints, tmp_path, no_bf16_target):
    options = CompileOptions(dtype="float16", memory=MEMORY)
    art = load_artifact(compile_model(checkpoints / "bfloat16", tmp_path / "art", options))
    assert art.manifest["kernels"] is not None
