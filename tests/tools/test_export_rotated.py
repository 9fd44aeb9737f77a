"""Export refuses an artifact with online rotations: GGUF/ONNX/HF runtimes have no Hadamard op to run them."""

from __future__ import annotations

import pytest

from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, RotationOptions, TargetOptions
from bitsmith.pipeline import compile_model
from bitsmith.tools.export import ExportOptions, export
from tests.family_zoo import zoo_model


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "gptq"])
def test_export_of_a_rotated_artifact_is_refused_and_writes_nothing(tmp_path, fmt):
    zoo_model("llama").save_pretrained(tmp_path / "model")
    art = compile_model(tmp_path / "model", tmp_path / "art", CompileOptions(
        target=TargetOptions("none"), rotation=RotationOptions("hadamard", outlier_ratio=0)))
    with pytest.raises(BitsmithError, match="compiled with --rotate: its online Hadamard ops"):
        export(art, tmp_path / "out", ExportOptions(fmt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "model"]
