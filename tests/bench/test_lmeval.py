"""lm-evaluation-harness (local-completions) against `bitsmith serve` scores like transformers on the same model.

bench/lmeval.py --smoke: TinyStories-656K compiled without quantization (float32 KV cache), the first
questions of bench/lmeval_task, scored by lm_eval through `bitsmith serve` (echo + logprobs, token-id
prompts) and by lm_eval's hf model. Here, independently of the harness's hf run, transformers scores the
same token ids (lm_eval's split: the context's ids, then the whole text's ids past them) and every served
log-likelihood must be within 1e-3 relative of it, with the same accuracy and the same chosen answers.
Needs lm_eval in its venv (bench/peers/setup_lmeval.sh); skipped without it, as in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

VENV = Path(os.environ.get("BITSMITH_LMEVAL_VENV", Path.home() / ".cache" / "bitsmith" / "lmeval-venv"))
QUESTIONS = REPO_ROOT / "bench" / "lmeval_task" / "questions.jsonl"
LIMIT = 5


def transformers_logliks(model_dir: Path, docs: list[dict]) -> list[list[float]]:
    """Each choice's log-likelihood as lm_eval forms the request (BOS + context ids + continuation ids)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tok.encode(context)  # the tokenizer's BOS included, as add_bos_token=True asks
        row = []
        for choice in doc["choices"]:
            continuation = tok.encode(f"{context} {choice}")[len(context_ids):]
            ids = context_ids + continuation
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            row.append(sum(logp[p - 1, ids[p]].item() for p in range(len(context_ids), len(ids))))
        out.append(row)
    return out


def test_lmeval_local_completions_matches_transformers(shared_data):
    if not (VENV / "bin" / "lm_eval").exists():
        pytest.skip(f"lm_eval is not installed in {VENV} (bench/peers/setup_lmeval.sh; BITSMITH_LMEVAL_VENV)")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "lmeval.py"), "--smoke", "--json",
                           "--limit", str(LIMIT)], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                          env={**os.environ, "BITSMITH_DATA": str(shared_data)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = report["summary"]
    assert summary["questions"] == LIMIT and report["tokenized_requests"] and report["host"]["cpu"]

    docs = [json.loads(line) for line in QUESTIONS.read_text().splitlines()[:LIMIT]]
    reference = transformers_logliks(shared_data / "tinystories-656k", docs)
    ours_correct = ref_correct = 0
    for i, doc in enumerate(docs):
        served = summary["per_question"][str(i)]["ours"]
        harness_hf = summary["per_question"][str(i)]["ref"]
        assert served == pytest.approx(reference[i], rel=1e-3), (i, served, reference[i])
        assert harness_hf == pytest.approx(reference[i], rel=1e-4), (i, harness_hf, reference[i])
        pick = max(range(4), key=served.__getitem__)
        assert pick == max(range(4), key=reference[i].__getitem__), (i, served, reference[i])
        ours_correct += pick == doc["answer"]
        ref_correct += max(range(4), key=reference[i].__getitem__) == doc["answer"]
    assert summary["acc"]["ours"] == pytest.approx(ours_correct / LIMIT)
    assert summary["acc"]["ours"] == summary["acc"]["ref"] == pytest.approx(ref_correct / LIMIT)
    assert summary["same_choice"] == summary["same_choice_norm"] == LIMIT
