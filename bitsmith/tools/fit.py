"""Fit check: an artifact's resident memory and its decode/prefill speed ceilings on a device profile."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from bitsmith.devices import INT8_DOT_FEATURES, DeviceProfile
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact, is_artifact, load_artifact
from bitsmith.runtime.memory import decode_traffic, serving_memory

MiB = 1 << 20


@dataclass(frozen=True)
class FitReport:
    """Predicted resident memory (the compiled executor with every KV block in use) against the device's usable
    memory, and speed ceilings from bytes per token over its sustained read bandwidth."""

    device: str
    usable: int  # the device's RAM less what its OS keeps
    runtime: int  # Python, numpy, the TVM runtime, the kernel library (RUNTIME_BASE_BYTES)
    weights: int
    workspace: int  # activation arenas and constants
    kv_cache: int  # the whole planned pool: concurrency x context tokens (+ prefix-cache headroom)
    context: int
    concurrency: int
    decode_bytes_first: int  # bytes one decode step reads at the first position (weights; no cache yet)
    decode_bytes_full: int  # ... at the last position of the planned context
    decode_tok_s_first: float  # one sequence: bandwidth / decode_bytes_first
    decode_tok_s_full: float  # one sequence at the full context
    batch_tok_s_full: float  # all `concurrency` sequences at the full context, one weight read per step
    prefill_tok_s: float  # min(compute ceiling: 2 FLOPs per weight, bandwidth: weights once per prefill chunk)
    prefill_rows: int  # rows of the largest prefill chunk
    kernels_arch: str = ""  # the artifact's kernels (x86_64 kernels read the same weight bytes an aarch64 build does)
    pool_tokens: int = 0  # tokens the KV pool holds: concurrency x context, plus prefix-cache headroom a budget allows
    prefill_int8: bool = False  # int8-activation GEMMs on a core with int8 dot products: 4x the fp32 rate

    @property
    def resident(self) -> int:
        return self.runtime + self.weights + self.workspace + self.kv_cache

    @property
    def fits(self) -> bool:
        return self.resident <= self.usable

    def to_json(self) -> dict:
        return {**asdict(self), "resident": self.resident, "fits": self.fits}


def check_fit(artifact: Artifact | str | Path, device: DeviceProfile, runtime: int | None = None) -> FitReport:
    """The FitReport of a compiled artifact (it must have kernels: they fix the weights read and the arenas).
    `runtime`: the process's bytes before any weight (None: `bitsmith run`'s RUNTIME_BASE_BYTES; a bundle's
    runtime-only launchers need less)."""
    if not isinstance(artifact, Artifact) and not is_artifact(Path(artifact)):
        raise BitsmithError(f"{str(artifact)!r} is not a compiled artifact: the fit check needs its kernels and plans",
                            where=f"fit check for {device.name}",
                            fix=f"bitsmith compile MODEL -o DIR --device {device.name}, then inspect DIR --device ...")
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, check_hashes=False)
    memory, traffic = serving_memory(art), decode_traffic(art)
    if memory is None or traffic is None:
        raise BitsmithError("the artifact has no kernels, so nothing says what it holds in memory",
                            where=f"fit check for {device.name}", fix="compile it with --target host or aarch64-linux")
    if runtime is not None:
        memory = {**memory, "runtime": runtime}
    kv = art.manifest["kv_plan"]
    context, concurrency = int(kv["max_context"]), int(kv["concurrency"])
    bandwidth = device.bandwidth_gbs * 1e9
    first = traffic["weights"]
    full = first + traffic["kv_per_position"] * (context - 1)
    batch = traffic["weights"] + concurrency * traffic["kv_per_position"] * (context - 1)
    rows = max(s["rows"] for s in art.manifest["kernels"]["schedules"].values())
    flops = 2 * (int(art.manifest["weights"]["parameters"]) - traffic["gathered_elements"])
    activations = (art.manifest.get("compile") or {}).get("target", {}).get("activations", "float32")
    int8 = activations != "float32" and bool(set(device.features) & set(INT8_DOT_FEATURES))
    compute = device.gflops * 1e9 * (4 if int8 else 1) / flops if device.gflops and flops > 0 else float("inf")
    prefill = min(compute, bandwidth * rows / first)
    return FitReport(device.name, device.usable_bytes, memory["runtime"], memory["weights"], memory["workspace"],
                     memory["kv_cache"], context, concurrency, first, full, bandwidth / first, bandwidth / full,
                     concurrency * bandwidth / batch, prefill, rows, art.manifest["kernels"]["arch"],
                     int(kv["num_blocks"]) * int(kv["block_size"]), int8)


def require_fit(artifact: Artifact | str | Path, device: DeviceProfile, runtime: int | None = None) -> FitReport:
    """check_fit, or a one-line BitsmithError naming the overshoot and what to recompile with."""
    report = check_fit(artifact, device, runtime)
    if not report.fits:
        over = (report.resident - report.usable) / MiB
        raise BitsmithError(
            f"the artifact needs {report.resident / MiB:.0f} MiB resident (runtime {report.runtime / MiB:.0f} + weights "
            f"{report.weights / MiB:.0f} + workspace {report.workspace / MiB:.0f} + KV cache {report.kv_cache / MiB:.0f} "
            f"for {report.concurrency} x {report.context} tokens) but {device.name} has {report.usable / MiB:.0f} MiB "
            f"usable ({over:.0f} MiB short)", where=f"fit check for {device.name}",
            fix=f"recompile with `bitsmith compile ... --device {device.name}`, which plans the KV cache into the "
                f"device's memory or names the context and bits that fit")
    return report


def format_fit(report: FitReport, device: DeviceProfile) -> list[str]:
    """The lines `inspect --device` prints."""
    verdict = "fits" if report.fits else f"DOES NOT FIT ({(report.resident - report.usable) / MiB:.0f} MiB short)"
    plural = "s" * (report.concurrency != 1)
    int8 = " x4 for int8 dot products" if report.prefill_int8 else ""
    lines = [
        f"device {device.summary()}",
        (f"  predicted RSS on {device.name}: {report.resident / MiB:.0f} MiB = runtime {report.runtime / MiB:.0f} + "
         f"weights {report.weights / MiB:.0f} + workspace {report.workspace / MiB:.0f} + KV cache "
         f"{report.kv_cache / MiB:.0f} (a pool of {report.pool_tokens} tokens for {report.concurrency} x "
         f"{report.context}, every block in use; {(report.resident - report.kv_cache) / MiB:.0f} MiB once loaded) "
         f"of {report.usable / MiB:.0f} MiB usable: {verdict}"),
        (f"  decode (ceiling, {device.bandwidth_gbs:g} GB/s read): {report.decode_tok_s_first:.1f} tok/s at the first "
         f"token ({report.decode_bytes_first / MiB:.1f} MiB/token), {report.decode_tok_s_full:.1f} tok/s at token "
         f"{report.context} ({report.decode_bytes_full / MiB:.1f} MiB/token); {report.batch_tok_s_full:.1f} tok/s "
         f"total for {report.concurrency} sequence{plural} at full context"),
        (f"  prefill (estimate: {device.gflops:.0f} GFLOP/s fp32{int8}, 2 FLOPs per weight, weights read once per "
         f"{report.prefill_rows}-row chunk): {report.prefill_tok_s:.0f} tok/s"),
        f"  figures: {device.source}",
    ]
    if report.kernels_arch and report.kernels_arch != device.arch:
        lines.append(f"  (the artifact's kernels are {report.kernels_arch}; `bitsmith compile ... --device "
                     f"{device.name}` builds {device.arch} ones: the same weight bytes, KV plan sized to the device)")
    return lines
