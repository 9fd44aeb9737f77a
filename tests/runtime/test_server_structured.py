"""`serve` with structured output and logprobs on the tiny random model: lm-evaluation-harness's echo payload,
token-id and batched prompts, chat logprobs, response_format (also through the official openai client), tool calls,
streaming under constraints, and the 400s."""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from test_constrained import OPTIONS, SCHEMAS, attach_json_tokenizer

from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.engine import Engine
from bitsmith.runtime.executor import KernelRunner
from bitsmith.runtime.server import Server
from bitsmith.tools.evaluate import CompiledScorer

TOL = 1e-5
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"enum": ["oslo",
                                                                                                     "lima"]}},
                                                          "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": SCHEMAS[0]}}]


@pytest.fixture(scope="module")
def served(tiny_artifact, tmp_path_factory):
    path = Path(shutil.copytree(tiny_artifact(OPTIONS), tmp_path_factory.mktemp("serve-json") / "art"))
    attach_json_tokenizer(path)
    art = load_artifact(path)
    tokenizer = art.tokenizer()
    # a template that renders tools itself (as tool-calling models' do): the server adds no tools system prompt,
    # which would not fit the tiny model's 64-token context
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if tools %}{{ tools | length }}{% endif %}"
    srv = Server(Engine(KernelRunner(art), tokenizer), tokenizer, "tiny", template, port=0, max_pending=32)
    srv.start()
    yield srv, art, tokenizer
    srv.shutdown(drain_seconds=10)


def post(server, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read().decode()
    conn.close()
    return resp.status, (json.loads(payload) if not body.get("stream") or resp.status != 200 else payload)


def events(payload):
    data = [line[6:] for line in payload.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_lm_eval_echo_payload_scores_token_id_prompts(served):
    server, art, tokenizer = served
    contexts = [tokenizer.encode("the answer is"), tokenizer.encode("a cat sat on")]
    conts = [tokenizer.encode(" yes")[1:], tokenizer.encode(" the mat")[1:]]
    # lm-evaluation-harness local-completions, loglikelihood: token ids, echo, logprobs 1, max_tokens 1
    body = {"model": "tiny", "prompt": [c + k for c, k in zip(contexts, conts)], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    status, out = post(server, "/v1/completions", body)
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1]
    scorer = CompiledScorer(art, 64)
    for choice, ctx, cont in zip(out["choices"], contexts, conts):
        tokens = ctx + cont
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(tokens) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and choice["text"].startswith(tokenizer.decode(tokens))
        ref = scorer.logprobs(tokens)[np.arange(len(tokens) - 1), tokens[1:]]
        np.testing.assert_allclose(lp["token_logprobs"][1:len(tokens)], ref, atol=TOL)
        # what lm-eval's parse_logprobs computes: the continuation's sum and whether it is the greedy choice
        ctxlen = len(ctx)
        total = sum(lp["token_logprobs"][ctxlen:-1])
        assert abs(total - ref[ctxlen - 1:].sum()) < 1e-4
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                              lp["top_logprobs"][ctxlen:-1]))
        full = scorer.logprobs(tokens)
        assert greedy == all(full[i - 1].argmax() == tokens[i] for i in range(ctxlen, len(tokens)))
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    # max_tokens 0: the prompt alone; strings and one token-id list are prompts too
    status, out = post(server, "/v1/completions", {"prompt": ["the cat", "dog"], "max_tokens": 0, "echo": True,
                                                   "logprobs": 0})
    assert status == 200 and [len(c["logprobs"]["tokens"]) for c in out["choices"]] == [8, 4]
    assert out["usage"]["completion_tokens"] == 0
    status, out = post(server, "/v1/completions", {"prompt": contexts[0], "max_tokens": 2, "temperature": 0})
    assert status == 200 and len(out["choices"]) == 1 and out["choices"][0]["logprobs"] is None


def test_chat_logprobs_shape(served):
    server, _, _ = served
    status, out = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 6, "temperature": 0, "logprobs": True,
                                                        "top_logprobs": 3, "ignore_eos": True})
    assert status == 200
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] == 6
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry["logprob"] == tops[0]  # greedy: the chosen token is the most likely
        assert bytes(entry["bytes"]).decode() == entry["token"]


