"""The llm-compressor peer rows of bench/quality.py: its GPTQ with and without its rotations, in the peer venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_NAME = "llm-compressor 0.14 GPTQModifier (CPU)"
# peer rotation -> the rotation of ours it is compared with (SpinQuant R1+R2+R4 random Hadamard is what
# --rotate hadamard folds; its learnable variant is the counterpart of --rotate learned)
PEER_ROTATIONS = {"none": "none", "spinquant": "hadamard", "spinquant-learned": "learned", "quip": "hadamard"}


def gguf_as_hf_dir(gguf: Path, out: Path, data: Path) -> Path:
    """An HF Llama directory (fp32 safetensors + config.json from $BITSMITH_DATA) with the GGUF's weights."""
    import numpy as np
    from safetensors.numpy import save_file

    from bitsmith.compiler.frontends.gguf import load_gguf

    out.mkdir(parents=True)
    ckpt = load_gguf(gguf)
    save_file({f"model.{k}" if k != "lm_head.weight" else k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in ckpt.weights.items()}, str(out / "model.safetensors"))
    for name in ("config.json", "tokenizer.json"):  # llm-compressor builds its processor from the tokenizer
        shutil.copy(data / "smollm2-135m-instruct-q4_1" / name, out / name)
    # without tokenizer_config.json transformers asks the hub which tokenizer class to use
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def last_error_line(stderr: str) -> str:
    """The exception line of a traceback (its last non-empty line), or 'failed' when there is none."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][-500:] if lines else "failed"


class PeerRunner:
    """Runs peer rows on one model: the HF directory is written once, each row is one subprocess in the venv."""

    def __init__(self, source_path: Path, venv: Path, data: Path, calib_ids, windows: list[list[int]],
                 timeout_s: float):
        self.python, self.timeout_s = venv / "bin" / "python", timeout_s
        self.venv, self.source_path, self.data = venv, source_path, data
        self.calib, self.windows = calib_ids.tolist(), windows
        self._tmp = tempfile.TemporaryDirectory(prefix="bitsmith-peer-")
        self._hf_dir: Path | None = None

    def hf_dir(self) -> Path:
        if self._hf_dir is None:
            self._hf_dir = self.source_path
            if self.source_path.suffix == ".gguf":  # the peer needs an HF directory: our dequantized weights as one
                self._hf_dir = gguf_as_hf_dir(self.source_path, Path(self._tmp.name) / "hf", self.data)
        return self._hf_dir

    def row(self, rotation: str, bits: int, group: int, sym: bool) -> dict:
        """ppl/KLD/top-1 of the peer at one setting, or {"error": why} (never raises for a peer failure)."""
        if not self.python.exists():
            return {"error": f"peer venv {self.venv} missing: run bench/peers/setup_llmcompressor.sh {self.venv}"}
        job = Path(self._tmp.name) / "job.json"
        job.write_text(json.dumps({"model": str(self.hf_dir()), "calib": self.calib, "eval_windows": self.windows,
                                   "bits": bits, "group": group, "sym": sym, "ignore": ["lm_head"],
                                   "rotation": rotation}))
        try:
            proc = subprocess.run([str(self.python), str(HERE / "peers" / "llmcompressor_gptq.py"), str(job)],
                                  capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                  timeout=self.timeout_s)
        except subprocess.TimeoutExpired:  # the row says so; the bench goes on
            return {"error": f"timed out after {self.timeout_s:.0f} s (--peer-timeout)"}
        if proc.returncode:
            return {"error": last_error_line(proc.stderr)}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        self._tmp.cleanup()
