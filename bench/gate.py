"""The gate run of bench/gate.md: compile SmolLM2 int3 g32 GPTQ under a gate and print every attempt of the ladder.

    python bench/gate.py [--out DIR] [--gate SPEC]       # compiles (tens of minutes on 2 cores), then prints
    python bench/gate.py --show DIR                        # prints the record of an artifact compiled before
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bitsmith is not installed for scripts in bench/

from bitsmith.tools.gate import format_attempts, format_size  # noqa: E402

GATE = "kld<=0.3,top1>=0.7,golden>=0.25"
FLAGS = ["--requantize", "--method", "gptq", "--bits", "3", "--group", "32", "--gate-tokens", "512", "--gate-limit", "8"]


def show(artifact: Path) -> None:
    gate = json.loads((artifact / "manifest.json").read_text()).get("gate")
    print(format_size(artifact))
    if not gate:
        print("no gate record")
        return
    print(format_attempts(gate))
    print()
    for i, a in enumerate(gate["attempts"]):
        print(f"{i}. {a['rung']}: {a['description']}; schemes {a['schemes']}; failed: {'; '.join(a['failed']) or '-'}")
    sens = gate.get("sensitivity")
    if sens:
        top = sorted(sens["tensors"].items(), key=lambda kv: -kv[1])
        total = sum(v for _, v in top)
        print(f"\nsensitivity at {sens['measured_at']} ({len(top)} tensors, summed KLD {total:.4g}); the top 10:")
        for name, kld in top[:10]:
            print(f"  {name:<40} {kld:.4g}  ({100 * kld / total:.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bitsmith-gate-bench/smollm2-int3-gated"))
    parser.add_argument("--gate", default=GATE)
    parser.add_argument("--show", type=Path, default=None)
    args = parser.parse_args()
    if args.show:
        show(args.show)
        return
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "bitsmith.cli", "compile", *FLAGS, "--gate", args.gate, "-o", str(args.out)]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    attempts = [line for line in proc.stderr.replace("\r", "\n").splitlines()
                if line.startswith(("gate", "error:", "sensitivity of")) or re.match(r"  \d+\. ", line)]
    print("\n".join(attempts))
    print(f"total {time.perf_counter() - start:.0f} s, exit {proc.returncode}")
    if proc.returncode == 0:
        show(args.out)


if __name__ == "__main__":
    main()
