"""The GPU device check, run ON the GPU machine over the bundle bench/gpu_bundle.py built (see bench/gpu.md).

    TVM_USE_RUNTIME_LIB=1 python bench/gpu_check.py --bundle .gpu --out $OUT

Runtime-only TVM (no compiler), numpy, and torch only for the peer and the timers. It writes
gpu_check.json with:
  kernels      every kernel of kernels_check.so on the GPU against the CPU kernels' outputs
  greedy       greedy tokens of each bundled artifact on the GPU against those the CPU kernels gave
  gemv         int4 g32 4096x4096 GEMV: GB/s with the L2 flushed before every run, against the
               device copy bandwidth (torch copy_ of 1 GiB, read + write) measured in the same run
  decode       SmolLM2-135M int4 batch-1 decode tok/s (ours) against torch fp16 eager (transformers
               LlamaForCausalLM with our dequantized weights), when the SmolLM2 pieces were carried
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np

REL_TOL = 2e-3  # of each output's largest magnitude: fp32 sums in another order (the CPU tests use 1e-3..5e-3)


def kernel_checks(bundle: Path) -> list[dict]:
    import tvm

    dev = tvm.cuda(0)
    lib = tvm.runtime.load_module(str(bundle / "kernels" / "kernels_check.so"))
    cases = np.load(bundle / "kernels" / "cases.npz")
    results = []
    for i, meta in enumerate(json.loads((bundle / "kernels" / "cases.json").read_text())):
        args = [tvm.runtime.tensor(cases[f"{i}_arg{j}"], dev) for j in range(meta["args"])]
        lib[meta["name"]](*args)
        worst, where = 0.0, {}
        for j in meta["compare"]:
            want = cases[f"{i}_want{j}"].astype(np.float32)
            got = args[j].numpy().astype(np.float32)
            err = np.abs(got - want) / max(np.abs(want).max(), 1e-6)
            worst = max(worst, float(err.max()))
            if err.max() > REL_TOL and err.ndim == 2:  # which rows of x / outputs are wrong
                bad = err > REL_TOL
                where = {"bad_fraction": float(bad.mean()), "bad_rows": np.flatnonzero(bad.any(1)).tolist()[:16],
                         "bad_cols": np.flatnonzero(bad.any(0)).tolist()[:16],
                         "got": got.ravel()[:4].tolist(), "want": want.ravel()[:4].tolist()}
        results.append({"kernel": meta["name"], "rel_err": worst, "ok": worst <= REL_TOL, **where})
    return results


def greedy_checks(bundle: Path, expected: dict) -> list[dict]:
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.session import CompiledSession

    results = []
    for name, want in expected.items():
        if not (bundle / name).is_dir():
            results.append({"artifact": name, "skipped": "not in the bundle"})
            continue
        session = CompiledSession(load_artifact(bundle / name))
        logits, tokens = session.prefill(want["prompt"])[-1], []
        first = {"finite": float(np.isfinite(logits).mean()), "max_abs": float(np.nanmax(np.abs(logits)))}
        for _ in range(len(want["tokens"])):
            tokens.append(int(np.argmax(logits)))
            logits = session.decode(tokens[-1])
        agree = sum(a == b for a, b in zip(tokens, want["tokens"]))
        results.append({"artifact": name, "equal": tokens == want["tokens"], "agree": agree,
                        "of": len(tokens), "first_logits": first, "gpu": tokens, "cpu": want["tokens"]})
    return results


def _event_times(run, flush, reps: int) -> float:
    """Median ms of `run` on the GPU, each run after a 256 MiB write that flushes the L2 (50 MB on an
    H100); torch events bracket the run alone (the flush is queued first, so the GPU never idles)."""
    import torch

    times = []
    for _ in range(reps):
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemv_bandwidth(bundle: Path) -> dict:
    import torch
    import tvm

    lib = tvm.runtime.load_module(str(bundle / "kernels" / "kernels_check.so"))
    meta = json.loads((bundle / "kernels" / "cases.json").read_text())[0]
    cases = np.load(bundle / "kernels" / "cases.npz")
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(cases[f"0_arg{j}"], dev) for j in range(meta["args"])]
    func = lib[meta["name"]]
    cache = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    func(*args)
    torch.cuda.synchronize()
    ms = _event_times(lambda: func(*args), cache.zero_, 50)
    moved = meta["weight_bytes"] + 4 * (4096 + 4096)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _event_times(lambda: dst.copy_(src), cache.zero_, 10)
    gemv_gbs, copy_gbs = moved / ms / 1e6, 2 * src.numel() / copy_ms / 1e6
    del src, dst
    larger = []
    timing = bundle / "kernels" / "timing.json"
    rng = np.random.default_rng(0)
    for spec in json.loads(timing.read_text()) if timing.exists() else []:
        n_in, n_out = spec["in_features"], spec["out_features"]
        targs = [tvm.runtime.tensor(rng.standard_normal((1, n_in)).astype(np.float32), dev),
                 tvm.runtime.tensor(rng.integers(0, 2**32, spec["weight_shape"], dtype=np.uint64).astype(np.uint32), dev),
                 tvm.runtime.tensor((0.01 * rng.random(spec["scales_shape"]) + 1e-3).astype(np.float16), dev),
                 tvm.runtime.tensor(np.zeros((1, n_out), np.float32), dev)]
        f = lib[spec["name"]]
        f(*targs)
        torch.cuda.synchronize()
        t_ms = _event_times(lambda: f(*targs), cache.zero_, 20)
        gbs = (spec["weight_bytes"] + 4 * (n_in + n_out)) / t_ms / 1e6
        larger.append({"kernel": spec["name"], "ms": t_ms, "gb_s": gbs, "fraction_of_copy": gbs / copy_gbs})
        del targs
    return {"kernel": meta["name"], "ms": ms, "gb_s": gemv_gbs, "copy_gb_s": copy_gbs,
            "fraction_of_copy": gemv_gbs / copy_gbs, "larger": larger}


def _reassemble(bundle: Path, stem: str) -> bool:
    if (bundle / stem).is_dir():
        return True
    parts = sorted(bundle.glob(f"{stem}.part-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    want = bundle / f"{stem}.parts"
    if not parts or not want.is_file() or len(parts) != int(want.read_text()):
        return False
    archive = bundle / f"{stem}.tar"
    with archive.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    with tarfile.open(archive) as tar:
        tar.extractall(bundle, filter="data")
    archive.unlink()
    return True


def _ours_decode(artifact: Path, prompt: list[int], tokens: int) -> float:
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.session import CompiledSession

    session = CompiledSession(load_artifact(artifact))
    rates = []
    for _ in range(3):
        session.reset()
        token = int(np.argmax(session.prefill(prompt)[-1]))
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = int(np.argmax(session.decode(token)))
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def dense_weights(art) -> dict[str, np.ndarray]:
    """The artifact's weights by HF name, quantized ones dequantized (numpy, no compiler needed)."""
    from bitsmith.compiler.ops.quant import dequantize_packed

    plan = art.manifest["ir"]["meta"].get("precision_plan") or {}
    c, weights, dense = art.config, art.weights, {}
    for name, array in weights.items():
        if name.endswith((".scales", ".zeros")):
            continue
        if not name.endswith(".qweight"):
            dense[name] = array
            continue
        base = name.removesuffix(".qweight")
        scheme = plan[f"{base}.weight"]
        n_in = c["intermediate_size"] if base.endswith("down_proj") else c["hidden_size"]
        attrs = {"bits": scheme["bits"], "group_size": scheme["group_size"], "in_features": n_in}
        dense[f"{base}.weight"] = dequantize_packed(array, weights[f"{base}.scales"], weights.get(f"{base}.zeros"), attrs)
    return dense


