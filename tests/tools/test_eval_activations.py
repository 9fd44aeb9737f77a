"""`bitsmith eval --activations`: int8 emulation through the CLI equals the library's, auto reads the artifact's
compile options, and what a suite cannot compute with is refused before anything runs."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import attach_char_tokenizer

from bitsmith.cli import main
from bitsmith.options import CompileOptions, QuantOptions, TargetOptions
from bitsmith.tools.evaluate import evaluate_many

TEXT = "the cat sat on the mat and the dog ran in the sun " * 20
INT4 = QuantOptions("rtn", bits=4, group_size=32, keep_default=False)


@pytest.fixture(scope="module")
def int4_pair(tiny_artifact, tmp_path_factory):
    """(int4 artifact compiled with float32 activations, the same compiled with --activations int8), both
    --target none (no kernels: the reference executor scores them) with the character tokenizer."""
    tmp = tmp_path_factory.mktemp("eval-activations")
    paths = []
    for activations in ("float32", "int8"):
        path = tmp / activations
        shutil.copytree(tiny_artifact(CompileOptions(quant=INT4, target=TargetOptions("none", activations=activations))),
                        path)
        attach_char_tokenizer(path)
        paths.append(path)
    text = tmp / "text.txt"
    text.write_text(TEXT)
    return paths[0], paths[1], text


def run_eval(art, text, *flags: str) -> tuple[dict, str]:
    """(the --json output, stderr) of `bitsmith eval ART --text TEXT --ctx 32 --executor reference FLAGS`."""
    out = CliRunner().invoke(main, ["eval", str(art), "--text", str(text), "--ctx", "32", "--executor", "reference",
                                    "--no-save", "--json", *flags])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout), out.stderr


def test_int8_kld_differs_from_float32_and_equals_the_library_call(int4_pair):
    f32_art, _, text = int4_pair
    f32, _ = run_eval(f32_art, text, "--activations", "float32")
    i8, _ = run_eval(f32_art, text, "--activations", "int8")
    assert f32["activations"] == "float32" and i8["activations"] == "int8"
    # the int8 rounding costs something on an int4 model (relative, far above float64 summation noise)
    assert abs(i8["kld_mean"] - f32["kld_mean"]) > 1e-4 * f32["kld_mean"], (f32, i8)
    lib = evaluate_many([f32_art], TEXT, None, 32, executor="reference", activations="int8")[0]
    assert i8["kld_mean"] == pytest.approx(lib.kld_mean, rel=1e-12) and i8["ppl"] == pytest.approx(lib.ppl, rel=1e-12)


def test_auto_picks_the_artifacts_activations(int4_pair):
    f32_art, i8_art, text = int4_pair
    explicit, _ = run_eval(f32_art, text, "--activations", "int8")
    quiet = CliRunner().invoke(main, ["eval", str(i8_art), "--text", str(text), "--ctx", "32", "--executor",
                                      "reference", "--no-save"])
    assert quiet.exit_code == 0 and "activations=int8" in quiet.stderr, quiet.output  # echoed, like compile's options
    auto_i8, _ = run_eval(i8_art, text)
    auto_f32, _ = run_eval(f32_art, text)
    assert auto_i8["activations"] == "int8" and auto_f32["activations"] == "float32"
    # same int4 codes (rtn is deterministic): the int8-compiled artifact scores as --activations int8 does
    assert auto_i8["kld_mean"] == pytest.approx(explicit["kld_mean"], rel=1e-12)
    assert auto_f32["kld_mean"] != pytest.approx(explicit["kld_mean"], rel=1e-6)
    # without --text: the suite JSON (as evals.json) records it too
    out = CliRunner().invoke(main, ["eval", str(i8_art), "--ctx", "32", "--tokens", "64", "--executor", "reference",
                                    "--no-save", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["ppl"]["details"]["activations"] == "int8", out.output


def test_bad_value_and_what_a_suite_cannot_honour_are_refused(int4_pair):
    f32_art, i8_art, text = int4_pair
    out = CliRunner().invoke(main, ["eval", str(f32_art), "--activations", "int4"])
    assert out.exit_code == 2 and "Invalid value for '--activations'" in out.output, out.output
    # the compiled executor runs the kernels as built; the generating suites have no emulation
    for art, flags in ((f32_art, ["--activations", "int8"]), (i8_art, ["--activations", "float32"]),
                       (i8_art, ["--suite", "golden", "--executor", "reference", "--activations", "float32"])):
        out = CliRunner().invoke(main, ["eval", str(art), "--text", str(text), "--ctx", "32", "--no-save", *flags])
        assert out.exit_code == 2 and "runs the artifact's kernels, which compute with" in out.output, out.output
