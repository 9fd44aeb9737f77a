"""Real trained models (skipped without ../shared/data): greedy output equals transformers / llama2.c."""

from __future__ import annotations

import pytest

from bitsmith.pipeline import CompileOptions, compile_model
from bitsmith.tools.run import run_prompt
from bitsmith.errors import BitsmithError
from bitsmith.runtime.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
STORIES260K_SENTENCE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high"
)


def transformers_greedy(model_dir, prompt: str, n: int, **load_kwargs) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, **load_kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **load_kwargs).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def test_tinystories_656k_greedy_equals_transformers(shared_data, tmp_path):
    model_dir = shared_data / "tinystories-656k"
    art = compile_model(model_dir, tmp_path / "art", CompileOptions())
    text, ids = run_prompt(art, "Once upon a time", 32, GREEDY)
    expected = transformers_greedy(model_dir, "Once upon a time", 32)
    assert len(ids) == 32
    assert ids == expected
    assert "Lily" in text


def test_stories260k_greedy_from_bos_gives_readme_sentence(shared_data, tmp_path):
    art = compile_model(shared_data / "stories260k" / "stories260K.bin", tmp_path / "art", CompileOptions())
    text, ids = run_prompt(art, "", 80, GREEDY)
    assert text.lstrip().startswith(STORIES260K_SENTENCE), text


@pytest.mark.slow
def test_smollm2_gguf_greedy_equals_transformers(shared_data, tmp_path):
    import os

    from bitsmith.compiler.default_model import default_model_path

    try:
        gguf = default_model_path()
    except BitsmithError as exc:  # no registry access: nothing to compare
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
    art = compile_model(gguf, tmp_path / "art", CompileOptions())
    prompt = "The capital of France is"
    _, ids = run_prompt(art, prompt, 24, GREEDY)
    work = tmp_path / "hf"
    work.mkdir()
    for name in ("config.json", "tokenizer.json"):
        os.symlink(shared_data / "smollm2-135m-instruct-q4_1" / name, work / name)
    os.symlink(gguf, work / gguf.name)
    expected = transformers_greedy(work, prompt, 24, gguf_file=gguf.name)
    assert ids == expected[: len(ids)] and len(ids) >= 8


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(shared_data, tmp_path):
    import os

    from transformers import AutoTokenizer

    from bitsmith.compiler.default_model import default_model_path
    from bitsmith.compiler.frontends.gguf import load_gguf
    from bitsmith.tools.run import encode_prompt
    from bitsmith.runtime.artifact import Artifact

    try:
        gguf = default_model_path()
    except BitsmithError as exc:
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
    spec = load_gguf(gguf).tokenizer
    for name, data in spec.files.items():
        (tmp_path / name).write_bytes(data)
    artifact = Artifact(tmp_path, {"tokenizer": spec.manifest_entry(), "model": {}})
    ours = encode_prompt(artifact, "What is 2+2?", chat=True)
    work = tmp_path / "hf"
    work.mkdir()
    os.symlink(gguf, work / gguf.name)
    tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
    theirs = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