def _torch_model(artifact: Path):
    """transformers' Llama in fp16 on the GPU with our artifact's weights, dequantized."""
    import torch
    import transformers

    from bitsmith.runtime.artifact import load_artifact

    art = load_artifact(artifact)
    c = art.config
    config = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
        head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
        max_position_embeddings=c["max_position"], tie_word_embeddings=c["tie_word_embeddings"])
    model = transformers.LlamaForCausalLM(config).to(torch.float16)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): torch.from_numpy(np.asarray(v, np.float16))
             for k, v in dense_weights(art).items()}
    model.load_state_dict(state, strict=False)
    return model.cuda().eval()


def _torch_decode(model, prompt: list[int], tokens: int) -> float:
    import torch

    rates = []
    with torch.no_grad():
        for _ in range(3):
            out = model(torch.tensor([prompt], device="cuda"), use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(tokens):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def decode_speed(bundle: Path, prompt: list[int], tokens: int = 64) -> dict:
    artifact = bundle / "smollm2-int4"
    ours = _ours_decode(artifact, prompt, tokens)
    peer = _torch_decode(_torch_model(artifact), prompt, tokens)
    return {"model": "SmolLM2-135M int4 g32 (ours) / fp16 (torch eager)", "tokens": tokens,
            "ours_tok_s": ours, "torch_fp16_eager_tok_s": peer, "ratio": ours / peer}


def _host() -> dict:
    """The GPU machine's CPU record (bench/hostinfo.py), without the read-bandwidth probe: nothing here
    streams from host memory, and that machine may have no C compiler to build the probe."""
    import sys

    here = str(Path(__file__).resolve().parent)
    sys.path.append(here)  # last: bench/kernels.py must not shadow the `kernels` package transformers imports
    try:
        from hostinfo import host_info
    finally:
        sys.path.remove(here)
    return host_info(probe=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(".gpu"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".gpu/out")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {}

    def step(key: str, fn) -> None:  # one failing part must not lose the others' results
        t0 = time.perf_counter()
        try:
            report[key] = fn()
        except Exception as exc:  # noqa: BLE001  (recorded in the report, not swallowed)
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{key}] {time.perf_counter() - t0:.1f} s: {json.dumps(report[key])[:2000]}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    import torch

    report["device"] = torch.cuda.get_device_name(0)
    report["host"] = _host()
    expected = json.loads((args.bundle / "expected.json").read_text())
    have_smollm2 = _reassemble(args.bundle, "smollm2-int4")
    from bitsmith.runtime.cuda_runner import cuda_device_present

    report["cuda_visible"] = cuda_device_present()  # loads TVM's CUDA runtime before any CUDA module
    step("kernels", lambda: kernel_checks(args.bundle))
    step("gemv", lambda: gemv_bandwidth(args.bundle))
    step("greedy", lambda: greedy_checks(args.bundle, expected))
    if have_smollm2:
        step("decode", lambda: decode_speed(args.bundle, expected["smollm2-int4"]["prompt"]))
    else:
        report["decode"] = {"skipped": "the SmolLM2 pieces were not all carried"}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
