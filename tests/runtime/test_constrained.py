"""Constrained decoding on the tiny random model: mask bits agree with llguidance's matcher, every constrained output
parses and validates (random weights emit garbage, so a valid output is the mask's doing), unconstrained neighbours
are unchanged, bad schemas are errors."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions
from bitsmith.runtime.artifact import load_artifact, sha256_of
from bitsmith.runtime.constrained import Constrainer, Constraint
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.executor import KernelRunner
from bitsmith.runtime.sampling import SamplingParams

OPTIONS = CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32),
                         memory=MemoryOptions(context=64, concurrency=8))  # test_server's: compiled once a session
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fox"]},
                                      "tags": {"type": "array", "items": {"type": "integer", "maximum": 9},
                                               "maxItems": 3}},
     "required": ["kind", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {"type": "null"}},
                                            "required": ["x"], "additionalProperties": False},
                                      "s": {"type": "string", "pattern": "^[a-f]{2,5}$"}},
     "required": ["p", "s"], "additionalProperties": False},
]


def attach_json_tokenizer(artifact_dir: Path) -> None:
    """A byte-level BPE tokenizer that can spell JSON: single characters plus a few multi-character tokens (the
    masks must handle tokens that span JSON lexemes); 61 ids, fewer than the model's 96 (padded logits)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    pieces = list('{}[]":,.-_0123456789abcdefghijklmnopqrstuvwxyz') + ["Ġ", "Ċ"]
    pieces += ['":', 'Ġ"', "true", "false", "null", "},", '{"', '",', "00", "ab"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {p: i + 3 for i, p in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "</s>")])
    path = artifact_dir / "tokenizer.json"
    tok.save(str(path))
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    manifest["tokenizer"] = {"kind": "hf", "files": ["tokenizer.json"], "bos_token_id": 1, "eos_token_ids": [2],
                             "add_bos": True, "chat_template": None}
    manifest["files"]["tokenizer.json"] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    (artifact_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def art(tiny_artifact, tmp_path_factory):
    path = Path(shutil.copytree(tiny_artifact(OPTIONS), tmp_path_factory.mktemp("json-tok") / "art"))
    attach_json_tokenizer(path)
    return load_artifact(path)


def test_mask_bits_equal_the_matchers_answers(art):
    tokenizer = art.tokenizer()
    constrainer = Constrainer(tokenizer)
    rng = np.random.default_rng(0)
    for constraint in [Constraint("json_schema", json.dumps(SCHEMAS[1])), Constraint("regex", r"[a-c]{2}-[0-9]+"),
                       Constraint("json_object")]:
        state = constrainer.start(constraint)
        for _ in range(25):
            allowed = constrainer.allowed([state], 96)[0]
            assert not allowed[constrainer.vocab:].any()  # the model's ids past the tokenizer's: never
            truth = np.array([state.matcher.deep_copy().try_consume_tokens([t]) == 1
                              for t in range(constrainer.vocab)])
            truth[2] = state.matcher.is_accepting()  # EOS: allowed exactly where the grammar may end
            # every allowed token is one the matcher accepts; it may allow fewer where bytes are forced (it keeps
            # the canonical tokenization of a forced run, e.g. '{' but not '{"' before '"kind"')
            assert allowed[2] == truth[2] and not (allowed[:constrainer.vocab] & ~truth).any(), constraint
            assert allowed.any()
            choices = [t for t in np.flatnonzero(allowed) if t != 2]
            if not choices:
                break
            ended = constrainer.consume(state, int(rng.choice(choices)))
            assert state.error is None
            if ended:  # the grammar is complete (a JSON value's last '}'): nothing may follow
                assert state.matcher.is_stopped()
                break


def test_constrained_outputs_parse_and_validate_beside_unchanged_neighbours(art):
    runner, tokenizer = KernelRunner(art), art.tokenizer()
    prompt = tokenizer.encode("give me json")
    alone = Engine(runner, tokenizer)
    free = [alone.add(Request(prompt + [5 + i], 20, SamplingParams(temperature=1.0, seed=i), stop_ids=(2,)))
            for i in range(2)]
    alone.run_until_done()
    engine = Engine(runner, tokenizer)
    constrained = []
    for seed in range(3):
        for schema in SCHEMAS:
            request = Request(prompt, 50, SamplingParams(temperature=1.0, seed=seed), stop_ids=(2,),
                              constraint=Constraint("json_schema", json.dumps(schema)), logprobs=0)
            constrained.append((schema, engine.add(request)))
        regex = engine.add(Request(prompt, 30, SamplingParams(temperature=1.0, seed=seed), stop_ids=(2,),
                                   constraint=Constraint("regex", r"[a-f]{3}-[0-9]{2,4}")))
        constrained.append(("regex", regex))
        lark = Constraint("lark", 'start: "{\\"k\\": [" NUM ("," NUM)? ("," NUM)? "]}"\nNUM: /[0-9]{1,2}/\n')
        constrained.append(("lark", engine.add(Request(prompt, 40, SamplingParams(temperature=0.8, seed=seed),
                                                       constraint=lark))))
    neighbours = [engine.add(Request(s.request.prompt, 20, s.request.params, stop_ids=(2,))) for s in free]
    engine.run_until_done()
    assert [s.generated for s in neighbours] == [s.generated for s in free]  # masks touch only their own rows
    for schema, seq in constrained:
        assert seq.finish_reason == "stop" and seq.constraint_error is None, (schema, seq.text)
        if schema == "regex":
            assert re.fullmatch(r"[a-f]{3}-[0-9]{2,4}", seq.text), seq.text
        elif schema == "lark":
            assert re.fullmatch(r'\{"k": \[[0-9]{1,2}(,[0-9]{1,2}){0,2}\]\}', seq.text), seq.text
        else:
            jsonschema.validate(json.loads(seq.text), schema)
            # a JSON value's last '}' ends the grammar; an EOS that ended it instead is scored too
            assert len(seq.logprobs) == len(seq.generated) + (seq.logprobs[-1].token == 2)
    # random weights alone would not have written JSON: the free runs do not parse
    assert not any(seq.text.startswith("{") and _parses(seq.text) for seq in free)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def test_bad_constraints_are_errors(art):
    engine = Engine(KernelRunner(art), art.tokenizer())
    with pytest.raises(BitsmithError, match="invalid regex"):
        engine.add(Request([1, 5], 4, constraint=Constraint("regex", "a(b")))
    with pytest.raises(BitsmithError, match="not JSON"):
        engine.add(Request([1, 5], 4, constraint=Constraint("json_schema", "{nope")))
    with pytest.raises(BitsmithError, match="invalid json schema"):
        engine.add(Request([1, 5], 4, constraint=Constraint("json_schema", '{"type": "nonsense"}')))
    with pytest.raises(BitsmithError, match="unknown constraint kind"):
        Constraint("yaml", "x")


def test_run_cli_and_generate_loop_share_the_engines_mask(art, tmp_path):
    from click.testing import CliRunner

    from bitsmith.cli import main

    tokenizer = art.tokenizer()
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[0]))
    engine = Engine(KernelRunner(art), tokenizer)
    greedy = engine.add(Request(tokenizer.encode("json"), 50, stop_ids=(2,),
                                constraint=Constraint("json_schema", schema.read_text())))
    pattern = engine.add(Request(tokenizer.encode("json"), 30, SamplingParams(temperature=1.0, seed=3),
                                 stop_ids=(2,), constraint=Constraint("regex", "[a-f]{3}-[0-9]{2,4}")))
    engine.run_until_done()
    result = CliRunner().invoke(main, ["run", str(art.directory), "json", "--json-schema", str(schema), "--json",
                                       "--max-tokens", "50"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["token_ids"] == greedy.generated  # the single-sequence loop masks as the batched engine does
    jsonschema.validate(json.loads(out["text"]), SCHEMAS[0])
    result = CliRunner().invoke(main, ["run", str(art.directory), "json", "--regex", "[a-f]{3}-[0-9]{2,4}", "--json",
                                       "--max-tokens", "30", "--temperature", "1", "--seed", "3"])
    assert result.exit_code == 0 and json.loads(result.output.strip().splitlines()[-1])["text"] == pattern.text
    result = CliRunner().invoke(main, ["run", str(art.directory), "json", "--regex", "a(b"])
    assert result.exit_code != 0 and "invalid regex" in result.output


def test_llguidance_is_imported_only_for_a_constraint(art, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "llguidance.numpy", None)
    engine = Engine(KernelRunner(art), art.tokenizer())
    seq = engine.add(Request([1, 5, 6], 3, stop_ids=(2,)))
    engine.run_until_done()
    assert seq.done
    with pytest.raises(BitsmithError, match="pip install llguidance"):
        engine.add(Request([1, 5], 4, constraint=Constraint("json_object")))


def test_llama2c_tokenizer_masks_spell_the_constraint():
    from test_tokenizer_llama2c import tiny_pieces

    from bitsmith.runtime.tokenizer_llama2c import Llama2cTokenizer

    entries = tiny_pieces()
    tok = Llama2cTokenizer([p for p, _ in entries], [s for _, s in entries])
    constrainer = Constrainer(tok)
    for kind, spec, pattern in [("regex", "abab-c", r"abab-c"),
                                ("json_schema", json.dumps({"type": "object", "properties": {"a": {"const": "ab"}},
                                                            "required": ["a"]}), r'\{"a": "ab"\}')]:
        state = constrainer.start(Constraint(kind, spec))
        out = []
        for _ in range(40):
            allowed = np.flatnonzero(constrainer.allowed([state], len(tok.pieces))[0])
            assert state.error is None and len(allowed), (kind, tok.decode(out))
            if 2 in allowed:  # EOS: the grammar may end here
                break
            out.append(int(allowed[-1]))
            # run.c's encoder puts a space before a whole text; llguidance's view of a piece of output must not
            # have it (it allowed only ' ' first)
            if constrainer.consume(state, out[-1]):
                break
        assert state.error is None and re.fullmatch(pattern, tok.decode(out)), (kind, tok.decode(out))


def test_run_refuses_a_negative_seed_before_loading(tmp_path):
    from click.testing import CliRunner

    from bitsmith.cli import main

    # numpy's default_rng raises ValueError on a negative seed: a traceback after the artifact loaded
    result = CliRunner().invoke(main, ["run", str(tmp_path), "hi", "--seed", "-1"])
    assert result.exit_code == 2 and "--seed" in result.output and result.exception.__class__ is SystemExit
