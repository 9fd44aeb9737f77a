"""Constrained decoding on `bitsmith serve`: the openai client's schema-valid JSON and tool calls, and the mask's cost.

    python bench/constrained.py [--artifact DIR] [--rounds 3] [--tokens 128] [--json] [--out FILE]

1. The official `openai` client against `bitsmith serve`: chat completions with `response_format`
   json_schema for several schemas (each output must parse and validate with jsonschema) and with `tools`
   (the tool call's arguments must validate against the function's parameters).
2. Validity: the same schema prompts with and without the constraint (greedy, up to 256 tokens): the share
   of outputs that parse (whole text, code fences stripped) and validate.
3. Cost of the mask: streaming chat completions from a closed-loop client at concurrency 1, 4 and 16, every
   request with and without a JSON-schema constraint. Both produce exactly --tokens tokens: `ignore_eos`,
   and a schema whose outputs run longer than that (an array with minItems 200), so output length is the
   same and only the mask differs. Each request's prompt is unique (no prefix-cache hit skips a prefill).
   Rounds interleave the two modes at each level; medians of output tokens/s, inter-token latency and
   time to first token, and the cost ratio (plain tok/s / constrained tok/s).
The artifact: SmolLM2-135M-Instruct compiled here (`bitsmith compile --concurrency 16 --context 512`: its
Q4_1 codes kept) unless --artifact. The table is headed by the host line (bench/hostinfo.py) and the load
average. bench/constrained.md quotes a run.

--smoke: TinyStories-656K from $BITSMITH_DATA, one round of 8 tokens at concurrency 1 and 2, no openai part.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]  # + the repo

import jsonschema  # noqa: E402
from hostinfo import host_info, host_line  # noqa: E402
from loadgen import closed_loop  # noqa: E402
from lmeval import DATA, MODEL_NAME, compile_artifact, serve  # noqa: E402

SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
               "properties": {"name": {"type": "string", "maxLength": 40},
                              "age": {"type": "integer", "minimum": 0, "maximum": 130},
                              "city": {"type": "string", "maxLength": 40}}},
    "recipe": {"type": "object", "additionalProperties": False, "required": ["title", "ingredients", "minutes"],
               "properties": {"title": {"type": "string", "maxLength": 60},
                              "ingredients": {"type": "array", "minItems": 2, "maxItems": 6,
                                              "items": {"type": "string", "maxLength": 30}},
                              "minutes": {"type": "integer", "minimum": 1, "maximum": 600}}},
    "review": {"type": "object", "additionalProperties": False, "required": ["sentiment", "score", "summary"],
               "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                              "score": {"type": "number", "minimum": 0, "maximum": 1},
                              "summary": {"type": "string", "maxLength": 80}}},
    "event": {"type": "object", "additionalProperties": False, "required": ["event", "year", "countries", "war"],
              "properties": {"event": {"type": "string", "maxLength": 60},
                             "year": {"type": "integer", "minimum": 0, "maximum": 2100},
                             "countries": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 30}},
                             "war": {"type": "boolean"}}},
}
PROMPTS = {
    "person": ["Describe a fictional person living in Lisbon.", "Give me the details of a retired teacher.",
               "Invent a character for a short story about sailors.", "Who is a famous scientist? Give details."],
    "recipe": ["Give me a simple pancake recipe.", "How do I make a tomato soup?",
               "Suggest a quick pasta dinner.", "A recipe for chocolate cookies, please."],
    "review": ["Review: The food was cold and the waiter was rude.", "Review: I loved this phone, the battery lasts days.",
               "Review: The movie was fine, nothing special.", "Review: Best concert of my life!"],
    "event": ["Tell me about the first Moon landing.", "Describe the fall of the Berlin Wall.",
              "What happened at the Battle of Hastings?", "Describe the first modern Olympic Games."],
}
# the throughput schema: outputs run past --tokens (minItems 200), so both modes emit exactly --tokens tokens
LONG_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"],
               "properties": {"items": {"type": "array", "minItems": 200, "items": {
                   "type": "object", "additionalProperties": False, "required": ["name", "qty", "unit"],
                   "properties": {"name": {"type": "string", "maxLength": 16},
                                  "qty": {"type": "integer", "minimum": 0, "maximum": 999},
                                  "unit": {"enum": ["g", "kg", "ml", "l", "pcs"]}}}}}}
# --smoke: TinyStories-656K's 2048-token vocabulary has no "{" (nor byte tokens), so no JSON object can be
# written with it; a long JSON string can ('"' is a token)
SMOKE_SCHEMA = {"type": "string", "minLength": 1000}
LONG_PROMPT = "List the groceries for a big party as JSON: items with name, qty and unit."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}


def instruction(name: str, prompt: str) -> str:
    return f"{prompt}\nReply with only a JSON object that follows this JSON schema:\n{json.dumps(SCHEMAS[name])}"


def parses_and_validates(text: str, schema: dict) -> tuple[bool, bool]:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return False, False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return True, False
    return True, True


def openai_checks(port: int) -> dict:
    """The official client: response_format json_schema per schema, then a tool call; everything must validate."""
    import openai
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    outputs = []
    for name, schema in SCHEMAS.items():
        reply = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": instruction(name, PROMPTS[name][0])}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            max_tokens=256, temperature=0)
        text = reply.choices[0].message.content
        outputs.append({"schema": name, "text": text, "valid": parses_and_validates(text, schema)[1]})
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is the weather like in Paris right now?"}],
        tools=[WEATHER_TOOL], tool_choice="required", max_tokens=128, temperature=0)
    calls = reply.choices[0].message.tool_calls or []
    tool = {"finish_reason": reply.choices[0].finish_reason, "calls": [], "valid": bool(calls)}
    for call in calls:
        ok = call.function.name == "get_weather"
        try:
            jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
        except (json.JSONDecodeError, jsonschema.ValidationError):
            ok = False
        tool["calls"].append({"name": call.function.name, "arguments": call.function.arguments, "valid": ok})
        tool["valid"] = tool["valid"] and ok
    return {"schemas": outputs, "tool": tool}


def post(port: int, body: dict, timeout: float = 600) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn.getresponse()


def validity(port: int) -> dict:
    """Per mode: how many of the schema prompts' outputs parse, and validate."""
    out = {}
    for mode in ("free", "constrained"):
        parsed = valid = total = 0
        examples = []
        for name, prompts in PROMPTS.items():
            for prompt in prompts:
                body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": instruction(name, prompt)}],
                        "max_tokens": 256, "temperature": 0}
                if mode == "constrained":
                    body["response_format"] = {"type": "json_schema",
                                               "json_schema": {"name": name, "schema": SCHEMAS[name]}}
                resp = post(port, body)
                data = json.loads(resp.read())
                if resp.status != 200:
                    raise SystemExit(f"POST /v1/chat/completions answered {resp.status}: {data}")
                text = data["choices"][0]["message"]["content"]
                p, v = parses_and_validates(text, SCHEMAS[name])
                if len(examples) < 2 and not v:
                    examples.append(text[:300])
                parsed, valid, total = parsed + p, valid + v, total + 1
        out[mode] = {"parsed": parsed, "valid": valid, "total": total, "invalid_examples": examples}
    return out


