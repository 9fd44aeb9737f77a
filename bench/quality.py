"""Quantization quality: RTN/GPTQ/AWQ/HQQ x rotation x scheme on real models, llm-compressor's (rotated) GPTQ beside.

For each model every row is compiled with `bitsmith compile` (a subprocess, so its peak RSS and time are
measured), then scored by `bitsmith eval`'s code on the same windows against the unquantized model:
perplexity, mean/p99 KL divergence, top-1 agreement, bytes. Calibration text comes from a part of the file
disjoint from the scored tokens (stated in the table).

    python bench/quality.py [--json] [--models tinystories,smollm2] [--methods rtn,gptq,awq,hqq]
                            [--rotations none,hadamard,learned] [--schemes "int4 per-channel,int3 g32"]
                            [--kv-rows] [--act-rows] [--peer none,spinquant,spinquant-learned]
                            [--reuse-json bench/quality.json] [--work DIR] [--jobs 1] [--tokens N]

The grid is methods x rotations x schemes; the default schemes are the issue's four (int4 per-channel, int4
g32, int3 g32, int2 g32) under every rotation plus the earlier table's others (int8 per-channel, int4 g64, and
int4 g128 on TinyStories) unrotated. --kv-rows adds 16-bit-weight and GPTQ int4 g32 rows with an int8 KV cache
(unrotated) and an int4 one (every rotation); --act-rows scores the RTN/GPTQ int4 rows with int8 activations.
A row whose compiler piece is missing (a flag or choice `bitsmith compile` lacks) is skipped with the reason.
The JSON (--json-out, default bench/quality.json) is rewritten after every scored batch of rows (--score-batch,
one reference pass per batch); --reuse-json takes rows measured with identical settings from an earlier one,
so an interrupted grid resumes, and keeps the models of that file this run does not measure.

--smoke: TinyStories-656K, RTN int4 g32 only, 2048 scored tokens, no peer, no file written unless --out:
checks that the bench still runs (tests/bench/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/ goes to the END of sys.path (Python puts a script's own folder first): helpers here (hostinfo)
# are still found, but bench/kernels.py no longer shadows the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info  # noqa: E402
from quality_grid import (  # noqa: E402
    DATA, MODELS, SEQLEN, RowSpec, compile_option_choices, grid, missing_piece, peer_grid, score_options,
)
from quality_peer import PEER_NAME, PeerRunner  # noqa: E402

REPORT_FORMAT = 2
from quality_report import write_markdown  # noqa: E402


def compile_one(source: str, out: Path, spec: RowSpec, calib: Path, samples: int) -> dict:
    """Run `bitsmith compile` in a subprocess; returns wall seconds and peak RSS (MiB), or {"error": ...}."""
    quant = [] if spec.method == "none" else [
        "--method", spec.method, "--bits", str(spec.bits), "--group", str(spec.group),
        "--sym" if spec.sym else "--asym", "--no-keep-default"]
    extra = (["--rotate", spec.rotation] if spec.rotation != "none" else []) + (
        ["--kv-dtype", spec.kv] if spec.kv != "auto" else []) + (["--clip", spec.clip] if spec.clip != "none" else [])
    if source == "default" or source.endswith(".gguf"):
        # the built-in SmolLM2 is a Q4_1 GGUF whose codes an import keeps: every row starts from its dequantized
        # weights instead (as the reference does), and a rotation needs them anyway
        extra.append("--requantize")
    cmd = [sys.executable, "-m", "bitsmith.cli", "compile", *([] if source == "default" else [source]),
           "-o", str(out), *quant, *extra, "--calib", str(calib), "--target", "none",
           "--calib-samples", str(samples), "--calib-seqlen", str(SEQLEN), "--gate", "none"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()  # read before waiting: a full pipe would block the child
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        print(f"compile failed: {' '.join(cmd)}\n{err[-2000:]}", file=sys.stderr, flush=True)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        return {"error": f"compile failed: {lines[-1][-400:] if lines else 'no output'}"}
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def settings_of(model_report: dict) -> tuple:
    """What must be equal for a row of an earlier JSON to stand in for one of this run."""
    return tuple(model_report.get(k) for k in ("format", "model", "text", "ctx", "tokens", "bos", "calibration"))


class Reuse:
    """Rows and peer rows of an earlier JSON, by model key, usable when the settings match."""

    def __init__(self, path: Path | None):
        self.report = json.loads(path.read_text()) if path and path.exists() else {}

    def rows(self, key: str, settings: tuple) -> tuple[dict, dict]:
        old = self.report.get(key)
        if not isinstance(old, dict) or settings_of(old) != settings:
            return {}, {}
        rows = {RowSpec.key_of(r): r for r in old.get("rows", ()) if "ppl" in r}
        peers = {(p["rotation"], p["scheme"]): p for p in old.get("peer_rows", ()) if "ppl" in p}
        return rows, peers


def score(paths: list[Path], specs: list[RowSpec], text: str, tokens: int, ctx: int, source_path: Path) -> list[dict]:
    """Scores of artifacts on the reference executor, one reference pass for all of them that share scoring options."""
    from bitsmith.tools.evaluate import evaluate_many

    results: list[dict | None] = [None] * len(paths)
    by_options: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        by_options.setdefault(tuple(sorted(score_options(spec).items())), []).append(i)
    for options, indices in by_options.items():
        # --target none artifacts have no kernels: they are scored on the numpy reference executor
        def run(group: list[int]) -> list:
            return evaluate_many([paths[i] for i in group], text, tokens, ctx, reference=source_path,
                                 executor="reference", **dict(options))
        try:
            scored = list(zip(indices, run(indices)))
        except Exception:  # one artifact the scorer refuses must not cost the batch: score them one by one
            scored = []
            for i in indices:
                try:
                    scored.append((i, run([i])[0]))
                except Exception as exc:  # the row records why; the grid goes on
                    results[i] = {"error": f"scoring failed: {type(exc).__name__}: {str(exc)[:300]}"}
        for i, r in scored:
            results[i] = {"ref_ppl": r.ref_ppl, "tokens": r.tokens,
                          **{k: getattr(r, k) for k in ("ppl", "kld_mean", "kld_p99", "top1_agree")}}
    return results


class ModelBench:
    """One model's grid: compile in batches, score each batch against one reference pass, report after each."""

    def __init__(self, key: str, tokens: int, work: Path, args, reused: Reuse, on_update):
        from bitsmith.compiler.default_model import default_model_path

        self.key, self.model, self.tokens, self.work, self.args = key, MODELS[key], tokens, work, args
        self.text = self.model.text.read_text(encoding="utf-8")
        work.mkdir(parents=True, exist_ok=True)
        self.calib = work / f"{key}-calib.txt"
        self.calib.write_text(self.text[slice(*self.model.calib_chars)])
        self.source_path = default_model_path() if self.model.source == "default" else Path(self.model.source)
        self.on_update = on_update
        self.reused = reused
        self.report: dict = {}

    def artifact(self, spec: RowSpec) -> tuple[Path, dict]:
        """The compiled artifact of a row (compiled once; rows differing only in scoring share it)."""
        out = self.work / f"{self.key}-{spec.artifact_name}"
        done = out / "compile.json"
        if done.exists():
            return out, json.loads(done.read_text())
        print(f"[{self.key}] compile {spec.label}", file=sys.stderr, flush=True)
        info = compile_one(str(self.source_path), out, spec, self.calib, self.model.calib_samples)
        if "error" not in info:
            from bitsmith.runtime.artifact import load_artifact

            info["weight_bytes"] = load_artifact(out).manifest["weights"]["bytes"]
            done.write_text(json.dumps(info))
        return out, info

    def header(self) -> dict:
        """Tokenizer-derived settings (an unquantized compile gives the tokenizer) and the calibration ids/windows."""
        from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_samples
        from bitsmith.runtime.artifact import load_artifact
        from bitsmith.tools.evaluate import windows_of

        base, info = self.artifact(RowSpec("none", "none", "16-bit", 16, -1, True))
        if "error" in info:
            raise SystemExit(f"[{self.key}] the unquantized compile failed: {info['error']}")
        tokenizer = load_artifact(base).tokenizer()
        bos = tokenizer.bos_token_id if tokenizer.add_bos else None
        self.calib_ids = calibration_samples(tokenizer.encode(self.calib.read_text(), add_bos=False),
                                             CalibrationOptions(str(self.calib), self.model.calib_samples, SEQLEN),
                                             bos)
        self.windows = windows_of(tokenizer.encode(self.text, add_bos=False)[:self.tokens], self.model.ctx, bos)
        # format 2: rows carry rotation/kv/activations; rows of an earlier format are never reused
        return {"format": REPORT_FORMAT, "model": self.model.name, "text": self.model.text.name, "ctx": self.model.ctx,
                "tokens": len(self.windows) * (self.model.ctx if bos is not None else self.model.ctx - 1),
                "bos": bos is not None,
                "calibration": f"{self.model.calib_samples} x {SEQLEN} tokens from chars "
                               f"{self.model.calib_chars[0]}-{self.model.calib_chars[1]} of the same file"}

    def run(self) -> dict:
        # filled in place: the caller's report holds this dict and writes it after every batch
        self.report.update({**self.header(), "ref_ppl": None, "rows": [], "peer_rows": [], "peer_name": PEER_NAME})
        old_rows, old_peers = self.reused.rows(self.key, settings_of(self.report))
        specs = grid(self.key, self.args)
        pending = []
        for spec in specs:
            if spec.key in old_rows:
                self._add(spec, old_rows[spec.key])
            elif (why := missing_piece(spec, compile_option_choices())) is not None:
                self._add(spec, {"skipped": why})
            else:
                pending.append(spec)
        self.on_update()
        batch = max(1, self.args.score_batch)
        for start in range(0, len(pending), batch):
            self._run_batch(pending[start:start + batch])
            self.on_update()
        self._run_peers(old_peers)
        return self.report

    def _add(self, spec: RowSpec, result: dict) -> None:
        if result.get("ref_ppl") is not None:
            self.report["ref_ppl"] = result["ref_ppl"]
        row = {**spec.json(), **{k: v for k, v in result.items() if k not in spec.json()}}
        self.report["rows"] = [r for r in self.report["rows"] if RowSpec.key_of(r) != spec.key] + [row]
        self.report["rows"].sort(key=lambda r: RowSpec.order_of(r, self.key))

    def _run_batch(self, specs: list[RowSpec]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, self.args.jobs)) as pool:
            built = list(pool.map(self.artifact, specs))
        ok = [(s, p, i) for s, (p, i) in zip(specs, built) if "error" not in i]
        for spec, (_, info) in zip(specs, built):
            if "error" in info:
                self._add(spec, info)
        if not ok:
            return
        print(f"[{self.key}] scoring {len(ok)} artifacts", file=sys.stderr, flush=True)
        scores = score([p for _, p, _ in ok], [s for s, _, _ in ok], self.text, self.tokens, self.model.ctx,
                       self.source_path)
        for (spec, _, info), result in zip(ok, scores):
            self._add(spec, {**info, **result})

    def _run_peers(self, old_peers: dict) -> None:
        settings = peer_grid(self.key, self.args)
        if not settings:
            return
        runner = PeerRunner(self.source_path, self.args.peer_venv, DATA, self.calib_ids, self.windows,
                            self.args.peer_timeout)
        try:
            for rotation, label, bits, group, sym in settings:
                result = old_peers.get((rotation, label))
                if result is None:
                    print(f"[{self.key}] peer llm-compressor {rotation} {label}", file=sys.stderr, flush=True)
                    result = runner.row(rotation, bits, group, sym)
                self.report["peer_rows"].append({"rotation": rotation, "scheme": label, **result})
                self.on_update()
        finally:
            runner.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the JSON report at the end")
    parser.add_argument("--models", default="tinystories,smollm2")
    parser.add_argument("--methods", default="rtn,gptq,awq,hqq", help="comma-separated subset of rtn,gptq,awq,hqq")
    parser.add_argument("--rotations", default="none,hadamard,learned", help="subset of none,hadamard,learned")
    parser.add_argument("--schemes", default="default",
                        help="comma-separated labels (int8 per-channel, int4 per-channel, int4 g32/g64/g128, "
                             "int3 g32, int2 g32); default: the issue's four rotated, the earlier others unrotated")
    parser.add_argument("--clips", default="none",
                        help="subset of none,mse: mse adds each RTN/GPTQ row again with `compile --clip mse`")
    parser.add_argument("--kv-rows", action="store_true", help="int8-KV (unrotated) and int4-KV (each rotation) rows")
    parser.add_argument("--act-rows", action="store_true", help="RTN/GPTQ int4 rows scored with int8 activations")
    parser.add_argument("--peer", default="none,spinquant,spinquant-learned",
                        help="peer rotations (none,spinquant,spinquant-learned,quip; '' for no peer rows)")
    parser.add_argument("--peer-schemes", default="int4 per-channel,int3 g32,int4 g32")
    parser.add_argument("--peer-timeout", type=float, default=5400, help="seconds one peer row may take")
    parser.add_argument("--tokens", type=int, default=32768, help="scored tokens per model")
    parser.add_argument("--smollm2-tokens", type=int, default=None, help="override --tokens for SmolLM2 only")
    parser.add_argument("--jobs", type=int, default=1, help="compiles run at once (each GPTQ wants the 2 cores)")
    parser.add_argument("--score-batch", type=int, default=6,
                        help="artifacts scored against one reference pass (and held in memory) at a time")
    parser.add_argument("--reuse-json", type=Path, default=None, help="take rows with identical settings from it")
    parser.add_argument("--json-out", type=Path, default=None, help="JSON rewritten as rows land "
                        "(default bench/quality.json; none in --smoke)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the artifacts here (default: a temporary folder); one an earlier run compiled "
                             "with the same settings is used again, so a resumed grid does not compile twice")
    parser.add_argument("--peer-venv", type=Path,
                        default=Path(os.environ.get("BITSMITH_PEER_VENV", Path.home() / ".cache/bitsmith/peer-venv")))
    parser.add_argument("--out", type=Path, default=None, help="markdown to write (default bench/quality.md)")
    parser.add_argument("--render", type=Path, default=None, help="only write the markdown of this JSON report")
    parser.add_argument("--smoke", action="store_true", help="TinyStories, RTN int4 g32, 2048 tokens, no file")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.methods, args.rotations, args.schemes, args.tokens = "tinystories", "rtn", "none", \
            "int4 g32", 2048
        args.peer, args.kv_rows, args.act_rows = "", False, False
    return args


