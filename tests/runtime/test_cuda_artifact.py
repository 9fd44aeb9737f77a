"""`bitsmith compile --target cuda`: an artifact with kernels/cuda_<arch>.so built here without a GPU.

What can be checked on a machine without a GPU: the library holds device code for the requested
architecture, the schedules use only GPU-capable kernels, and running it here fails with a clear
error (the reference executor runs it only when asked: `--executor reference`). The GPU itself is checked by
bench/gpu_check.sh on a lent machine.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from bitsmith.cli import main
from bitsmith.tools.run import open_session
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.runners import runs_here
from bitsmith.runtime.step_runner import kernel_plan
from conftest import save_tiny_hf_model

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    save_tiny_hf_model(root / "model", "llama")
    result = CliRunner().invoke(main, ["compile", str(root / "model"), "-o", str(root / "art"), "--target", "cuda",
                                       "--arch", "sm_80", "--method", "rtn", "--bits", "4", "--group", "32",
                                       "--no-keep-default",
                                       "--context", "64", "--concurrency", "2"])
    assert result.exit_code == 0, result.output
    return load_artifact(root / "art")


def test_library_holds_code_for_the_requested_arch(cuda_artifact):
    from bitsmith.codegen.gpu.cuda_build import fatbin_archs

    plan = kernel_plan(cuda_artifact)
    assert plan.target == "cuda_sm_80" and plan.arch == "cuda" and plan.target_cpu == "sm_80"
    assert plan.library == "kernels/cuda_sm_80.so"
    assert fatbin_archs(cuda_artifact.directory / plan.library) == {"sm_80"}
    kernels = {c.kernel for s in plan.schedules.values() for c in s.calls}
    assert not any(k.startswith(("qgemv_i8a", "qgemv_x16", "attention_")) for k in kernels)  # CPU-only families
    assert any(k.startswith("paged_attention") for k in kernels) and any(k.startswith("qgemm") for k in kernels)


def test_without_a_gpu_compiled_says_why_and_the_reference_runs_only_when_asked(cuda_artifact):
    if runs_here(kernel_plan(cuda_artifact)):
        pytest.skip("a CUDA GPU is present: bench/gpu_check.sh covers this machine")
    for executor in ((), ("compiled",)):  # the default is the kernels: never a silent switch to numpy
        with pytest.raises(BitsmithError, match="no CUDA GPU"):
            open_session(cuda_artifact, *executor)
    session = open_session(cuda_artifact, "reference")
    assert np.isfinite(session.prefill([3, 4, 5])).all()


def test_arch_without_cuda_target_is_refused(tmp_path):
    save_tiny_hf_model(tmp_path / "model", "llama")
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "model"), "-o", str(tmp_path / "a"),
                                       "--arch", "sm_90a", "--target", "host"])
    assert result.exit_code != 0 and "--arch sm_90a is only for --target cuda" in result.output
    assert not (tmp_path / "a").exists()


def test_manifest_records_the_cuda_build(cuda_artifact):
    entry = json.loads((cuda_artifact.directory / "manifest.json").read_text())["kernels"]
    assert entry["build"]["kernels"] > 0 and entry["target"] == "cuda_sm_80"