def one_stream(port: int, body: dict) -> tuple[float, list[float], str | None]:
    """(time to first content, arrival times of content chunks, finish_reason) of one streaming chat completion."""
    t0 = time.perf_counter()
    resp = post(port, {**body, "stream": True})
    times, finish, buffer = [], None, b""
    while chunk := resp.read1(65536):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event[6:].strip() == b"[DONE]":
                continue
            data = json.loads(event[6:])
            if "error" in data:
                raise SystemExit(f"stream error: {data['error']}")
            choice = data["choices"][0]
            if choice.get("delta", {}).get("content"):
                times.append(time.perf_counter())
            finish = choice.get("finish_reason") or finish
    return (times[0] - t0 if times else float("nan")), times, finish


def load(port: int, concurrency: int, tokens: int, schema: dict | None, tag: str) -> dict:
    """Closed loop: `concurrency` requests in flight until max(4, 2c) finished; tok/s counts --tokens per request."""
    total = max(4, 2 * concurrency)

    def send(index: int) -> tuple[float, list[float], str | None]:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Order {tag}-{index}. {LONG_PROMPT}"}],
                "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "long", "schema": schema}}
        return one_stream(port, body)

    # a failed request stops its client; any failure is re-raised below, not lost in a thread
    done, failed, wall = closed_loop(concurrency, total, send, (OSError, http.client.HTTPException, SystemExit),
                                     stop_on_error=True)
    if failed:
        raise SystemExit(f"{len(failed)} requests failed at concurrency {concurrency}: {failed[0]}")
    gaps = [b - a for _, times, _ in done for a, b in zip(times, times[1:])]
    return {"tok_s": total * tokens / wall, "itl_ms": 1e3 * statistics.median(gaps) if gaps else float("nan"),
            "ttft_ms": 1e3 * statistics.median(r[0] for r in done),
            "short": sum(r[2] != "length" for r in done)}  # finished before --tokens: would bias tok/s


def throughput(port: int, levels: tuple[int, ...], rounds: int, tokens: int, schema: dict) -> dict:
    runs: dict[str, list[dict]] = {}
    for r in range(rounds):
        for c in levels:
            # alternate which mode goes first, so drift within a round hits both alike
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                key = f"c{c}-{'schema' if constrained else 'plain'}"
                runs.setdefault(key, []).append(load(port, c, tokens, schema if constrained else None, f"{r}{key}"))
    out = {}
    for c in levels:
        plain, schema = runs[f"c{c}-plain"], runs[f"c{c}-schema"]
        med = {k: {m: statistics.median(x[m] for x in v) for m in ("tok_s", "itl_ms", "ttft_ms")}
               for k, v in (("plain", plain), ("schema", schema))}
        out[c] = {**med, "cost": med["plain"]["tok_s"] / med["schema"]["tok_s"],
                  "cost_by_round": [p["tok_s"] / s["tok_s"] for p, s in zip(plain, schema)],
                  "short": sum(x["short"] for x in plain + schema)}
    return out


