"""One sequence on compiled kernels: prefill and decode with a private block table (`bitsmith run`, evals)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.runners import open_runner


class CompiledSession:
    """One sequence's state (position + a private block table) on the compiled kernels."""

    def __init__(self, artifact: Artifact, max_context: int | None = None, runner: Any = None) -> None:
        self.runner = runner or open_runner(artifact)
        self.max_context = min(self.runner.max_context, max_context or self.runner.max_context)
        if self.runner.num_blocks < self.runner.max_blocks:
            raise BitsmithError("the KV pool is smaller than one full-context sequence", where=str(artifact.directory),
                                fix="recompile with a larger --memory or a smaller --context")
        self.block_table = np.arange(self.runner.max_blocks, dtype=np.int32)  # identity: blocks 0..max_blocks-1
        # windowed layers' ring (kv_plan.py): slot 0's blocks
        self.ring_table = self.runner.ring_table(0) if getattr(self.runner, "ring_blocks", 0) else None
        self.position = 0

    def reset(self) -> None:
        self.position = 0  # stale cache slots are never read: a step writes slots before it reads them

    def _advance(self, n: int) -> np.ndarray:
        if self.position + n > self.max_context:
            raise BitsmithError(f"{self.position + n} tokens exceed the context of {self.max_context}",
                                fix="shorten the prompt or lower --max-tokens (or recompile with a larger --context)")
        positions = np.arange(self.position, self.position + n, dtype=np.int64)
        self.position += n
        return positions

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] for every prompt token, in chunks of the largest schedule's rows."""
        return np.concatenate(self._prefill_chunks(tokens, last_only=False))

    def prefill_last(self, tokens: list[int]) -> np.ndarray:
        """Logits [vocab] after the last prompt token: the lm_head runs for that row alone."""
        return self._prefill_chunks(tokens, last_only=True)[-1][0]

    def _prefill_chunks(self, tokens: list[int], last_only: bool) -> list[np.ndarray]:
        """Each chunk's logits: all its rows, or (last_only) none but the prompt's last row."""
        positions = self._advance(len(tokens))
        ids = np.asarray(tokens, dtype=np.int64)
        rows, out = self.runner.max_rows, []
        for i in range(0, len(ids), rows):
            chunk = ids[i:i + rows]
            wanted = None if not last_only else [len(chunk) - 1] if i + rows >= len(ids) else []
            out.append(self._run(chunk, positions[i:i + rows], wanted))
        return out

    def decode(self, token: int) -> np.ndarray:
        """Logits [vocab] for the next token after `token`."""
        return self._run(np.array([token], dtype=np.int64), self._advance(1))[0]

    def _run(self, ids: np.ndarray, positions: np.ndarray, logits_rows: list[int] | None = None) -> np.ndarray:
        tables = np.broadcast_to(self.block_table, (len(ids), len(self.block_table)))
        if self.ring_table is None:
            return self.runner.run(ids, positions, tables, logits_rows=logits_rows)
        rings = np.broadcast_to(self.ring_table, (len(ids), len(self.ring_table)))
        return self.runner.run(ids, positions, tables, logits_rows=logits_rows, ring_tables=rings)