def test_openai_client_gets_schema_valid_json_and_tool_calls(served):
    openai = pytest.importorskip("openai")
    server, _, _ = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
    for seed, schema in enumerate(SCHEMAS):
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "json"}], max_tokens=50, temperature=1.0,
            seed=seed, response_format={"type": "json_schema",
                                        "json_schema": {"name": f"s{seed}", "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "oslo"}],
                                           tools=TOOLS, tool_choice="required", max_tokens=56, temperature=1.0, seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


def test_tool_choice_forms_and_streaming_under_constraints(served):
    server, _, _ = served
    base = {"messages": [{"role": "user", "content": "add"}], "tools": TOOLS, "max_tokens": 56,
            "temperature": 1.0}
    status, out = post(server, "/v1/chat/completions", {**base, "seed": 2, "tool_choice": {
        "type": "function", "function": {"name": "add"}}})
    call = out["choices"][0]["message"]["tool_calls"][0]
    assert status == 200 and call["function"]["name"] == "add" and call["type"] == "function"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[0])
    for seed in range(3):  # auto: a valid call, or text that does not start one
        status, out = post(server, "/v1/chat/completions", {**base, "seed": seed, "tool_choice": "auto"})
        message = out["choices"][0]["message"]
        assert status == 200 and (message.get("tool_calls") or not message["content"].startswith("{"))
    status, out = post(server, "/v1/chat/completions", {**base, "seed": 0, "tool_choice": "none", "max_tokens": 4})
    assert status == 200 and "tool_calls" not in out["choices"][0]["message"]
    # streaming: response_format text deltas reassemble to valid JSON; a tool call comes as one tool_calls delta
    status, payload = post(server, "/v1/chat/completions", {
        "messages": base["messages"], "stream": True, "max_tokens": 50, "temperature": 1.0, "seed": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[1]}}})
    chunks = events(payload)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    jsonschema.validate(json.loads(text), SCHEMAS[1])
    assert len(chunks) > 2 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    status, payload = post(server, "/v1/chat/completions", {**base, "stream": True, "seed": 5,
                                                            "tool_choice": "required"})
    chunks = events(payload)
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert len(calls) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("path,body,message", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "invalid json schema"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "names no tool"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": [5, 4000]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "ab", "logprobs": 1, "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "ab", "max_tokens": 0}, "max_tokens"),
])
def test_structured_requests_refused(served, path, body, message):
    body = {"messages": [{"role": "user", "content": "hi"}], **body} if "chat" in path else body
    status, out = post(served[0], path, {"max_tokens": 4, **body})
    assert status == 400 and message in out["error"]["message"], out


def test_a_grammar_the_vocabulary_cannot_continue_is_an_error(served, tmp_path):
    from click.testing import CliRunner

    from bitsmith.cli import main

    # the JSON tokenizer has no upper-case letters: after '{"k": "' no token fits the schema
    schema = {"type": "object", "properties": {"k": {"const": "ZZ"}}, "required": ["k"]}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "response_format": {"type": "json_schema", "json_schema": {"name": "z", "schema": schema}}}
    status, out = post(served[0], "/v1/chat/completions", body)
    assert status == 400 and "constrained decoding stopped" in out["error"]["message"], out
    status, out = post(served[0], "/v1/chat/completions", {**body, "stream": True})
    errors = [e for e in events(out) if "error" in e]
    assert status == 200 and errors and "constrained decoding stopped" in errors[0]["error"]["message"], out
    path = tmp_path / "z.json"
    path.write_text(json.dumps(schema))
    result = CliRunner().invoke(main, ["run", str(served[1].directory), "hi", "--json-schema", str(path),
                                       "--max-tokens", "20"])
    assert result.exit_code != 0 and "constrained decoding stopped" in result.output, result.output


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": {"type": "function",
                                                                                       "function": "add"}},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
])
def test_malformed_tool_fields_are_400s(served, body):
    # these raised inside the handler: the client lost the connection with no answer
    status, out = post(served[0], "/v1/chat/completions", {"max_tokens": 4, **body})
    assert status == 400 and out["error"]["message"], out


def test_negative_seed_is_a_400_and_the_engine_thread_lives(served):
    # numpy's default_rng refuses a negative seed: raised in the engine thread, it stopped it and every request hung
    status, out = post(served[0], "/v1/completions", {"prompt": "ab", "max_tokens": 2, "seed": -1})
    assert status == 400 and "seed" in out["error"]["message"], out
    status, out = post(served[0], "/v1/completions", {"prompt": "ab", "max_tokens": 2, "seed": 3})
    assert status == 200 and served[0].loop.is_alive(), out