def mask_cost(artifact: Path, schema: dict, batch: int, steps: int) -> dict:
    """The mask alone, in process: `batch` matchers of `schema` advanced `steps` tokens (each the best-scoring
    allowed token of random logits); ms per step for Constrainer.mask (llguidance bitmasks + the -inf fill)
    and for the consume calls. Free of HTTP and of the other processes' share of the step."""
    import numpy as np
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.constrained import Constrainer, Constraint
    tokenizer = load_artifact(artifact, check_hashes=False).tokenizer()
    constrainer = Constrainer(tokenizer)
    states = [constrainer.start(Constraint("json_schema", json.dumps(schema))) for _ in range(batch)]
    rng = np.random.default_rng(0)
    mask_s = consume_s = 0.0
    for _ in range(steps):
        logits = rng.standard_normal((batch, constrainer.vocab)).astype(np.float32)
        t0 = time.perf_counter()
        masked = constrainer.mask(states, logits)
        t1 = time.perf_counter()
        for state, row in zip(states, masked):
            constrainer.consume(state, int(row.argmax()))
        consume_s += time.perf_counter() - t1
        mask_s += t1 - t0
    if any(s.error for s in states):
        raise SystemExit(f"mask_cost: a matcher failed: {[s.error for s in states if s.error][0]}")
    return {"batch": batch, "steps": steps, "mask_ms": 1e3 * mask_s / steps, "consume_ms": 1e3 * consume_s / steps}


def table(report: dict) -> str:
    lines = [host_line(report["host"]), f"load average before / after: {report['load_before']} / "
             f"{report['load_after']}", f"artifact: {report['artifact']}; {report['tokens']} output tokens per "
             f"request, {report['rounds']} interleaved rounds, medians", "",
             "| concurrency | plain tok/s | schema tok/s | cost (plain/schema) | by round | ITL ms plain / schema "
             "| TTFT ms plain / schema |", "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for c, row in report["throughput"].items():
        p, s = row["plain"], row["schema"]
        lines.append(f"| {c} | {p['tok_s']:.0f} | {s['tok_s']:.0f} | {row['cost']:.3f}x | "
                     f"{', '.join(f'{x:.3f}' for x in row['cost_by_round'])} | {p['itl_ms']:.1f} / {s['itl_ms']:.1f} "
                     f"| {p['ttft_ms']:.0f} / {s['ttft_ms']:.0f} |")
    for m in report.get("mask", []):
        lines.append(f"mask in process, batch {m['batch']}: {m['mask_ms']:.2f} ms/step mask + {m['consume_ms']:.2f} "
                     f"ms/step consume ({m['steps']} steps)")
    short = sum(row["short"] for row in report["throughput"].values())
    lines.append(f"requests that ended before {report['tokens']} tokens: {short}")
    if report.get("validity"):
        lines.append("")
        for mode, v in report["validity"].items():
            lines.append(f"{mode}: {v['parsed']}/{v['total']} parse, {v['valid']}/{v['total']} validate")
            lines += [f"  invalid: {json.dumps(x)}" for x in v.get("invalid_examples", [])]
    if report.get("openai"):
        o = report["openai"]
        lines.append("")
        for item in o["schemas"]:
            lines.append(f"openai response_format {item['schema']}: valid={item['valid']}  {item['text']}")
        lines.append(f"openai tools: valid={o['tool']['valid']} finish={o['tool']['finish_reason']} "
                     f"calls={[(c['name'], c['arguments']) for c in o['tool']['calls']]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--skip-validity", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    levels, rounds, tokens = ((1, 2), 1, 8) if args.smoke else ((1, 4, 16), args.rounds, args.tokens)
    with tempfile.TemporaryDirectory(prefix="bitsmith-constrained-") as tmp:
        artifact = args.artifact or Path(tmp) / "artifact"
        if not args.artifact:
            model = DATA / "tinystories-656k" if args.smoke else None
            compile_artifact(artifact, model, ["--concurrency", "16", "--context", "512"])
        report = {"artifact": str(args.artifact or ("tinystories-656k" if args.smoke else
                                                    "SmolLM2-135M-Instruct Q4_1 kept, --concurrency 16 --context 512")),
                  "tokens": tokens, "rounds": rounds,
                  "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        with serve(artifact, Path(tmp) / "serve.log") as port:
            if not args.smoke:
                report["openai"] = openai_checks(port)
                if not args.skip_validity:
                    report["validity"] = validity(port)
            if not args.smoke:
                report["mask"] = [mask_cost(artifact, LONG_SCHEMA, b, 128) for b in (1, 4, 16)]
            report["throughput"] = throughput(port, levels, rounds, tokens, SMOKE_SCHEMA if args.smoke else LONG_SCHEMA)
    report["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report["host"] = host_info()
    text = table(report)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(report) if args.json else text)


if __name__ == "__main__":
    main()
