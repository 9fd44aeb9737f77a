"""The OpenAI request side of `serve`: bodies to engine Requests (prompts, sampling, logprobs, response_format, tools)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from bitsmith.errors import BitsmithError
from bitsmith.runtime.constrained import JSON_LAYOUT, Constraint
from bitsmith.runtime.engine import Request
from bitsmith.runtime.logprobs import MAX_TOP_LOGPROBS
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.runtime.tokenizer import encode_chat


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Job:
    """One HTTP request: its engine Requests (one per prompt) and how to shape their answers."""

    chat: bool
    requests: list[Request]
    stream: bool
    echo: bool = False  # completions: the prompt's text (and logprobs) come first
    logprobs: int | None = None  # completions: the legacy `logprobs` k; chat: top_logprobs when logprobs is true
    tools: dict[str, Any] = field(default_factory=dict)  # chat: name -> tool, when the output may be a tool call
    id: str = ""


def _number(body: dict, key: str, default: Any, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"'{key}' must be a {'integer' if kind is int else 'number'}")
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"'{key}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be a boolean")
    return value


def response_constraint(body: dict) -> Constraint | None:
    """`response_format` {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema"}}."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object")
        return Constraint("json_schema", json.dumps(schema))
    raise ApiError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'")


def tool_call_schema(tools: dict[str, Any]) -> dict:
    """A tool call's JSON: {"name": one of `tools`, "arguments": that tool's parameters}."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": name},
                               "arguments": tool.get("parameters") or {"type": "object"}}}
               for name, tool in tools.items()]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_LAYOUT}  # the layout of runtime/constrained.py's JSON (lark's %json too)


def tool_constraint(body: dict) -> tuple[dict[str, Any], Constraint | None]:
    """(the tools the output may call, the constraint on the output) from `tools` + `tool_choice`.

    "required" and a named function: the output is a call (JSON, constrained). "auto" (the default with tools): the
    model's first token decides, a `{` starts a call constrained like "required" and anything else is plain text;
    a small model is no judge of when to call, so its own distribution picks and the grammar keeps a call valid.
    "none": tools are ignored."""
    tools = body.get("tools")
    if not tools:
        return {}, None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list of {type: function, function: {name, parameters}}")
    by_name: dict[str, Any] = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, "each tool must be {type: function, function: {name, parameters}}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ApiError(400, f"tool {fn['name']!r}: 'parameters' must be a JSON schema object")
        by_name[fn["name"]] = fn
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return {}, None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in by_name:
            raise ApiError(400, f"'tool_choice' names no tool of 'tools': {name!r}")
        by_name = {name: by_name[name]}
    elif choice not in ("auto", "required"):
        raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or {type: function, function: {name}}")
    schema = json.dumps(tool_call_schema(by_name))
    if choice == "auto":  # a call (JSON) or text that does not start with "{"
        return by_name, Constraint("lark", f"start: call | TEXT\ncall: %json {schema}\nTEXT: /[^{{][\\s\\S]*/\n")
    return by_name, Constraint("json_schema", schema)


def tools_prompt(tools: dict[str, Any]) -> str:
    """The system text that tells the model which functions it may call and how (chat templates without tools)."""
    listed = json.dumps([{"name": n, "description": t.get("description", ""), "parameters": t.get("parameters", {})}
                         for n, t in tools.items()])
    return (f"You can call these functions: {listed}\nTo call one, answer with only a JSON object "
            '{"name": <function name>, "arguments": <its arguments>}.')


class RequestBuilder:
    """Turns request bodies into engine Requests."""

    def __init__(self, tokenizer: Any, model_name: str, chat_template: str | None, max_context: int,
                 vocab_size: int | None) -> None:
        self.tokenizer, self.model_name, self.chat_template = tokenizer, model_name, chat_template
        self.max_context, self.vocab_size = max_context, vocab_size

    def _messages(self, body: dict, tools: dict[str, Any]) -> list[dict[str, str]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects")
        out = []
        for m in messages:
            content = m.get("content")
            if content is None and m.get("tool_calls"):  # an earlier call of the assistant's, as the model wrote it
                try:
                    content = "\n".join(json.dumps({"name": c["function"]["name"],
                                                    "arguments": json.loads(c["function"]["arguments"])})
                                        for c in m["tool_calls"])
                except (KeyError, TypeError, json.JSONDecodeError) as exc:
                    raise ApiError(400, "each of a message's 'tool_calls' must be {id, type: function, function: "
                                        f"{{name, arguments: a JSON object as a string}}}} ({exc!r})") from exc
            if isinstance(content, list):  # [{type: text, text}] parts
                texts = [p.get("text", "") for p in content if isinstance(p, dict)]
                content = "".join(texts) if all(isinstance(t, str) for t in texts) else None  # else: the 400 below
            if not isinstance(content, str):
                raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects")
            out.append({"role": str(m.get("role", "user")), "content": content})
        if tools and "tools" not in (self.chat_template or ""):  # a template that renders tools gets them below
            out.insert(0, {"role": "system", "content": tools_prompt(tools)})
        return out

    def _prompts(self, body: dict) -> list[list[int]]:
        """`prompt`: a string, a list of token ids, or a list of strings / token-id lists (one choice each)."""
        prompt = body.get("prompt")
        items = prompt if isinstance(prompt, list) and prompt and not all(type(t) is int for t in prompt) else [prompt]
        out = []
        for item in items:
            if isinstance(item, str) and item:
                out.append(self.tokenizer.encode(item))
            elif isinstance(item, list) and item and all(type(t) is int for t in item):
                bad = [t for t in item if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
                if bad:
                    raise ApiError(400, f"token id {bad[0]} is outside the vocabulary of {self.vocab_size}")
                out.append(list(item))
            else:
                raise ApiError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of those")
        return out

    def build(self, body: Any, chat: bool) -> Job:
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        if body.get("model") not in (None, self.model_name):
            raise ApiError(400, f"unknown model {body.get('model')!r}; this server serves {self.model_name!r}",
                           "model_not_found")
        tools, constraint, echo = {}, None, False
        if chat:
            tools, constraint = tool_constraint(body)
            fmt = response_constraint(body)
            if fmt is not None and constraint is not None:
                raise ApiError(400, "use 'response_format' or 'tools', not both (or set tool_choice 'none')")
            constraint = constraint or fmt
            try:
                listed = [{"type": "function", "function": t} for t in tools.values()] or None
                prompts = [encode_chat(self.chat_template, self._messages(body, tools), self.tokenizer, listed)]
            except BitsmithError as exc:
                raise ApiError(400, exc.problem) from exc
            logprobs = _number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS) if _flag(body, "logprobs") else None
        else:
            constraint = response_constraint(body)  # an extension: the legacy API has none
            prompts = self._prompts(body)
            logprobs = _number(body, "logprobs", None, int, 0, MAX_TOP_LOGPROBS)
            echo = _flag(body, "echo")
        max_tokens = _number(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                             else "max_tokens", 16, int, 0 if echo else 1)
        for prompt in prompts:
            if len(prompt) + max_tokens > self.max_context:
                raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the context "
                                    f"of {self.max_context} tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of strings")
        params = SamplingParams(temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
                                top_k=_number(body, "top_k", 0, int, 0),
                                top_p=_number(body, "top_p", 1.0, float, 1e-6, 1.0),
                                seed=_number(body, "seed", None, int, 0))  # numpy's generator takes no negative
        stream = _flag(body, "stream")
        if stream and (len(prompts) > 1 or logprobs is not None or echo):
            raise ApiError(400, "'stream' is for one prompt without logprobs or echo")
        # vLLM's extension: benchmarks want fixed-length outputs
        stop_ids = () if _flag(body, "ignore_eos") else tuple(self.tokenizer.eos_token_ids)
        job_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        requests = [Request(prompt, max_tokens, params, stop_ids, tuple(stop), job_id, constraint=constraint,
                            logprobs=logprobs, echo_logprobs=echo) for prompt in prompts]
        return Job(chat, requests, stream, echo, logprobs, tools, job_id)