def main() -> None:
    args = parse_args()
    if args.render is not None:  # markdown from a finished (or merged) JSON, nothing measured
        saved = json.loads(args.render.read_text())
        out = args.out or HERE / "quality.md"
        write_markdown({k: v for k, v in saved.items() if k in MODELS}, out, saved["host"])
        print(out.read_text())
        return
    if not DATA.is_dir():
        raise SystemExit(f"error: {DATA} not found (real models and text live in ../shared/data)")
    reused = Reuse(args.reuse_json)
    with tempfile.TemporaryDirectory(prefix="bitsmith-quality-") as tmp:
        out = args.out or (Path(tmp) / "quality.md" if args.smoke else HERE / "quality.md")
        json_out = args.json_out or (None if args.smoke else HERE / "quality.json")
        host = host_info(gib=0.25 if args.smoke else 1.0, rounds=2 if args.smoke else 5)
        keys = args.models.split(",")
        # models of the reused file this run does not measure stay in the report
        report = {k: v for k, v in reused.report.items() if k in MODELS and k not in keys}

        def update() -> None:
            if json_out is not None:
                json_out.write_text(json.dumps({"host": host, **report}, indent=1) + "\n")
            write_markdown(report, out, host)

        for key in keys:
            tokens = args.smollm2_tokens if key == "smollm2" and args.smollm2_tokens else args.tokens
            bench = ModelBench(key, tokens, args.work or Path(tmp), args, reused, update)
            report[key] = bench.report
            bench.run()
            update()
        if args.json:
            print(json.dumps({"host": host, **report}))
        else:
            print(out.read_text())


if __name__ == "__main__":
    main()
