"""Eval suites: golden against a direct greedy run, JSON extraction, needle layout, evals.json, the reference cache."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import attach_char_tokenizer

from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, QuantOptions
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.tools.run import run_prompt
from bitsmith.tools.suites import SuiteOptions, SuiteResult, load_results, run_suites, save_results, suite
from bitsmith.tools.suites.generate import first_divergence
from bitsmith.tools.suites.golden import load_golden
from bitsmith.tools.suites.json_suite import check, extract_json, load_prompts
from bitsmith.tools.suites.needle import NEEDLES, build_prompt, default_lengths

PROMPTS = ["once upon a time", "the cat sat on the", "abc abc abc", "hello world", "zebra", "a b c d e f",
           "the quick brown fox", "my name is"]


def char_copy(tiny_artifact, tmp_path, options: CompileOptions, name: str):
    path = tmp_path / name
    shutil.copytree(tiny_artifact(options), path)
    attach_char_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny_pair(tiny_artifact, tmp_path_factory):
    """(fp32 artifact, int4 g32 artifact with every layer quantized), both with the character tokenizer."""
    tmp = tmp_path_factory.mktemp("suites")
    fp32 = char_copy(tiny_artifact, tmp, CompileOptions(), "fp32")
    int4 = char_copy(tiny_artifact, tmp, CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32,
                                                                           keep_default=False)), "int4")
    golden = tmp / "golden.jsonl"
    golden.write_text("\n".join(json.dumps({"id": f"p{i}", "category": "t", "prompt": p, "expected": p[-3:]})
                                for i, p in enumerate(PROMPTS)))
    return fp32, int4, golden


def test_golden_artifact_is_its_own_reference(tiny_pair):
    fp32, _, golden = tiny_pair
    r = run_suites(fp32, ["golden"], None, SuiteOptions(golden=str(golden), max_tokens=12))["golden"]
    assert r.metrics["golden"] == 1.0 and r.metrics["golden_acc"] == r.metrics["ref_golden_acc"]
    assert r.reference == "the artifact itself (not quantized)"
    assert all(p["first_divergence"] is None for p in r.details["prompts"])


def test_golden_int4_diverges_where_a_direct_greedy_run_does(tiny_pair):
    fp32, int4, golden = tiny_pair
    r = suite("golden")(int4, fp32, SuiteOptions(golden=str(golden), max_tokens=12))
    assert r.metrics["golden"] < 1.0
    for prompt, row in zip(PROMPTS, r.details["prompts"]):
        mine = run_prompt(int4, prompt, 12, SamplingParams())[1]
        theirs = run_prompt(fp32, prompt, 12, SamplingParams())[1]
        assert row["first_divergence"] == first_divergence(mine, theirs), prompt
    divergent = sorted(p["first_divergence"] for p in r.details["prompts"] if p["first_divergence"] is not None)
    assert r.metrics["golden_divergence_median"] == pytest.approx(
        (divergent[(len(divergent) - 1) // 2] + divergent[len(divergent) // 2]) / 2)


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2 and first_divergence([], [4]) == 0


@pytest.mark.parametrize("line, match", [
    ('{"id": "a", "prompt": "x"}\nnot json', "line 2"),
    ('{"id": "a"}', r"line 1.*missing \['prompt'\]|missing \['prompt'\].*line 1"),
    ('{"id": "a", "prompt": "x", "answer": "y"}', "unknown keys"),
    ('{"id": "a", "prompt": "x", "expected": 4}', "'expected' is int"),
    ('{"id": "a", "prompt": "x"}\n\n{"id": "a", "prompt": "y"}', "line 3.*repeats|repeats.*line 3"),
    ('{"id": "a", "prompt": "x", "regex": "(("}', "does not compile"),
    ('[1, 2]', "not a JSON object"),
])
def test_user_golden_file_is_validated(tmp_path, line, match):
    path = tmp_path / "mine.jsonl"
    path.write_text(line)
    with pytest.raises(BitsmithError) as err:
        load_golden(str(path))
    assert str(path) in str(err.value) and err.match(match)


def test_builtin_sets_are_well_formed():
    rows, _ = load_golden(None)
    assert len(rows) >= 100 and len({r["category"] for r in rows}) >= 5
    assert sum("expected" in r or "regex" in r for r in rows) >= 80
    prompts = load_prompts()
    assert 30 <= len(prompts) <= 40
    for p in prompts:  # the prompt shows the schema's shape: every key of the object
        assert all(f'"{key}":' in p["prompt"] for key in p["schema"]["properties"]), p["id"]


@pytest.mark.parametrize("text, value", [
    ('{"a": 1}', {"a": 1}),
    ('Here it is:\n```json\n{"a": [1, 2]}\n```\nDone.', {"a": [1, 2]}),
    ('Sure! {"name": "x}", "b": {"c": 2}} and more {"d": 1}', {"name": "x}", "b": {"c": 2}}),
    ('```\n{"a": "\\"}"}\n```', {"a": '"}'}),
])
def test_json_extraction(text, value):
    assert extract_json(text) == (value, None)


def test_json_check_explains_failures():
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    assert check('{"age": 3}', schema) == (True, None)
    assert check('{"age": "3"}', schema)[1].startswith("invalid")
    assert check('{"age": 3', schema)[1].startswith("not JSON")
    assert check("no object here", schema)[1] == "no JSON object in the output"


class ByteTokenizer:
    """One token per byte (decode works on every piece), BOS 1 added like SmolLM2's would not be."""

    bos_token_id, eos_token_ids, add_bos = 1, [2], False

    def encode(self, text, add_bos=None):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


