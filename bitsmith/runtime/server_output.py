"""The OpenAI response side of `serve`: choices, tool calls, logprobs (chat and legacy shapes), usage, stream chunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from bitsmith.runtime.engine import Sequence
from bitsmith.runtime.server_api import Job


class Shaper:
    """Engine sequences to OpenAI-shaped bodies; token strings are each id decoded alone."""

    def __init__(self, tokenizer: Any, model_name: str) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _head(self, job: Job, kind: str) -> dict:
        return {"id": job.id, "object": kind, "created": int(time.time()), "model": self.model_name}

    def tool_calls(self, job: Job, text: str) -> list[dict] | None:
        """The output as [{id, type: function, function: {name, arguments}}] when it is a call of one of the tools."""
        if not job.tools or not text.lstrip().startswith("{"):
            return None
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            return None  # cut short by max_tokens: not a call
        if not isinstance(call, dict) or call.get("name") not in job.tools:
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}]

    def _chat_logprobs(self, job: Job, seq: Sequence) -> dict | None:
        if job.logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            piece = self._piece(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in seq.logprobs[:len(seq.generated)]]}

    def _legacy_logprobs(self, job: Job, seq: Sequence, offset: int) -> dict | None:
        """{tokens, token_logprobs, top_logprobs, text_offset}: the prompt's first (echo; its first logprob null),
        then every sampled token, the stop id that ended the output included (lm-evaluation-harness drops the
        last entry of an echo answer as the generated one)."""
        if job.logprobs is None:
            return None
        tokens, values, tops = [], [], []
        if job.echo:
            tokens += seq.request.prompt
            values += seq.prompt_logprobs
            tops += [None if top is None else {self._piece(t): v for t, v in top} for top in seq.prompt_top_logprobs]
        tokens += [lp.token for lp in seq.logprobs]
        values += [lp.logprob for lp in seq.logprobs]
        tops += [{self._piece(t): v for t, v in lp.top} for lp in seq.logprobs]
        pieces = [self._piece(t) for t in tokens]
        offsets = []
        for piece in pieces:
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": pieces, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def final(self, job: Job, seqs: list[Sequence]) -> dict:
        choices = []
        for index, seq in enumerate(seqs):
            if job.chat:
                calls = self.tool_calls(job, seq.text)
                message = ({"role": "assistant", "content": None, "tool_calls": calls} if calls
                           else {"role": "assistant", "content": seq.text})
                choices.append({"index": index, "message": message, "logprobs": self._chat_logprobs(job, seq),
                                "finish_reason": "tool_calls" if calls else seq.finish_reason})
            else:
                prompt = self.tokenizer.decode(seq.request.prompt) if job.echo or job.logprobs is not None else ""
                choices.append({"index": index, "text": (prompt if job.echo else "") + seq.text,
                                "logprobs": self._legacy_logprobs(job, seq, 0 if job.echo else len(prompt)),
                                "finish_reason": seq.finish_reason})
        prompt_tokens = sum(len(s.request.prompt) for s in seqs)
        completion = sum(len(s.generated) for s in seqs)
        return {**self._head(job, "chat.completion" if job.chat else "text_completion"), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    def chunk(self, job: Job, text: str | None, finish: str | None) -> dict:
        if job.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
        return {**self._head(job, "chat.completion.chunk" if job.chat else "text_completion"), "choices": [choice]}

    def last_chunks(self, job: Job, seq: Sequence, held: bool) -> list[dict]:
        """The stream's closing chunks: for a tools request (its text `held` back until it is known to be a call or
        not) the call as one tool_calls delta, or the text; then the finish reason."""
        out = []
        calls = self.tool_calls(job, seq.text) if job.chat else None
        if calls:
            delta = {"role": "assistant", "tool_calls": [{**call, "index": i} for i, call in enumerate(calls)]}
            out.append({**self._head(job, "chat.completion.chunk"),
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
        elif held and seq.text:
            out.append(self.chunk(job, seq.text, None))
        out.append(self.chunk(job, None, "tool_calls" if calls else seq.finish_reason))
        return out
