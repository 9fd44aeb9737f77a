"""The compile-time gate: spec parsing, a pass at the requested plan, the sensitivity-ordered fallback ladder,
and a gate no rung passes (exit 2, one line, no artifact), on a tiny random Llama with a character tokenizer."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from conftest import save_tiny_hf_model

from bitsmith.cli import main
from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, GateOptions, QuantOptions
from bitsmith.tools.gate import DEFAULT_GATE, GateCondition, gate_suites, parse_gate
from bitsmith.tools.ladder import build_ladder, compile_gated, measure

SENSITIVE = "layers.0.mlp.up_proj.weight"
QUICK = dict(tokens=256, limit=2, max_tokens=8)  # ppl on 2 windows of 127 tokens


def char_tokenizer(directory) -> None:
    """A character-level tokenizer.json (a..z -> 3..28, space 29, EOS 2) beside the tiny model's weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(97 + i): i + 3 for i in range(26)} | {"<unk>": 0, " ": 29, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny Llama with a tokenizer, made so that SENSITIVE costs the most KLD when quantized: every 32nd column
    of layer 0's down_proj is 30x larger, so the intermediate features it reads (up_proj's rows times SiLU(gate))
    reach the output 30x stronger, and so does up_proj's rounding error in them (measured on 64 tokens: 0.12 vs
    <= 0.025 for every other tensor at int3-g32)."""
    directory = tmp_path_factory.mktemp("gate") / "model"
    save_tiny_hf_model(directory, "llama")
    char_tokenizer(directory)
    path = directory / "model.safetensors"
    weights = load_file(path)
    key = next(k for k in weights if k.endswith("layers.0.mlp.down_proj.weight"))
    w = weights[key].copy()
    w[:, ::32] *= 30
    weights[key] = w
    save_file(weights, path, metadata={"format": "pt"})
    return directory


@pytest.fixture(autouse=True)
def reference_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITSMITH_REFERENCE_CACHE", str(tmp_path_factory.getbasetemp() / "gate-references"))
    monkeypatch.setenv("BITSMITH_SENSITIVITY_CACHE", str(tmp_path_factory.getbasetemp() / "gate-sensitivity"))


def gated(spec: str, bits: int = 2) -> CompileOptions:
    return CompileOptions(quant=QuantOptions("rtn", bits=bits, group_size=32, keep_default=False),
                          gate=GateOptions(spec, **QUICK))


def test_parse_gate():
    assert parse_gate("kld<=0.05, golden>=0.9,tok_s_c4>=10") == (
        GateCondition("kld", "<=", 0.05), GateCondition("golden", ">=", 0.9), GateCondition("tok_s_c4", ">=", 10.0))
    assert parse_gate("none") == () and parse_gate(None) == ()
    assert parse_gate("default") == parse_gate(DEFAULT_GATE)
    assert gate_suites(parse_gate("json>=0.9,golden>=0.5,top1>=0.8,needle>=1")) == ["ppl", "golden", "json", "needle"]
    assert GateCondition("kld", "<=", 0.05).holds(0.05) and not GateCondition("top1", ">=", 0.9).holds(0.89)
    with pytest.raises(BitsmithError, match=r"unknown gate metric 'perplexity'.*kld, kld_p99, top1"):
        parse_gate("perplexity<=30")
    for bad in ("kld<0.05", "kld<=", "kld<=x", "kld=0.1,top1>=0.9"):
        with pytest.raises(BitsmithError, match="is not METRIC<=NUMBER"):
            parse_gate(bad)


def test_build_ladder_from_sensitivities():
    names = [f"layers.{i}.{k}.weight" for i in range(3) for k in ("mlp.down_proj", "self_attn.q_proj")]
    kld = dict.fromkeys(names, 0.01) | {"layers.1.mlp.down_proj.weight": 0.5, "layers.2.mlp.down_proj.weight": 0.2}
    rungs = build_ladder(names, kld, dict.fromkeys(names, 100) | {"layers.2.mlp.down_proj.weight": 10})
    assert [r.name for r in rungs] == ["keep-sensitive", "int8-group", "int8-all"]
    # 0.5 of 0.74 is over half the KLD: one tensor, though 10% of 1010 parameters would allow more
    assert rungs[0].keep == ("layers.1.mlp.down_proj.weight",)
    # what is left: mlp.down_proj sums 0.21, layers.2 0.21 as well (the kind sorts after by name), others 0.02
    assert rungs[1].keep == rungs[0].keep and {p for p, _ in rungs[1].overrides} == {
        "layers.0.mlp.down_proj.weight", "layers.2.mlp.down_proj.weight"}
    assert rungs[2].keep == () and {p for p, s in rungs[2].overrides} == set(names)
    assert all(s == "int8" for r in rungs for _, s in r.overrides)
    opts = rungs[1].apply(CompileOptions(quant=QuantOptions("rtn", keep=("lm_head",))))
    assert opts.quant.keep == ("lm_head", "layers.1.mlp.down_proj.weight") and len(opts.quant.schemes) == 2


def test_measured_sensitivity_orders_the_ladder(tiny_model, tmp_path):
    tensors = [f"layers.{i}.{k}.weight" for i in range(2) for k in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]
    kld, params, probe = measure(tiny_model, tensors, CompileOptions(), None, tmp_path)
    assert probe == "int3-g32" and set(kld) == set(tensors)
    assert max(kld, key=kld.get) == SENSITIVE, sorted(kld.items(), key=lambda kv: -kv[1])[:3]
    assert build_ladder(tensors, kld, params)[0].keep[0] == SENSITIVE


def test_gate_passes_at_the_requested_plan(tiny_model, tmp_path):
    out, record = compile_gated(tiny_model, tmp_path / "art", gated("kld<=1,top1>=0.5", bits=8))
    assert record["chosen"] == 0 and len(record["attempts"]) == 1 and record["sensitivity"] is None
    attempt = record["attempts"][0]
    assert attempt["passed"] and attempt["failed"] == [] and attempt["rung"] == "requested"
    assert attempt["metrics"]["kld"] < 0.01 and attempt["schemes"] == {"int8-g32-sym-rtn": 15}  # 14 linears + lm_head
    assert 8 < attempt["bpw"] < 10  # int8 + a float16 scale per 32
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gate"] == record and manifest["compile"]["gate"]["spec"] == "kld<=1,top1>=0.5"
    assert json.loads((out / "evals.json").read_text())["ppl"]["metrics"]["kld"] == attempt["metrics"]["kld"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no rung left behind


def test_impossible_gate_exits_2_naming_the_best_attempt_and_the_ladder_then_passes(tiny_model, tmp_path):
    """int2 everywhere fails; a KLD threshold between the requested plan's and the rungs' picks the first rung
    under it, and the manifest lists every attempt before it."""
    out = tmp_path / "art"
    result = CliRunner().invoke(main, ["compile", str(tiny_model), "-o", str(out), "--method", "rtn", "--bits", "2",
                                       "--group", "32", "--no-keep-default", "--gate", "kld<=0",
                                       "--gate-tokens", "256", "--gate-limit", "2"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"gate kld<=0.*failed on all 4 attempts; the best was #\d", errors[0])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    klds = [float(k) for k in re.findall(r"gate attempt \d \([\w-]+\): bpw [\d.]+, kld ([\d.e+-]+)", result.output)]
    assert len(klds) == 4 and klds[0] == max(klds), klds
    target = next(i for i in range(1, 4) if klds[i] < klds[0])
    threshold = (klds[target] + klds[0]) / 2
    chosen = next(i for i, k in enumerate(klds) if k <= threshold)
    _, record = compile_gated(tiny_model, out, gated(f"kld<={threshold:.6g}"))
    assert record["chosen"] == chosen and len(record["attempts"]) == chosen + 1
    assert [a["passed"] for a in record["attempts"]] == [False] * chosen + [True]
    assert [a["rung"] for a in record["attempts"]][:2] == ["requested", "keep-sensitive"]
    assert record["attempts"][1]["keep"][0] == SENSITIVE
    assert max(record["sensitivity"]["tensors"], key=record["sensitivity"]["tensors"].get) == SENSITIVE
    assert record["attempts"][0]["failed"] == [f"kld<={threshold:.6g} (got {klds[0]:.4g})"]
    assert json.loads((out / "manifest.json").read_text())["gate"]["chosen"] == chosen


def test_cli_default_gate_needs_quantization(tiny_model, tmp_path):
    """No quantization: the default gate does not apply (and nothing is measured); a bad spec fails before work."""
    result = CliRunner().invoke(main, ["compile", str(tiny_model), "-o", str(tmp_path / "fp")])
    assert result.exit_code == 0, result.output
    assert "gate: nothing is quantized" in result.output and "whole model 32.00 bits/weight" in result.output
    result = CliRunner().invoke(main, ["compile", str(tiny_model), "-o", str(tmp_path / "x"), "--gate", "kld<0.1"])
    assert result.exit_code == 2 and "is not METRIC<=NUMBER" in result.output and not (tmp_path / "x").exists()



def test_serve_gate_metrics_exist_at_every_level_the_gate_names():
    from bitsmith.tools.gate import suite_options
    from bitsmith.tools.suites.serve import _metrics

    conditions = parse_gate("tok_s_c1>=1,ttft_ms_c4<=500,itl_ms_c4<=100")
    levels = suite_options(GateOptions(), conditions).concurrency
    rows = [{"concurrency": c, "throughput_tok_s": 10.0 * c, "ttft_ms_median": 5.0 * c, "itl_ms_median": 2.0 * c}
            for c in levels]
    metrics = _metrics(rows, "")
    assert all(c.metric in metrics for c in conditions), metrics  # else check_gate: "did not report ttft_ms_c4"
    assert metrics["ttft_ms_c4"] == 20.0 and metrics["itl_ms_c1"] == 2.0


def test_generating_gate_on_target_none_is_refused_before_compiling(tiny_model, tmp_path):
    import dataclasses

    from bitsmith.options import TargetOptions

    options = dataclasses.replace(gated("kld<=1,golden>=0.5", bits=8), target=TargetOptions("none"))
    with pytest.raises(BitsmithError, match="--target none.*golden") as info:
        compile_gated(tiny_model, tmp_path / "art", options)
    assert "--executor" not in str(info.value)  # compile has no --executor: the fix names what compile takes
    assert list(tmp_path.iterdir()) == []
