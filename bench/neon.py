"""aarch64 GEMV kernels without an ARM machine: the inner loop of the emitted code, and decode tok/s predicted from
bytes per token (bench/neon.md).

    python bench/neon.py loops                      # sdot (cortex-a76) vs float (cortex-a72 / a76) inner loops
    python bench/neon.py predict ART [ART ...]      # bytes per decode token -> tok/s on the ARM device profiles
"""

from __future__ import annotations

import collections
import re
import sys

SIMD = re.compile(r"^(sdot|udot|usdot|tbl|and|orr|ushr|shl|sshr|fmla|fmul|fadd|faddp|scvtf|ucvtf|fcvtl2?|ext|dup|"
                  r"movi|uxtl2?|sxtl2?|zip[12]|uzp[12]|add|mul|neg|bif|bsl|bit|fmax\w*|fmin\w*|frint\w)$")


def inner_loop(asm: str, marker: str) -> list[str]:
    """The instructions of the largest innermost loop whose body holds `marker` (tbl: the sdot kernel's weight
    unpack, not its activation quantization; fmla: the float GEMV)."""
    lines = [ln for ln in asm.splitlines() if ln.strip() and not ln.lstrip().startswith((".loc", "//", ".p2align"))
             and not ln.startswith(".Ltmp")]
    labels = {ln.rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.LBB\S+:$", ln)}
    best: list[str] = []
    for i, ln in enumerate(lines):
        m = re.match(r"\s+b(?:\.\w+)?\s+(\.LBB\S+)", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            raw = lines[labels[m.group(1)] + 1:i + 1]
            body = [b for b in raw if b.startswith("\t")]
            innermost = not any(re.match(r"^\.LBB", b) for b in raw)
            if innermost and any(b.split()[0] == marker for b in body):
                best = body if len(body) > len(best) else best
    return best


def describe_loop(body: list[str]) -> str:
    ops = collections.Counter(b.split()[0] for b in body)
    vector = sum(n for op, n in ops.items() if SIMD.match(op) and any(f"\t{op}\tv" in b for b in body))
    strides = sorted({int(m.group(1)) for b in body if (m := re.search(r"add\tx\d+, x\d+, #(\d+)$", b))})
    return (f"{len(body)} instructions ({vector} SIMD), stack stores {ops['stp'] + ops['str']}; pointer steps "
            f"{strides}; {dict(ops.most_common(12))}")


def loops() -> None:
    from bitsmith.codegen.gemv import GemvSpec
    from bitsmith.codegen.gemv_int8 import QGemvI8Spec
    from bitsmith.codegen.kernel import build_module
    from bitsmith.codegen.target import resolve_target

    cases = [("int8 activations, sdot", QGemvI8Spec(576, 1536, 4, 32, True, 1), "aarch64-linux:cortex-a76", "tbl"),
             ("int8 activations, sdot", QGemvI8Spec(576, 1536, 8, 32, True, 1), "aarch64-linux:cortex-a76", "tbl"),
             ("float activations", GemvSpec(576, 1536, 4, 32, True, 1), "aarch64-linux:cortex-a72", "fmla"),
             ("float activations", GemvSpec(576, 1536, 4, 32, True, 1), "aarch64-linux:cortex-a76", "fmla")]
    for what, spec, key, marker in cases:
        asm = build_module([spec], resolve_target(key)).mod.inspect_source("asm")
        print(f"{spec.name} on {key} ({what}):\n  {describe_loop(inner_loop(asm, marker))}")


def predict(paths: list[str]) -> None:
    from bitsmith.devices import PROFILES
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.memory import decode_traffic

    for path in paths:
        traffic = decode_traffic(load_artifact(path, check_hashes=False))
        if traffic is None:
            raise SystemExit(f"{path}: no kernels")
        for context in (0, 1024):
            step = traffic["weights"] + context * traffic["kv_per_position"]
            cells = ", ".join(f"{name} {p.bandwidth_gbs * 1e9 / step:.1f}" for name, p in PROFILES.items()
                              if p.arch == "aarch64")
            print(f"{path}: {step / 1e6:.1f} MB per decode token at {context} cached positions -> tok/s: {cells}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["loops"]:
        loops()
    elif sys.argv[1:2] == ["predict"]:
        predict(sys.argv[2:])
    else:
        raise SystemExit(__doc__)