class FakeGenerator:
    tokenizer = ByteTokenizer()
    chat_template = ("{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_sits_at_the_asked_depth(depth):
    gen = FakeGenerator()
    p = build_prompt(gen, 4096, depth, NEEDLES[0])
    fact = gen.tokenizer.encode(" " + NEEDLES[0][0])
    assert p.ids[p.fact_at:p.fact_at + len(fact)] == fact
    assert len(p.ids) <= 4096 - 16 and len(p.ids) >= 4096 - 16 - 8
    # moved back to the sentence end before depth x filler (eval.txt's sentences are under 400 bytes)
    share = (p.fact_at - p.filler_start) / p.filler_tokens
    assert depth - 400 / p.filler_tokens <= share <= depth
    assert gen.tokenizer.decode(p.ids[p.fact_at - 1:p.fact_at]) in ".!?"
    text = gen.tokenizer.decode(p.ids)
    assert text.startswith("<|user|>\nRead the text") and text.endswith("<|end|>\n<|assistant|>\n")
    assert text.count(NEEDLES[0][0]) == 1 and NEEDLES[0][1] in text[-200:]


def test_default_needle_lengths():
    assert default_lengths(2048) == (256, 512, 1024, 2048) and default_lengths(128) == (128,)


def test_evals_json_merges_and_replaces_atomically(tmp_path):
    save_results(tmp_path, {"ppl": SuiteResult("ppl", {"kld": 0.1}), "golden": SuiteResult("golden", {"golden": 1})})
    save_results(tmp_path, {"ppl": SuiteResult("ppl", {"kld": 0.2}, seconds=3.0)})
    loaded = load_results(tmp_path)
    assert loaded["ppl"].metrics == {"kld": 0.2} and loaded["ppl"].seconds == 3.0
    assert loaded["golden"].metrics == {"golden": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["evals.json"]  # no temporary file left behind
    before = (tmp_path / "evals.json").read_text()
    with pytest.raises(TypeError):  # a detail json cannot write: the old file stays whole, no temporary file stays
        save_results(tmp_path, {"ppl": SuiteResult("ppl", {"kld": 0.3}, {"bad": object()})})
    assert [p.name for p in tmp_path.iterdir()] == ["evals.json"] and (tmp_path / "evals.json").read_text() == before


@pytest.mark.parametrize("text", ["{not json", '{"ppl": {"suite": "ppl", "metrics": {}, "unknown_field": 1}}', "[1, 2]"])
def test_a_damaged_evals_json_is_one_error_naming_the_file(tmp_path, text):
    (tmp_path / "evals.json").write_text(text)
    with pytest.raises(BitsmithError, match="evals.json"):
        load_results(tmp_path)


def test_reference_is_compiled_once_and_reused(tiny_artifact, tiny_llama_dir, tmp_path, monkeypatch):
    from bitsmith.tools.suites.reference import resolve_reference

    monkeypatch.setenv("BITSMITH_REFERENCE_CACHE", str(tmp_path / "refs"))
    int4 = tiny_artifact(CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, keep_default=False)))
    logs: list[str] = []
    first, desc = resolve_reference(int4, None, logs.append)
    assert first.parent == tmp_path / "refs" and str(tiny_llama_dir) in desc
    assert any("compiling" in line for line in logs)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["compile"]["quant"]["method"] is None and manifest["kv_plan"]["max_context"] == 128
    stamp = (first / "manifest.json").stat().st_mtime_ns
    logs.clear()
    again, _ = resolve_reference(int4, None, logs.append)
    assert again == first and (first / "manifest.json").stat().st_mtime_ns == stamp
    assert logs == [f"reference: reusing {first}"]


