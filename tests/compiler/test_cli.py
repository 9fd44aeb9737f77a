"""The CLI end to end on tiny models, and bad input: one `error:` line, exit code 2, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitsmith.compiler.ir import Module
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.runtime.artifact import load_artifact
from conftest import attach_char_tokenizer, save_tiny_hf_model


def bitsmith(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitsmith.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_hf_model(root / "model", "llama")
    proc = bitsmith("compile", root / "model", "-o", root / "art", "--dtype", "float16", "--dump-ir", root / "ir")
    assert proc.returncode == 0, proc.stderr
    return root


def test_compile_writes_a_valid_artifact(cli_artifact):
    artifact = load_artifact(cli_artifact / "art")
    m = artifact.manifest
    assert m["schema_version"] == 1 and m["provenance"]["tvm_version"] == "0.27.0.post1"
    assert m["weights"]["bytes_by_dtype"].keys() == {"float16"}
    assert set(m["files"]) == {"weights.safetensors", "kernels/host.so"}  # tiny model: no tokenizer
    assert m["kernels"]["library"] == "kernels/host.so" and set(m["kernels"]["schedules"]) == {
        "rows1", "rows4", "rows16", "rows32", "rows64"}
    assert sorted(p.name for p in (cli_artifact / "ir").iterdir())[0] == "00-input.ir"
    assert not [p for p in cli_artifact.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_run_json_matches_the_reference(cli_artifact, tmp_path):
    # The tiny model has no tokenizer: give it one that maps characters to ids.
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({chr(97 + i): i + 3 for i in range(26)} | {"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    art = cli_artifact / "art"
    manifest = json.loads((art / "manifest.json").read_text())
    tok.save(str(art / "tokenizer.json"))
    manifest["tokenizer"] = {"kind": "hf", "files": ["tokenizer.json"], "bos_token_id": None, "eos_token_ids": [],
                             "add_bos": False, "chat_template": None}
    (art / "manifest.json").write_text(json.dumps(manifest))
    outs = {}
    for executor in ("compiled", "reference"):
        proc = bitsmith("run", art, "hello", "--max-tokens", "6", "--json", "--executor", executor)
        assert proc.returncode == 0, proc.stderr
        outs[executor] = json.loads(proc.stdout)
    assert outs["compiled"] == outs["reference"]
    out = outs["reference"]
    artifact = load_artifact(art)
    session = ReferenceSession(Module.from_json(manifest["ir"]), artifact.weights, 16)
    logits = session.prefill([10, 7, 14, 14, 17])  # "hello"
    expected = [int(np.argmax(logits[-1]))]
    for _ in range(5):
        expected.append(int(np.argmax(session.decode(expected[-1]))))
    assert out["token_ids"] == expected
    assert out["text"] == tok.decode(expected, skip_special_tokens=False)


def test_inspect_json_model_and_artifact(cli_artifact):
    for path in (cli_artifact / "model", cli_artifact / "art"):
        proc = bitsmith("inspect", path, "--json")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["architecture"] == "llama"
        assert summary["ir"]["decode"]["ops"]["attention"] == 2
    proc = bitsmith("inspect", cli_artifact / "art", "--ir")
    assert "func @decode(%tokens: int64[1]" in proc.stdout


def test_help_explains_every_command():
    for command in ("compile", "inspect", "run"):
        proc = bitsmith(command, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout and len(proc.stdout.splitlines()) > 5


def test_missing_model_path(tmp_path):
    proc = bitsmith("compile", tmp_path / "nope", "-o", tmp_path / "out")
    assert_clean_error(proc, "does not exist")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_leaves_nothing(tmp_path):
    save_tiny_hf_model(tmp_path / "m", "qwen2")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = bitsmith("compile", tmp_path / "m", "-o", tmp_path / "out")
    assert_clean_error(proc, "model.safetensors", "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    assert_clean_error(bitsmith("compile", bad, "-o", tmp_path / "out"), "bad.gguf")
    assert not (tmp_path / "out").exists()


def test_output_over_a_foreign_directory_is_refused(cli_artifact, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    proc = bitsmith("compile", cli_artifact / "model", "-o", tmp_path / "precious")
    assert_clean_error(proc, "not a bitsmith artifact")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def _copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_wrong_schema_version(cli_artifact, tmp_path):
    art = _copy_artifact(cli_artifact / "art", tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_error(bitsmith("run", art, "hi"), "schema version 99", "recompile")


def test_missing_and_modified_files(cli_artifact, tmp_path):
    art = _copy_artifact(cli_artifact / "art", tmp_path / "art")
    weights = art / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_clean_error(bitsmith("run", art, "hi"), "sha256")
    weights.unlink()
    assert_clean_error(bitsmith("run", art, "hi"), "weights.safetensors is missing")
    assert_clean_error(bitsmith("run", tmp_path / "nothing", "hi"), "does not exist")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "mamba9000", "hidden_size": 4}')
    proc = bitsmith("compile", tmp_path / "m", "-o", tmp_path / "out")
    assert_clean_error(proc, "unsupported architecture 'mamba9000'")
    assert not (tmp_path / "out").exists()


def test_quantized_compile_inspect_run(cli_artifact, tmp_path):
    proc = bitsmith("compile", cli_artifact / "model", "-o", tmp_path / "q", "--method", "rtn", "--bits", "4",
                    "--group", "32", "--no-keep-default", "--scheme", "down_proj=int8")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(bitsmith("inspect", tmp_path / "q", "--json").stdout)
    weights = summary["precision"]["weights"]
    assert weights["layers.0.mlp.down_proj.weight"]["scheme"] == "int8-g32-sym-rtn"
    assert weights["layers.1.self_attn.q_proj.weight"]["bits_per_weight"] == 4.5  # 4 bits + fp16 scale per 32
    assert summary["ir"]["prefill"]["ops"]["qlinear"] == 15  # 14 decoder linears + the untied lm_head


def test_bad_quantization_options(cli_artifact, tmp_path):
    model = cli_artifact / "model"
    assert_clean_error(bitsmith("compile", model, "-o", tmp_path / "o", "--method", "rtn", "--keep", "nothing.*"),
                       "pattern 'nothing.*' matches no quantizable weight")
    assert_clean_error(bitsmith("compile", model, "-o", tmp_path / "o", "--method", "gptq", "--no-keep-default"),
                       "calibration tokens")  # the tiny model has no tokenizer
    proc = bitsmith("compile", model, "-o", tmp_path / "o", "--method", "rtn", "--scheme", "down_proj=int7")
    assert_clean_error(proc, "unsupported bit width 7")
    proc = bitsmith("compile", model, "-o", tmp_path / "o", "--bits", "7")
    assert proc.returncode == 2 and "'7' is not one of" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_target_none_has_no_kernels_and_runs_only_on_the_reference_when_asked(cli_artifact, tmp_path):
    proc = bitsmith("compile", cli_artifact / "model", "-o", tmp_path / "ref", "--target", "none")
    assert proc.returncode == 0, proc.stderr
    assert "--executor reference" in proc.stderr  # the compile says how to run what it wrote
    artifact = load_artifact(tmp_path / "ref")
    assert artifact.manifest["kernels"] is None
    from bitsmith.tools.run import open_session
    from bitsmith.errors import BitsmithError

    for executor in ((), ("compiled",)):  # the default is the kernels: no silent switch to numpy
        with pytest.raises(BitsmithError, match="no compiled kernels.*--target host.*--executor reference"):
            open_session(artifact, *executor)
    assert type(open_session(artifact, "reference")).__name__ == "ReferenceSession"
    attach_char_tokenizer(tmp_path / "ref")
    assert_clean_error(bitsmith("run", tmp_path / "ref", "abc", "--max-tokens", "2"), "no compiled kernels",
                       "--executor reference")
    proc = bitsmith("run", tmp_path / "ref", "abc", "--max-tokens", "2", "--json", "--executor", "reference")
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["token_ids"]) == 2, proc.stderr


def test_bad_context(cli_artifact, tmp_path):
    assert_clean_error(bitsmith("compile", cli_artifact / "model", "-o", tmp_path / "a", "--context", "40"),
                       "--context 40 is not a multiple of 16")
    assert_clean_error(bitsmith("compile", cli_artifact / "model", "-o", tmp_path / "a", "--context", "4096"),
                       "exceeds the model's maximum of 128")
    assert not (tmp_path / "a").exists()


def test_print_passes_shows_the_phased_list_and_dump_ir_every_pass(cli_artifact):
    proc = bitsmith("compile", "--print-passes", "--method", "gptq", "--scheme", "lm_head=int8", "--target", "host")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("canonicalize   traced input: eliminate_dead_code, fold_weight_expressions, fuse_silu")
    precision = next(i for i, line in enumerate(lines) if line.startswith("precision"))  # after the wrapped list
    assert lines[precision:] == ["precision      untie_lm_head, assign_precision",
                         "quantize/pack  quantize_weights, cast_weights, pack_weights",
                         "memory plan    plan_kv_cache", "lower          lower_to_kernels"]
    proc = bitsmith("compile", "--print-passes")
    assert "precision" not in proc.stdout and "quantize/pack  cast_weights" in proc.stdout
    proc = bitsmith("compile", cli_artifact / "model")  # without --print-passes, -o is required
    assert proc.returncode == 2 and "Missing option '-o' / '--output'" in proc.stderr
    ir = sorted(p.name for p in (cli_artifact / "ir").iterdir())  # the fixture's compile --dump-ir
    assert ir == ["00-input.ir", "01-eliminate_dead_code.ir", "02-cast_weights.ir", "02-cast_weights.weights.txt",
                  "03-plan_kv_cache.ir", "03-plan_kv_cache.kv_plan.json", "04-lower_to_kernels.ir",
                  "04-lower_to_kernels.schedules.txt"]
