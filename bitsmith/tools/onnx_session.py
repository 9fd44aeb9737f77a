"""One sequence on an exported ONNX decoder under onnxruntime, with the KV cache fed back (prefill/decode, as ours)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class OnnxSession:
    """prefill / prefill_last / decode on OUT/model.onnx: what runtime/generate.py drives, so greedy decoding of an
    export and of our artifact run the same loop. `batch` > 1 runs that many copies of the sequence."""

    def __init__(self, model_dir: str | Path, batch: int = 1, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        first = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.batch = batch
        config = Path(model_dir) / "genai_config.json"
        self.max_context = json.loads(config.read_text())["model"]["context_length"] if config.is_file() else 1 << 20
        self.reset()

    def reset(self) -> None:
        self.past = {n: np.zeros((self.batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for n in self.past_names}
        self.position = 0

    def run(self, ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One step on explicit inputs [batch, seq] (mask [batch, past + seq]); keeps the presents; logits."""
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64), **self.past}
        outs = dict(zip(self.output_names, self.session.run(None, feed)))
        self.past = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return outs["logits"]

    def _step(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        ids = np.tile(np.asarray(tokens, dtype=np.int64), (self.batch, 1))
        positions = np.tile(np.arange(self.position, self.position + n, dtype=np.int64), (self.batch, 1))
        mask = np.ones((self.batch, self.position + n), dtype=np.int64)
        self.position += n
        return self.run(ids, mask, positions)[0]

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] (of the first copy)."""
        return self._step(tokens)

    def prefill_last(self, tokens: list[int]) -> np.ndarray:
        return self._step(tokens)[-1]

    def decode(self, token: int) -> np.ndarray:
        return self._step([token])[0]