def test_unknown_suite_is_refused():
    with pytest.raises(BitsmithError, match="unknown suite 'nope'"):
        suite("nope")


@pytest.mark.parametrize("flag", [["--concurrency", "0"], ["--concurrency", "1,-4"], ["--needle-lengths", "0"]])
def test_eval_refuses_non_positive_levels_before_running(tmp_path, flag):
    from click.testing import CliRunner

    from bitsmith.cli import main

    out = CliRunner().invoke(main, ["eval", str(tmp_path), "--suite", "serve", *flag])
    assert out.exit_code == 2 and "must be positive" in out.output, out.output


def test_eval_command_runs_suites_prints_tables_and_saves(tiny_pair, tmp_path):
    from click.testing import CliRunner

    from bitsmith.cli import main

    fp32, int4, golden = tiny_pair
    art = tmp_path / "int4"
    shutil.copytree(int4, art)
    out = CliRunner().invoke(main, ["eval", str(art), "--suite", "golden,serve", "--reference", str(fp32),
                                    "--golden", str(golden), "--concurrency", "1,4"])
    assert out.exit_code == 0, out.output
    assert "[golden] vs" in out.output and "same greedy output as the reference" in out.output
    assert "[serve] vs" in out.output and "tok_s_c4" in out.output
    saved = load_results(art)
    assert set(saved) == {"golden", "serve"} and saved["serve"].metrics["ref_tok_s_c1"] > 0
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran in the sun " * 20)
    out = CliRunner().invoke(main, ["eval", str(art), "--text", str(text), "--ctx", "32", "--reference", str(fp32),
                                    "--json"])
    assert out.exit_code == 0, out.output
    former = json.loads(out.stdout)
    assert former["kld_mean"] > 0 and former["ctx"] == 32 and set(load_results(art)) == {"golden", "serve", "ppl"}
    out = CliRunner().invoke(main, ["eval", str(art), "--suite", "golden,bogus"])
    assert out.exit_code != 0 and "unknown suite 'bogus'" in out.output


def test_suites_on_tinystories(shared_data, tmp_path):
    """The built-in golden set (no chat template: plain prompts) and the needle grid on a real small model."""
    from bitsmith.pipeline import compile_model

    model = shared_data / "tinystories-656k"
    fp32 = compile_model(model, tmp_path / "fp32", CompileOptions())
    int4 = compile_model(model, tmp_path / "int4", CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32,
                                                                                     keep_default=False)))
    options = SuiteOptions(limit=20, max_tokens=24, needle_lengths=(256, 512), needle_depths=(0.2, 0.8))
    own = run_suites(fp32, ["golden"], None, options)["golden"]
    assert own.metrics["golden"] == 1.0 and own.details["chat_template"] is False
    results = run_suites(int4, ["golden", "needle"], fp32, options)
    golden, needle = results["golden"], results["needle"]
    assert 0.0 <= golden.metrics["golden"] < 1.0 and golden.metrics["ref_golden_acc"] == own.metrics["golden_acc"]
    diverged = [p for p in golden.details["prompts"] if p["first_divergence"] is not None]
    assert diverged and all(0 <= p["first_divergence"] <= 24 for p in diverged)
    cells = {(c["length"], c["depth"]) for c in needle.details["cells"]}
    assert cells == {(256, 0.2), (256, 0.8), (512, 0.2), (512, 0.8)}
    assert 0.0 <= needle.metrics["needle"] <= 1.0 and 0.0 <= needle.metrics["ref_needle"] <= 1.0
