"""Tokenizers the runtime can load from an artifact: HF tokenizer.json and llama2.c tok*.bin."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

from bitsmith.errors import BitsmithError
from bitsmith.runtime.tokenizer_llama2c import Llama2cTokenizer


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """`tokenizers.Tokenizer` from tokenizer.json; BOS is added by us (add_bos), never by the post-processor."""

    def __init__(self, path: Path, entry: dict[str, Any]):
        from tokenizers import Tokenizer as _Tok  # optional: a runtime may serve token ids alone

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception subclass for bad JSON
            raise BitsmithError(f"cannot read tokenizer: {exc}", where=str(path), fix="rebuild the artifact") from exc
        self.bos_token_id = entry.get("bos_token_id")
        self.eos_token_ids = tuple(entry.get("eos_token_ids") or ())
        self.add_bos = bool(entry.get("add_bos"))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        """The tokenizer.json text (what llguidance builds its token trie from)."""
        return self._tok.to_str()


def load_tokenizer(directory: str | Path, entry: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer described by a manifest `tokenizer` entry, reading files from `directory`."""
    directory = Path(directory)
    kind = entry.get("kind")
    if kind == "hf":
        return HFTokenizer(directory / "tokenizer.json", entry)
    if kind == "llama2c":
        return Llama2cTokenizer.from_file(directory / "tokenizer.bin", entry)
    raise BitsmithError(f"unknown tokenizer kind {kind!r}", where=str(directory), fix="rebuild the artifact")


def tokenizer_from_spec(spec: Any) -> Tokenizer:
    """A tokenizer from a compile-time TokenizerSpec (files held in memory), via a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="bitsmith-tok-") as tmp:
        for name, data in spec.files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_tokenizer(tmp, spec.manifest_entry())


def render_chat(template: str | None, messages: list[dict[str, str]], tokenizer: Tokenizer,
                tools: list[dict] | None = None) -> str:
    """Apply the model's Jinja chat template (with `tools` for templates that render them); fall back to plain
    concatenation when there is none."""
    if not template:
        return "\n".join(m["content"] for m in messages)
    import jinja2  # optional: only for chat templates

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())

    def raise_exception(msg: str) -> None:
        raise BitsmithError(f"chat template error: {msg}", fix="check the messages' roles")

    env.globals["raise_exception"] = raise_exception
    bos = tokenizer.decode([tokenizer.bos_token_id]) if tokenizer.bos_token_id is not None else ""
    eos = tokenizer.decode([tokenizer.eos_token_ids[0]]) if tokenizer.eos_token_ids else ""
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos, tools=tools
    )


def encode_chat(template: str | None, messages: list[dict[str, str]], tokenizer: Tokenizer,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` rendered with the chat template (no second BOS when the template writes one)."""
    text = render_chat(template, messages, tokenizer, tools)
    bos = tokenizer.decode([tokenizer.bos_token_id]) if tokenizer.bos_token_id is not None else None
    return tokenizer.encode(text, add_bos=False if bos and text.startswith(bos) else None)
